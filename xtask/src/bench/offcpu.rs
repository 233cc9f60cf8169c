//! `cargo xtask bench offcpu`: what `record --off-cpu` costs context-switch
//! heavy loads, against the same load untraced and under bpftrace doing the
//! equivalent aggregation, in the same run.
//!
//! Loads, each pinned to one CPU:
//! - "max": the pipe ping-pong (pingpong.rs) flat out, the highest switch
//!   rate one CPU makes; blocks at one place per side.
//! - "multi": a service that blocks at four places in turn (pipe, futex,
//!   condition variable, timer; multisite.rs), short sleeps.
//! Each round runs every load alone (baseline), under `profiler-agent record
//! --off-cpu` system-wide, and under bpftrace; then the overhead run: the
//! agent at 99 Hz on-CPU plus off-CPU, system-wide, over a CPU-bound process
//! and the multi-site service paced to about 10k switches/s.
//!
//! The flat-out load also runs under the agent with the kernel's BPF
//! statistics off, as they are in production. Statistics put two clock
//! reads around every program run: a build whose scheduler programs return
//! at once still cost 53-68 ns per run with them on (2-CPU VM), and only
//! the statistics-off figure is the throughput a user's service sees. The
//! throughput target is judged on it; both are printed.
//!
//! BPF time during each load comes from the tracer's own program fds
//! (fdinfo `run_time_ns`, bench keeps BPF statistics on), read before and
//! after the load, so start-up and the margins are left out; the agent's
//! per-program figures from its "BPF time per run" line. Tracer CPU during
//! the load from /proc/PID/stat. `PROFILER_BENCH_AGENT=/path` measures
//! another agent binary (e.g. an older build, for before/after figures).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};

use super::{
    measure::{install_signal_handlers, interrupted, measure, Measured},
    pingpong::{self, LoadRun},
    which, BpfStats, TmpDir, BPF_STATS,
};
use crate::{build, is_root, step};

mod multisite;
mod report;

/// Targets (issue 9): sched_switch + sched_wakeup BPF ns per switch on
/// every load; flat out, throughput against the baseline and BPF time
/// against bpftrace's; agent + BPF CPU of the overhead run.
const TARGET_NS_PER_SWITCH: f64 = 250.0;
const TARGET_THROUGHPUT: f64 = 0.90;
const TARGET_VS_BPFTRACE: f64 = 0.25;
const TARGET_OVERHEAD_PCT: f64 = 1.0;
/// Switch rate of the overhead run's service.
const OVERHEAD_RATE: f64 = 10_000.0;
/// Server sleep unit of the "multi" load: short, so it switches often.
const MULTI_UNIT_US: u64 = 20;
const LOADS: [&str; 2] = ["max", "multi"];
/// Seconds a tracer runs before the load starts and after it ends: the
/// agent loads every process's unwind tables at the start (seconds of CPU
/// on a busy host), which is not the steady state the loads measure.
const MARGIN: u64 = 4;
/// Processes that may have programs on the scheduler tracepoints.
const OTHER_TRACERS: [&str; 4] = ["profiler-agent", "bpftrace", "perf", "offcputime"];
/// Off-CPU aggregation like the agent's, with tracepoints only (no
/// kprobes): at a blocking switch-out the stacks and time of the thread
/// leaving, at its switch-in the time blocked summed per (kernel, user)
/// stack. `{SECS}` is replaced by its run time.
const BPFTRACE_SCRIPT: &str = "tracepoint:sched:sched_switch { \
     if ((args->prev_state & 3) != 0) { @start[args->prev_pid] = nsecs; \
       @k[args->prev_pid] = kstack; @u[args->prev_pid] = ustack; } \
     $t = @start[args->next_pid]; \
     if ($t) { @off[@k[args->next_pid], @u[args->next_pid]] = sum(nsecs - $t); delete(@start[args->next_pid]); } } \
     interval:s:{SECS} { exit(); } END { clear(@start); clear(@k); clear(@u); clear(@off); }";

/// One tracer's run over one load.
pub struct Traced {
    pub load: LoadRun,
    pub m: Measured,
    /// Its user+sys CPU during the load, % of one core.
    pub cpu_during_load: Option<f64>,
    /// Its programs' BPF time during the load, ns.
    pub bpf_during_load: Option<u64>,
    /// Per program: (ns per run, runs), from the agent's summary.
    pub bpf: BTreeMap<String, (u64, u64)>,
}

impl Traced {
    /// BPF time during the load per context switch.
    pub fn bpf_ns_per_switch(&self) -> Option<f64> {
        Some(self.bpf_during_load? as f64 / self.load.switches.max(1) as f64)
    }

    /// Tracer CPU + BPF time during the load, % of one core.
    pub fn total_pct(&self) -> Option<f64> {
        Some(self.cpu_during_load? + self.bpf_during_load? as f64 / 1e9 / self.load.secs * 100.0)
    }
}

/// A load's phases in one round.
pub struct Phases {
    pub base: LoadRun,
    pub agent: Traced,
    /// The flat-out load under the agent with BPF statistics off, and
    /// whether they really were off: the sysctl may hold them on. (So may
    /// another process's BPF_ENABLE_STATS fd, which nothing shows; the
    /// check for other tracers names the usual holders.)
    pub agent_quiet: Option<(Traced, bool)>,
    pub bpftrace: Option<Traced>,
}

pub struct Round {
    /// By LOADS.
    pub loads: Vec<Phases>,
    pub overhead: Traced,
}

/// Where the loads run and how.
struct Plan {
    cpu: usize,
    other_cpu: Option<usize>,
    multisite: PathBuf,
    /// Server sleep unit giving the overhead run ~OVERHEAD_RATE switches/s.
    overhead_unit_us: u64,
    d: Duration,
}

impl Plan {
    fn run(&self, load: &str) -> Result<LoadRun> {
        match load {
            "max" => pingpong::run(self.cpu, 0, self.d),
            "multi" => multisite::run(&self.multisite, self.cpu, MULTI_UNIT_US, self.d),
            "overhead" => {
                let _spinner = self.other_cpu.map(multisite::Spinner::start).transpose()?;
                multisite::run(&self.multisite, self.cpu, self.overhead_unit_us, self.d)
            }
            _ => bail!("unknown load {load}"),
        }
    }
}

pub fn run(duration: u64, rounds: usize, sample: u32) -> Result<()> {
    ensure!(duration > 0, "--duration must be at least 1 second");
    ensure!(sample > 0, "--off-cpu-sample must be at least 1 (exact)");
    ensure!(rounds > 0, "--rounds must be at least 1");
    if !is_root() {
        bail!(
            "the offcpu bench traces the whole system and turns on the kernel's BPF statistics, which needs root; \
             run `sudo -E cargo xtask bench offcpu`"
        );
    }
    let agent = match std::env::var_os("PROFILER_BENCH_AGENT") {
        Some(p) => PathBuf::from(p),
        None => build::run(true)?,
    };
    let bpftrace = which("bpftrace");
    if bpftrace.is_some() {
        mount_tracefs();
    }
    let tmp = TmpDir::new()?;
    install_signal_handlers();
    let mut stats = Some(BpfStats::enable()?);
    let ncpu = thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = pingpong::last_cpu()?;
    let other_cpu = (cpu > 0).then(|| cpu - 1);
    let multisite = multisite::build(&tmp.0)?;

    step(format!("bench: calibrating the overhead run's service on CPU {cpu} to ~{OVERHEAD_RATE:.0} switches/s"));
    let (overhead_unit_us, rate) = multisite::calibrate(&multisite, cpu, other_cpu, OVERHEAD_RATE)?;
    step(format!(
        "bench: {overhead_unit_us} us units give the machine {rate:.0} switches/s; the overhead run uses them"
    ));
    let plan = Plan { cpu, other_cpu, multisite, overhead_unit_us, d: Duration::from_secs(duration) };
    let secs = (duration + 2 * MARGIN).to_string();

    let mut all = Vec::new();
    let mut others = BTreeSet::new();
    for round in 1..=rounds {
        let mut loads = Vec::new();
        for load in LOADS {
            step(format!("bench: round {round}/{rounds}, {load}: baseline"));
            note_other_tracers(&mut others);
            let base = plan.run(load)?;
            step(format!("bench: round {round}/{rounds}, {load}: profiler-agent record --off-cpu"));
            let agent_run = traced(
                agent_cmd(&agent, &tmp.0, round, load, "19", &secs, sample),
                "profiler-agent",
                "Recording",
                &tmp.0.join(format!("agent-{round}-{load}.log")),
                &plan,
                load,
            )?;
            let agent_quiet = if load == "max" {
                step(format!(
                    "bench: round {round}/{rounds}, {load}: profiler-agent record --off-cpu, BPF statistics off"
                ));
                drop(stats.take());
                let off = fs::read_to_string(BPF_STATS).is_ok_and(|v| v.trim() == "0");
                let run = traced(
                    agent_cmd(&agent, &tmp.0, round, "max-quiet", "19", &secs, sample),
                    "profiler-agent",
                    "Recording",
                    &tmp.0.join(format!("agent-{round}-{load}-quiet.log")),
                    &plan,
                    load,
                );
                stats = Some(BpfStats::enable()?);
                Some((run?, off))
            } else {
                None
            };
            let bpftrace_run = match &bpftrace {
                Some(bt) => {
                    step(format!("bench: round {round}/{rounds}, {load}: bpftrace"));
                    let mut cmd = Command::new(bt);
                    cmd.arg("-e").arg(BPFTRACE_SCRIPT.replace("{SECS}", &secs));
                    let log = tmp.0.join(format!("bpftrace-{round}-{load}.log"));
                    Some(traced(cmd, "bpftrace", "Attaching", &log, &plan, load)?)
                }
                None => None,
            };
            loads.push(Phases { base, agent: agent_run, agent_quiet, bpftrace: bpftrace_run });
        }
        step(format!("bench: round {round}/{rounds}: overhead run (99 Hz + off-CPU, CPU-bound process + service)"));
        let log = tmp.0.join(format!("agent-{round}-overhead.log"));
        let overhead = traced(
            agent_cmd(&agent, &tmp.0, round, "overhead", "99", &secs, sample),
            "profiler-agent",
            "Recording",
            &log,
            &plan,
            "overhead",
        )?;
        all.push(Round { loads, overhead });
    }
    note_other_tracers(&mut others);
    report::report(&all, ncpu, cpu, duration, bpftrace.is_some());
    match sample {
        1 => println!("Agent mode: exact (every block's stacks)."),
        n => println!("Agent mode: --off-cpu-sample {n} (stacks for one block in {n}, per-thread totals exact)."),
    }
    if !others.is_empty() {
        let mut list: Vec<String> = others.iter().take(5).cloned().collect();
        if others.len() > 5 {
            list.push(format!("{} more", others.len() - 5));
        }
        println!(
            "Warning: tracers not started by the bench ran during it: {}. Their BPF programs slow \
             every phase and add noise; rerun on a quiet machine.",
            list.join(", ")
        );
    }
    Ok(())
}

fn agent_cmd(agent: &Path, tmp: &Path, round: usize, load: &str, hz: &str, secs: &str, sample: u32) -> Command {
    let mut cmd = Command::new(agent);
    cmd.args(["record", "--off-cpu", "--frequency", hz, "--format", "folded"])
        .args(["--duration", secs, "-o"])
        .arg(tmp.join(format!("agent-{round}-{load}")));
    // Only when sampling: an older agent (`PROFILER_BENCH_AGENT`, for
    // before/after figures) has no such flag.
    if sample > 1 {
        cmd.args(["--off-cpu-sample", &sample.to_string()]);
    }
    cmd
}

/// bpftrace's tracepoints need tracefs; mount it where it is missing.
fn mount_tracefs() {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return;
    }
    let ok = Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]).status();
    if !ok.is_ok_and(|s| s.success()) {
        step("bench: warning: mounting tracefs at /sys/kernel/tracing failed; bpftrace may not attach");
    }
}

/// Starts `cmd` (a tracer that stops by itself), waits until its log shows
/// `ready`, waits MARGIN, runs `load`, and collects what the tracer cost.
fn traced(cmd: Command, name: &'static str, ready: &str, log: &Path, plan: &Plan, load: &str) -> Result<Traced> {
    let _ = fs::remove_file(log);
    let secs = plan.d.as_secs() + 2 * MARGIN;
    thread::scope(|s| {
        let tracer = s.spawn(|| measure(cmd, name, log, secs, true));
        let joined = |t: thread::ScopedJoinHandle<'_, Result<Measured>>| {
            t.join().unwrap_or_else(|_| bail!("the thread measuring {name} panicked"))
        };
        let started = Instant::now();
        while !fs::read_to_string(log).is_ok_and(|t| t.contains(ready)) {
            if tracer.is_finished() || interrupted() || started.elapsed() > Duration::from_secs(60) {
                let m = joined(tracer)?;
                let out = fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "{name} never printed {ready:?} (ran {:.1} s); its output:\n{}",
                    m.wall.as_secs_f64(),
                    out.trim_end()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        let pid = child_pid(name);
        thread::sleep(Duration::from_secs(MARGIN));
        let t0 = Instant::now();
        let (cpu0, bpf0) = (pid.and_then(cpu_ticks), pid.and_then(bpf_time));
        let run = plan.run(load);
        let (cpu1, bpf1) = (pid.and_then(cpu_ticks), pid.and_then(bpf_time));
        let wall = t0.elapsed().as_secs_f64();
        let m = joined(tracer)?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu_during_load = cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a) as f64 / hz / wall * 100.0);
        let bpf_during_load = bpf0.zip(bpf1).map(|(a, b)| b.saturating_sub(a));
        let text = fs::read_to_string(log).unwrap_or_default();
        Ok(Traced { load: run?, m, cpu_during_load, bpf_during_load, bpf: bpf_time_per_run(&text) })
    })
}

/// (pid, parent pid, comm) of every process.
fn processes() -> Vec<(u32, u32, String)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, head.split_once('(')?.1.to_owned()))
        })
        .collect()
}

/// The pid of our child process called `comm`.
fn child_pid(comm: &str) -> Option<u32> {
    let me = std::process::id();
    processes().into_iter().find_map(|(pid, ppid, c)| (ppid == me && c == comm).then_some(pid))
}

/// Adds to `seen` the tracers running that the bench did not start: their
/// programs on the scheduler tracepoints would slow every phase.
fn note_other_tracers(seen: &mut BTreeSet<String>) {
    let me = std::process::id();
    for (pid, ppid, comm) in processes() {
        if ppid != me && OTHER_TRACERS.contains(&comm.as_str()) {
            seen.insert(format!("{comm} ({pid})"));
        }
    }
}

/// utime + stime of all threads of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the comm: state is field 3, utime 14 and stime 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Sum of `run_time_ns` over the BPF programs `pid` holds fds of.
fn bpf_time(pid: u32) -> Option<u64> {
    let dir = fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let mut ids = BTreeMap::new();
    for entry in dir.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else { continue };
        if !info.lines().any(|l| l.starts_with("prog_type:")) {
            continue;
        }
        let field =
            |key: &str| info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(id), Some(ns)) = (field("prog_id:"), field("run_time_ns:")) {
            ids.insert(id, ns);
        }
    }
    (!ids.is_empty()).then(|| ids.values().sum())
}

/// Parses "BPF time per run: sched_switch 1367 ns x 725297, ...": program
/// (without the `_raw` of the raw-tracepoint fallback) -> (ns, runs).
fn bpf_time_per_run(log: &str) -> BTreeMap<String, (u64, u64)> {
    let Some(line) = log.lines().find_map(|l| l.strip_prefix("BPF time per run:")) else {
        return BTreeMap::new();
    };
    line.trim()
        .trim_end_matches('.')
        .split(", ")
        .filter_map(|item| {
            let mut w = item.split_whitespace();
            let name = w.next()?;
            let ns = w.next()?.parse().ok()?;
            let runs = w.nth(2)?.parse().ok()?;
            Some((name.trim_end_matches("_raw").to_owned(), (ns, runs)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_agents_bpf_line() {
        let log = "Scheduler: 5 switches\nBPF time per run: on_cpu_sample 1383 ns x 1275, \
                   sched_wakeup 206 ns x 363093, sched_switch_raw 1367 ns x 725297.\nWrote x\n";
        let bpf = bpf_time_per_run(log);
        assert_eq!(bpf.get("on_cpu_sample"), Some(&(1383, 1275)));
        assert_eq!(bpf.get("sched_switch"), Some(&(1367, 725297)));
        let per = report::ns_per_switch(&bpf).unwrap();
        assert!((per - (1367.0 + 206.0 * 363093.0 / 725297.0)).abs() < 0.01, "{per}");
        assert!(bpf_time_per_run("nothing").is_empty());
    }

    #[test]
    fn own_bpf_time_is_read_from_fdinfo() {
        // The bench process holds no programs: no figure rather than 0.
        assert_eq!(bpf_time(std::process::id()), None);
    }
}
