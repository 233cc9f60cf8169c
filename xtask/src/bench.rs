//! `cargo xtask bench overhead`: what system-wide profiling costs at 19 and
//! 99 Hz while every CPU is busy, for profiler-agent and (if installed) perf.
//!
//! Per run: the tool's user+sys CPU time and peak RSS come from `wait4`'s
//! rusage (the final utime+stime of all its threads and reaped children, in
//! microseconds rather than clock ticks) and the highest `VmHWM` seen in
//! /proc/PID/status; the agent's BPF run time comes from the `run_time_ns`
//! and `run_cnt` of its programs, found in /proc/PID/fdinfo while the bench
//! keeps the kernel's BPF statistics on. The bench opens each program by id
//! as soon as it shows up, so its counters can still be read after the agent
//! exits.

mod churn;
mod export;
mod filter;
mod measure;
mod offcpu;
mod pingpong;
mod unwind;
mod workload;

use std::{
    env, fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Subcommand;
use measure::{install_signal_handlers, measure, Measured};

use crate::{build, is_root, step};

#[derive(Subcommand)]
pub enum Bench {
    /// Profiling overhead at 19 Hz and 99 Hz under a CPU-bound load on all CPUs.
    Overhead {
        /// Seconds per run.
        #[arg(long, default_value_t = 20)]
        duration: u64,
    },
    /// Cost of `record --off-cpu` on switch-heavy loads (one-site ping-pong, multi-site service) against bpftrace, and at 99 Hz.
    Offcpu {
        /// Seconds per load run.
        #[arg(long, default_value_t = 15)]
        duration: u64,
        /// Rounds of baseline / agent (/ bpftrace); medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Run the agent with `--off-cpu-sample N` (stacks for one block in
        /// N); 1 measures the exact mode.
        #[arg(long, default_value_t = 1)]
        off_cpu_sample: u32,
    },
    /// Bytes exported per process and profile (OTLP and pprof, gzip and raw) and their CPU cost.
    Export {
        /// Seconds per export interval.
        #[arg(long, default_value_t = 10)]
        interval: u64,
        /// Intervals measured per run (the daemon runs one more, skipped).
        #[arg(long, default_value_t = 3)]
        intervals: usize,
    },
    /// The daemon's memory (`run --off-cpu`) while processes start and exit at a high rate.
    Churn {
        /// Seconds of churn (run 600 for the 10-minute soak).
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Processes started per second.
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Agent binary to measure (default: build the release agent).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// BPF time per sample filtered out by --cgroup against per sample unwound.
    Filter {
        /// Seconds per record run.
        #[arg(long, default_value_t = 8)]
        duration: u64,
        /// Rounds of unwound / filtered runs; medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// BPF time per sample of CFI against frame-pointer unwinding, table build time and map memory.
    Unwind {
        /// Seconds per record run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Rounds of cfi / frame-pointer runs; medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

const FREQUENCIES: [u32; 2] = [19, 99];
/// Targets: agent + BPF CPU at 99 Hz, in % of one core; peak RSS in MB.
const TARGET_CPU_PCT: f64 = 1.0;
const TARGET_RSS_MB: f64 = 50.0;
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Overhead { duration } => overhead(duration),
        Bench::Offcpu { duration, rounds, off_cpu_sample } => offcpu::run(duration, rounds, off_cpu_sample),
        Bench::Export { interval, intervals } => export::run(interval, intervals),
        Bench::Unwind { duration, rounds } => unwind::run(duration, rounds),
        Bench::Churn { duration, rate, agent } => churn::run(duration, rate, agent),
        Bench::Filter { duration, rounds } => filter::run(duration, rounds),
    }
}

struct Row {
    tool: &'static str,
    hz: u32,
    m: Measured,
    samples: Option<u64>,
}

fn overhead(duration: u64) -> Result<()> {
    ensure!(duration > 0, "--duration must be at least 1 second");
    if !is_root() {
        bail!(
            "the overhead bench profiles the whole system and turns on the kernel's BPF statistics, which needs root; \
             run `sudo -E cargo xtask bench overhead`"
        );
    }
    let agent = build::run(true)?;
    let perf = which("perf");
    if perf.is_none() {
        step("bench: perf is not on PATH, comparing with nothing (apt-get install linux-perf to add it)");
    }
    let ncpu = thread::available_parallelism().map_or(1, |n| n.get());
    let tmp = TmpDir::new()?;
    install_signal_handlers();
    let _stats = BpfStats::enable()?;
    step(format!("bench: starting {ncpu} busy processes"));
    let _load = Load::start(ncpu)?;
    thread::sleep(Duration::from_secs(1));

    let secs = duration.to_string();
    let mut rows = Vec::new();
    for hz in FREQUENCIES {
        let hz_s = hz.to_string();
        step(format!("bench: profiler-agent record at {hz} Hz for {duration} s"));
        let out = tmp.0.join(format!("agent-{hz}"));
        let mut cmd = Command::new(&agent);
        cmd.args(["record", "--duration", &secs, "--frequency", &hz_s, "--format", "folded", "--output-dir"]).arg(&out);
        let m = measure(cmd, "profiler-agent record", &tmp.0.join(format!("agent-{hz}.log")), duration, true)?;
        rows.push(Row { tool: "profiler-agent", hz, m, samples: folded_samples(&out) });

        if let Some(perf) = &perf {
            step(format!("bench: perf record at {hz} Hz for {duration} s"));
            let mut cmd = Command::new(perf);
            cmd.args(["record", "-e", "cpu-clock", "-F", &hz_s, "-a", "-g", "-o"])
                .arg(tmp.0.join(format!("perf-{hz}.data")))
                .args(["--", "sleep", &secs]);
            let m = measure(cmd, "perf record", &tmp.0.join(format!("perf-{hz}.log")), duration, false)?;
            rows.push(Row { tool: "perf", hz, m, samples: None });
        }
    }
    print_table(&rows, ncpu, duration);
    Ok(())
}

/// Total count of the `*.folded` files the agent wrote into `dir`.
fn folded_samples(dir: &Path) -> Option<u64> {
    let mut total = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "folded") {
            let text = fs::read_to_string(entry.path()).ok()?;
            let n: u64 = text.lines().filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok()).sum();
            *total.get_or_insert(0) += n;
        }
    }
    total
}

fn which(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt as _;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn print_table(rows: &[Row], ncpu: usize, duration: u64) {
    println!();
    println!("Profiling overhead: {ncpu} CPUs busy, {duration} s per run; CPU % are of one core.");
    println!(
        "{:<15} {:>3} {:>7} {:>11} {:>6} {:>10} {:>9} {:>8} {:>12} {:>8}",
        "tool", "Hz", "wall s", "user+sys %", "BPF %", "ns/BPF run", "BPF runs", "total %", "peak RSS MB", "samples"
    );
    for r in rows {
        let wall = r.m.wall.as_secs_f64();
        let cpu = r.m.cpu.as_secs_f64() / wall * 100.0;
        let bpf = r.m.bpf_ns as f64 / 1e9 / wall * 100.0;
        let (bpf_s, per_run, runs) = if r.m.bpf_progs > 0 {
            let per = r.m.bpf_ns.checked_div(r.m.bpf_runs).map_or("-".into(), |n| n.to_string());
            (format!("{bpf:.3}"), per, r.m.bpf_runs.to_string())
        } else {
            ("-".into(), "-".into(), "-".into())
        };
        let samples = r.samples.map_or("-".into(), |s| s.to_string());
        println!(
            "{:<15} {:>3} {:>7.1} {:>11.3} {:>6} {:>10} {:>9} {:>8.3} {:>12.1} {:>8}",
            r.tool,
            r.hz,
            wall,
            cpu,
            bpf_s,
            per_run,
            runs,
            cpu + bpf,
            r.m.rss_kb as f64 / 1024.0,
            samples
        );
    }
    println!("(samples: expected about Hz x {ncpu} CPUs x {duration} s per agent run)");
    if rows.iter().any(|r| r.tool == "perf") {
        println!("(perf: its sampling work in the kernel is not charged to it, so its figure is a lower bound)");
    }
    let agent = |hz| rows.iter().find(|r| r.tool == "profiler-agent" && r.hz == hz);
    if let Some(r) = agent(99) {
        let wall = r.m.wall.as_secs_f64();
        let total = (r.m.cpu.as_secs_f64() + r.m.bpf_ns as f64 / 1e9) / wall * 100.0;
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!(
            "Target: agent + BPF <= {TARGET_CPU_PCT} % of one core at 99 Hz: {total:.3} % ({})",
            verdict(total <= TARGET_CPU_PCT)
        );
    }
    let rss = rows.iter().filter(|r| r.tool == "profiler-agent").map(|r| r.m.rss_kb).max().unwrap_or(0);
    let rss_mb = rss as f64 / 1024.0;
    let ok = if rss_mb <= TARGET_RSS_MB { "met" } else { "NOT met" };
    println!("Target: agent peak RSS <= {TARGET_RSS_MB} MB: {rss_mb:.1} MB ({ok})");
}

/// `nproc` busy shell loops, killed on drop.
struct Load(Vec<Child>);

impl Load {
    fn start(n: usize) -> Result<Load> {
        let mut load = Load(Vec::with_capacity(n));
        for _ in 0..n {
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start the CPU load (`sh -c 'while :; do :; done'`)")?;
            load.0.push(child);
        }
        Ok(load)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Keeps the kernel's BPF run-time statistics on while alive. Prefers
/// `BPF_ENABLE_STATS`: a reference held by an fd, so a concurrent write of 0 to
/// kernel.bpf_stats_enabled cannot turn them off mid-run and nothing is left on
/// if the bench is killed. Falls back to setting the sysctl to 1 and restoring
/// its old value on drop.
enum BpfStats {
    Fd { _held: OwnedFd },
    Sysctl { old: String },
}

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        if let Some(fd) = measure::bpf_enable_stats() {
            return Ok(BpfStats::Fd { _held: fd });
        }
        let old = fs::read_to_string(BPF_STATS).with_context(|| {
            format!("cannot read {BPF_STATS}; the kernel needs BPF run-time statistics (Linux >= 5.1)")
        })?;
        fs::write(BPF_STATS, "1").with_context(|| format!("cannot enable {BPF_STATS}"))?;
        Ok(BpfStats::Sysctl { old: old.trim().to_owned() })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let BpfStats::Sysctl { old } = self {
            if let Err(e) = fs::write(BPF_STATS, &*old) {
                eprintln!("warning: cannot restore {BPF_STATS} to {old}: {e}");
            }
        }
    }
}

/// A scratch directory, removed on drop.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new() -> Result<TmpDir> {
        let dir = env::temp_dir().join(format!("profiler-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(TmpDir(dir))
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
