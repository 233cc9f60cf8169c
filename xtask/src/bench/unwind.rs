//! `cargo xtask bench unwind`: what CFI (.eh_frame) unwinding of user stacks
//! costs, against the kernel's frame-pointer walk.
//!
//! Method. The workload (unwind/deep.c) is C built with `gcc -O2
//! -fomit-frame-pointer` (checked with objdump: no function of it sets up
//! %rbp): one thread per CPU, each recursing 64 noinline frames deep (every
//! level uses its callee's result, so there are no tail calls) and spinning
//! at the bottom, so nearly every sample has ~68 user frames that only CFI
//! can walk. Each round runs `profiler-agent record --pid <workload> -F 99
//! --unwinder cfi`, the same with `--unwinder frame-pointer` on the same
//! running workload, and a calibration run (`--pid` of a sleeping process);
//! the bench keeps the kernel's BPF statistics on, so each run's summary
//! has `on_cpu_sample`'s run_time_ns / run_cnt.
//!
//! That per-run figure averages over every run of the program, and on a
//! shared machine many runs land on other processes (counted as "other
//! processes (--pid filter)" in the summary), which the program leaves
//! after a hash lookup; on a VM with cold caches that still costs ~1 us.
//! So the bench also reports the time per unwind: the run's total minus its
//! idle and filtered runs at the calibration run's cost per run, divided by
//! the runs that took a stack. The machine may be noisy, so the cfi /
//! frame-pointer ratio is taken within each round and its median reported,
//! with the medians of the absolute figures. The mean user-stack depth per
//! sample, counted in each run's cpu.folded, shows what each unwinder walked.
//!
//! Table building: the `Unwind tables built:` line of the CFI runs (time and
//! ms per MB of CFI). libc's own build time is the criterion bench's job
//! (`cargo bench -p profiler-agent --bench unwind_table`); here it is only
//! estimated from the per-MB rate and libc's .eh_frame size.
//!
//! Map memory: a small C++ program (unwind/service.cpp, `g++ -O2`, with
//! std::string, std::vector and iostream, so libstdc++.so.6 is mapped, as
//! /proc/PID/maps must show) is recorded once with `--pid`, and its
//! `Unwind tables:` line gives the files, rows and bytes of table memory; the
//! process's own entries (a 40-byte slot per executable mapping, vDSO
//! included, and its 8-byte key and value) are added to the total.

pub(super) mod agent;
mod workload;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use anyhow::{bail, ensure, Context as _, Result};

use super::{
    measure::{install_signal_handlers, measure},
    BpfStats, TmpDir,
};
use crate::{build, is_root, step};
use agent::{Cfi, Depth, Dropped, RunTime};
use workload::{Workload, DEEP_EXTRA, DEPTH};

/// Debian's interpreter: stripped, no frame pointers, and a 65k-row table,
/// where the search of big tables shows (the C workload's own table is tiny).
const PYTHON: &str = "/usr/bin/python3";
/// Recurses 40 Python calls deep (which CPython 3.11 runs inside one
/// native frame) and spins.
const PYTHON_LOOP: &str = "def f(n):\n    if n == 0:\n        while True: pass\n    return f(n - 1)\nf(40)";

/// 30 Python calls deep, spinning: the Python walk's cost (part 5).
const PYTHON_30: &str = "def f(n):\n    if n == 0:\n        while True: pass\n    return f(n - 1)\nf(30)";
/// Target: BPF time per sample with the Python walk at most this many
/// times the native walk alone on the same stack.
const TARGET_PYTHON_RATIO: f64 = 2.0;

/// Sampling frequency of every run.
const HZ: u32 = 99;
/// Target: BPF time per sample when the unwinder walks 64 frames.
const TARGET_NS_PER_UNWIND: f64 = 10_000.0;
/// Target for building libc's table, checked by the agent's criterion bench.
const TARGET_LIBC_BUILD_MS: f64 = 5.0;
/// Kernel map memory per process besides the tables: a `Mapping` slot per
/// executable mapping, and its key and value in the process map.
const MAPPING_SLOT_BYTES: u64 = 40;
const PROCESS_KEY_VALUE_BYTES: u64 = 16;

fn process_entry_bytes(executable_mappings: usize) -> u64 {
    MAPPING_SLOT_BYTES * executable_mappings as u64 + PROCESS_KEY_VALUE_BYTES
}

#[derive(Clone, Copy, PartialEq)]
enum Unwinder {
    Cfi,
    FramePointer,
}

impl Unwinder {
    fn flag(self) -> &'static str {
        match self {
            Unwinder::Cfi => "cfi",
            Unwinder::FramePointer => "frame-pointer",
        }
    }
}

/// What one `record` run reported.
struct Run {
    bpf: RunTime,
    dropped: Dropped,
    /// Of the workload's cpu.folded (empty for the calibration run).
    depth: Depth,
    /// The CFI summary lines (CFI runs only).
    cfi: Option<Cfi>,
    /// The agent's user+sys CPU over the run, in % of one core.
    cpu_pct: f64,
}

impl Run {
    fn total_ns(&self) -> f64 {
        self.bpf.ns_per_run as f64 * self.bpf.runs as f64
    }

    /// Runs that returned without taking a stack.
    fn cheap_runs(&self) -> u64 {
        self.dropped.idle + self.dropped.filtered
    }

    /// Runs that took a stack (of the workload).
    fn unwinds(&self) -> u64 {
        self.bpf.runs.saturating_sub(self.cheap_runs())
    }

    /// BPF time per unwind: the total less the cheap runs at `cheap_ns` each.
    fn ns_per_unwind(&self, cheap_ns: f64) -> f64 {
        match self.unwinds() {
            0 => f64::NAN,
            n => (self.total_ns() - cheap_ns * self.cheap_runs() as f64) / n as f64,
        }
    }
}

struct Round {
    cfi: Run,
    fp: Run,
    /// Debian's python3 (a big, stripped binary without frame pointers)
    /// under both unwinders, when it is installed.
    python: Option<(Run, Run)>,
    /// python3 30 Python calls deep, CFI unwinder, with the Python walk and
    /// without it (`PROFILER_PYTHON_FRAMES=off`).
    python_walk: Option<(Run, Run)>,
    /// `--pid` of a sleeping process: every run is idle or filtered.
    calibration: Run,
}

impl Round {
    fn cheap_ns(&self) -> f64 {
        self.calibration.bpf.ns_per_run as f64
    }
}

/// What every run shares.
struct Plan {
    agent: PathBuf,
    dir: PathBuf,
    duration: u64,
}

pub fn run(duration: u64, rounds: usize) -> Result<()> {
    ensure!(duration > 0, "--duration must be at least 1 second");
    ensure!(rounds > 0, "--rounds must be at least 1");
    if !is_root() {
        bail!(
            "the unwind bench loads the agent's eBPF programs and turns on the kernel's BPF statistics, which \
             needs root; run `sudo -E cargo xtask bench unwind`"
        );
    }
    let agent = build::run(true)?;
    let tmp = TmpDir::new()?;
    install_signal_handlers();
    let _stats = BpfStats::enable()?;
    let ncpu = thread::available_parallelism().map_or(1, |n| n.get());
    let plan = Plan { agent, dir: tmp.0.clone(), duration };

    step("bench: building the workloads");
    let deep_bin = workload::build(&tmp.0, "uw-deep", "c", workload::DEEP_C, ("CC", "gcc"), workload::DEEP_FLAGS)?;
    workload::check_no_frame_pointer(&deep_bin)?;
    let service_bin =
        workload::build(&tmp.0, "uw-service", "cpp", workload::SERVICE_CPP, ("CXX", "g++"), workload::SERVICE_FLAGS)?;

    step(format!("bench: starting uw-deep with {ncpu} threads, and a sleeping process for the calibration runs"));
    let mut deep = Workload::start(&deep_bin, "uw-deep", &[ncpu.to_string()])?;
    let mut sleeper = Workload::start(Path::new("sleep"), "sleep", &["1000000".to_owned()])?;
    let libc = deep.code_files()?.into_iter().find(|f| file_name(f).starts_with("libc.so"));

    let mut all = Vec::new();
    for round in 1..=rounds {
        let run = |w: &mut Workload, unwinder: Unwinder, what: &str, tag: &str| {
            step(format!("bench: round {round}/{rounds}: {what} for {duration} s"));
            plan.record(w, unwinder, &format!("{tag}-{round}"))
        };
        let cfi = run(&mut deep, Unwinder::Cfi, "record --unwinder cfi", "cfi")?;
        let fp = run(&mut deep, Unwinder::FramePointer, "record --unwinder frame-pointer", "fp")?;
        let calibration = run(&mut sleeper, Unwinder::FramePointer, "calibration: record --pid <sleep>", "calib")?;
        all.push(Round { cfi, fp, calibration, python: None, python_walk: None });
    }
    drop(deep);

    // python3 alone afterwards, so it does not take CPU from uw-deep's runs.
    if Path::new(PYTHON).exists() {
        let mut py = Workload::start(Path::new(PYTHON), "python3", &["-c".to_owned(), PYTHON_LOOP.to_owned()])?;
        for (i, r) in all.iter_mut().enumerate() {
            let round = i + 1;
            step(format!("bench: python3 round {round}/{rounds}: record --unwinder cfi, then frame-pointer"));
            let cfi = plan.record(&mut py, Unwinder::Cfi, &format!("py-cfi-{round}"))?;
            let fp = plan.record(&mut py, Unwinder::FramePointer, &format!("py-fp-{round}"))?;
            r.python = Some((cfi, fp));
        }
        drop(py);
        let mut py = Workload::start(Path::new(PYTHON), "python3", &["-c".to_owned(), PYTHON_30.to_owned()])?;
        for (i, r) in all.iter_mut().enumerate() {
            let round = i + 1;
            step(format!("bench: python3 (30 deep) round {round}/{rounds}: with the Python walk, then without"));
            let walk = plan.record_env(&mut py, Unwinder::Cfi, &format!("py-walk-{round}"), &[])?;
            let native = plan.record_env(
                &mut py,
                Unwinder::Cfi,
                &format!("py-native-{round}"),
                &[("PROFILER_PYTHON_FRAMES", "off")],
            )?;
            r.python_walk = Some((walk, native));
        }
    } else {
        step(format!("bench: {PYTHON} is not installed (apt-get install python3); skipping its runs"));
    }
    drop(sleeper);

    step("bench: starting uw-service (glibc + libstdc++)");
    let mut service = Workload::start(&service_bin, "uw-service", &[])?;
    let files = service.code_files()?;
    for lib in ["libstdc++.so.6", "libc.so.6"] {
        ensure!(
            files.iter().any(|f| file_name(f).starts_with(lib)),
            "uw-service does not map {lib}; /proc/{}/maps has: {}",
            service.pid(),
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    step(format!("bench: record --unwinder cfi --pid <uw-service> for {duration} s"));
    let svc = plan.record(&mut service, Unwinder::Cfi, "service-cfi")?;
    drop(service);

    report(&all, &svc, &files, libc.as_deref(), ncpu, duration);
    Ok(())
}

impl Plan {
    /// `record --pid <w> --unwinder <unwinder>` for `duration`, and what it
    /// reported. Only the sleeping process may give no samples.
    fn record(&self, w: &mut Workload, unwinder: Unwinder, tag: &str) -> Result<Run> {
        self.record_env(w, unwinder, tag, &[])
    }

    /// [`record`](Self::record) with extra environment variables for the agent.
    fn record_env(&self, w: &mut Workload, unwinder: Unwinder, tag: &str, env: &[(&str, &str)]) -> Result<Run> {
        w.check()?;
        let out = self.dir.join(tag);
        let log = self.dir.join(format!("{tag}.log"));
        let mut cmd = Command::new(&self.agent);
        cmd.args(["record", "--pid", &w.pid().to_string(), "--duration", &self.duration.to_string()])
            .args(["--frequency", &HZ.to_string(), "--format", "folded", "--unwinder", unwinder.flag(), "-o"])
            .arg(&out)
            .env_remove("PROFILER_LOG")
            .envs(env.iter().copied());
        let what = || format!("recording {} with --unwinder {}", w.name, unwinder.flag());
        let m = measure(cmd, "profiler-agent record", &log, self.duration, false).with_context(what)?;
        let text = fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
        let bpf = agent::sample_run_time(&text).with_context(what)?;
        let dropped = agent::dropped(&text).with_context(what)?;
        let cfi = match unwinder {
            Unwinder::Cfi => Some(agent::cfi_lines(&text).with_context(what)?),
            Unwinder::FramePointer => None,
        };
        let depth = agent::folded_depth(&out, DEPTH).with_context(what)?;
        let sleeping = w.name == "sleep";
        ensure!(
            sleeping || depth.samples > 0,
            "{}: the agent recorded no samples of {}:\n{}",
            what(),
            w.name,
            agent::tail(&text)
        );
        w.check()?;
        let cpu_pct = m.cpu.as_secs_f64() / m.wall.as_secs_f64().max(1e-9) * 100.0;
        Ok(Run { bpf, dropped, depth, cfi, cpu_pct })
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn each(v: &[f64], prec: usize) -> String {
    let s: Vec<String> = v.iter().map(|x| format!("{x:.prec$}")).collect();
    s.join(" ")
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn report(rounds: &[Round], svc: &Run, svc_files: &[PathBuf], libc: Option<&Path>, ncpu: usize, duration: u64) {
    report_unwinding(rounds, ncpu, duration);
    println!();
    report_build(rounds, svc, libc);
    println!();
    report_memory(rounds, svc, svc_files);
    report_python(rounds);
    report_python_walk(rounds);
}

/// Part 1: BPF time per sample, cfi against frame-pointer.
fn report_unwinding(rounds: &[Round], ncpu: usize, duration: u64) {
    let n = rounds.len();
    let frames = DEPTH + DEEP_EXTRA;
    println!();
    println!(
        "1. BPF time per sample, CFI against frame-pointer unwinding: uw-deep (gcc -O2 -fomit-frame-pointer, \
         {ncpu} threads, each {DEPTH} levels deep + burn, worker, start_thread, clone3 = {frames} user frames) on \
         {ncpu} CPUs, `record --pid` at {HZ} Hz, {duration} s per run, {n} round{} of cfi, frame-pointer, \
         calibration; medians, per-round values in brackets.",
        if n == 1 { "" } else { "s" }
    );
    println!(
        "{:<14} {:>10} {:>10} {:>6} {:>8} {:>6} {:>8} {:>8} {:>7} {:>8}",
        "run",
        "BPF ns/run",
        "ns/unwind",
        "runs",
        "unwinds",
        "wl %",
        "samples",
        "u.frames",
        format!(">={DEPTH} %"),
        "agent %"
    );
    type Pick = fn(&Round) -> &Run;
    let sides: [(&str, Pick); 3] =
        [("cfi", |r| &r.cfi), ("frame-pointer", |r| &r.fp), ("calibration", |r| &r.calibration)];
    for (name, pick) in sides {
        let col = |f: &dyn Fn(&Round, &Run) -> f64| median(rounds.iter().map(|r| f(r, pick(r))).collect());
        let ns: Vec<f64> = rounds.iter().map(|r| pick(r).bpf.ns_per_run as f64).collect();
        let per_unwind: Vec<f64> = rounds.iter().map(|r| pick(r).ns_per_unwind(r.cheap_ns())).collect();
        let samples = |v: f64| if name == "calibration" { "-".to_owned() } else { format!("{v:.1}") };
        println!(
            "{:<14} {:>10.0} {:>10} {:>6.0} {:>8.0} {:>6.1} {:>8.0} {:>8} {:>7} {:>8.2}  [{}{}]",
            name,
            median(ns.clone()),
            if name == "calibration" { "-".to_owned() } else { format!("{:.0}", median(per_unwind.clone())) },
            col(&|_, r| r.bpf.runs as f64),
            col(&|_, r| r.unwinds() as f64),
            col(&|_, r| r.unwinds() as f64 / r.bpf.runs.max(1) as f64 * 100.0),
            col(&|_, r| r.depth.samples as f64),
            samples(col(&|_, r| r.depth.mean)),
            samples(col(&|_, r| r.depth.deep as f64 / r.depth.samples.max(1) as f64 * 100.0)),
            col(&|_, r| r.cpu_pct),
            each(&ns, 0),
            if name == "calibration" { String::new() } else { format!("; {}", each(&per_unwind, 0)) }
        );
    }
    println!(
        "BPF ns/run: run_time_ns / run_cnt of {} over all its runs (kernel BPF statistics, from the agent's \
         summary). ns/unwind: per run that took a stack (unwinds: runs less the summary's idle and --pid-filtered \
         ones; wl %: their share), the filtered runs charged at the same round's calibration ns/run, a run with \
         --pid of a sleeping process. samples: in cpu.folded; u.frames: mean user frames per sample there \
         (kernel and inlined frames not counted); >={DEPTH} %: samples with at least {DEPTH}. agent %: the \
         agent's user+sys CPU, % of one core. Expected runs per run: about {HZ} Hz x {ncpu} CPUs x {duration} s \
         = {}.",
        agent::PROGRAM,
        HZ as u64 * ncpu as u64 * duration
    );
    let per_round = |f: &dyn Fn(&Round) -> f64| -> Vec<f64> { rounds.iter().map(f).collect() };
    let ratios = per_round(&|r| r.cfi.ns_per_unwind(r.cheap_ns()) / r.fp.ns_per_unwind(r.cheap_ns()));
    let raw_ratios = per_round(&|r| r.cfi.bpf.ns_per_run as f64 / r.fp.bpf.ns_per_run.max(1) as f64);
    let per_frame = per_round(&|r| {
        (r.cfi.ns_per_unwind(r.cheap_ns()) - r.fp.ns_per_unwind(r.cheap_ns())) / (r.cfi.depth.mean - r.fp.depth.mean)
    });
    println!(
        "Ratio cfi / frame-pointer per unwind: {:.2} [{}]; per run (diluted by the filtered runs): {:.2} [{}]. \
         Extra BPF time per extra frame walked: {:.0} ns [{}].",
        median(ratios.clone()),
        each(&ratios, 2),
        median(raw_ratios.clone()),
        each(&raw_ratios, 2),
        median(per_frame.clone()),
        each(&per_frame, 0)
    );
    let mut u = agent::Unwinding::default();
    let mut lost = 0;
    for r in rounds {
        lost += r.cfi.dropped.samples + r.fp.dropped.samples;
        let Some(c) = r.cfi.cfi else { continue };
        let w = c.unwinding;
        u.complete += w.complete;
        u.partial += w.partial;
        u.outside_mappings += w.outside_mappings;
        u.without_table += w.without_table;
        u.unsupported += w.unsupported;
        u.read_fault += w.read_fault;
        u.depth_limit += w.depth_limit;
    }
    println!(
        "The cfi runs' `Unwinding:` lines, summed: {} user stacks complete, {} partly by frame pointer ({} frames \
         outside known mappings, {} without a table); stopped early: {} unsupported rule, {} read fault, {} depth \
         limit.",
        u.complete, u.partial, u.outside_mappings, u.without_table, u.unsupported, u.read_fault, u.depth_limit
    );
    if lost > 0 {
        println!("Note: {lost} samples were taken but dropped (ring buffer or aggregation table full) in these runs.");
    }
    let cfi_ns = median(per_round(&|r| r.cfi.ns_per_unwind(r.cheap_ns())));
    let walk_ns = median(per_round(&|r| r.cfi.ns_per_unwind(r.cheap_ns()) - r.fp.ns_per_unwind(r.cheap_ns())));
    let cfi_raw = median(per_round(&|r| r.cfi.bpf.ns_per_run as f64));
    let cfi_depth = median(per_round(&|r| r.cfi.depth.mean));
    let target = TARGET_NS_PER_UNWIND / 1000.0;
    let ok = if cfi_depth < DEPTH as f64 {
        format!("NOT met: the cfi runs walked only {cfi_depth:.1} user frames per sample, not ~{frames}")
    } else if !cfi_ns.is_finite() {
        "not measured: no unwinds".to_owned()
    } else {
        verdict(cfi_ns <= TARGET_NS_PER_UNWIND).to_owned()
    };
    println!(
        "Target: <= {target:.0} us of BPF time per {DEPTH}-frame unwind: {:.2} us per unwind with cfi ({:.2} us \
         per run), {cfi_depth:.1} user frames per sample ({ok}). Of it, {:.2} us is more than the frame-pointer \
         run's (the CFI walk); the rest is the sample's fixed cost (filter, kernel stack, ring buffer).",
        cfi_ns / 1000.0,
        cfi_raw / 1000.0,
        walk_ns / 1000.0
    );
}

/// Part 2: table build time.
fn report_build(rounds: &[Round], svc: &Run, libc: Option<&Path>) {
    let built: Vec<agent::Built> = rounds.iter().filter_map(|r| r.cfi.cfi.map(|c| c.built)).collect();
    let per_mb: Vec<f64> = built.iter().map(|b| b.ms_per_mb).collect();
    let deep_per_mb = median(per_mb.clone());
    let b = |f: fn(&agent::Built) -> f64| median(built.iter().map(f).collect());
    println!(
        "2. Table build time (the agent's `Unwind tables built:` line). uw-deep's cfi runs, medians: {:.0} tables \
         for {:.0} process(es) in {:.1} ms, {deep_per_mb:.1} ms per MB of CFI [{}]; {:.0} files without usable \
         CFI, {:.0} requests dropped.",
        b(|b| b.tables as f64),
        b(|b| b.processes as f64),
        b(|b| b.ms),
        each(&per_mb, 1),
        b(|b| b.without_cfi as f64),
        b(|b| b.dropped as f64),
    );
    if let Some(c) = &svc.cfi {
        let b = c.built;
        println!(
            "   uw-service: {} tables for {} process(es) in {:.1} ms, {:.1} ms per MB of CFI; {} files without \
             usable CFI, {} requests dropped.",
            b.tables, b.processes, b.ms, b.ms_per_mb, b.without_cfi, b.dropped
        );
    }
    match libc.and_then(|p| Some((p, workload::section_size(p, ".eh_frame")?))) {
        Some((path, bytes)) if deep_per_mb.is_finite() => println!(
            "   {} has {:.3} MB of .eh_frame: at uw-deep's {deep_per_mb:.1} ms per MB, about {:.1} ms to build \
             (an estimate: the per-MB rate also spreads each file's fixed cost, and the table thread competes \
             for the CPUs with the workload).",
            path.display(),
            bytes as f64 / 1e6,
            deep_per_mb * bytes as f64 / 1e6
        ),
        _ => println!("   (libc's .eh_frame size could not be read; no estimate of its build time)"),
    }
    println!(
        "   Target: <= {TARGET_LIBC_BUILD_MS} ms to build libc's table: measured by the agent's criterion bench, \
         `cargo bench -p profiler-agent --bench unwind_table`, not by this one."
    );
}

/// Part 3: map memory of a glibc + libstdc++ process.
/// Part 4: the same comparison on Debian's python3.
fn report_python(rounds: &[Round]) {
    let pairs: Vec<(&Run, &Run, f64)> =
        rounds.iter().filter_map(|r| r.python.as_ref().map(|(c, f)| (c, f, r.cheap_ns()))).collect();
    if pairs.is_empty() {
        return;
    }
    let cfi: Vec<f64> = pairs.iter().map(|(c, _, cheap)| c.ns_per_unwind(*cheap)).collect();
    let fp: Vec<f64> = pairs.iter().map(|(_, f, cheap)| f.ns_per_unwind(*cheap)).collect();
    let frames: Vec<f64> = pairs.iter().map(|(c, f, _)| c.depth.mean - f.depth.mean).collect();
    let per_frame: Vec<f64> = cfi.iter().zip(&fp).zip(&frames).map(|((c, f), n)| (c - f) / n.max(1.0)).collect();
    println!(
        "4. Debian's python3 (stripped, no frame pointers; 40 Python calls deep in a busy loop), ns per unwind, \
         medians: cfi {:.0} [{}] at {:.1} user frames per sample, frame-pointer {:.0} [{}] at {:.1}; \
         extra BPF time per extra frame walked: {:.0} ns [{}].",
        median(cfi.clone()),
        each(&cfi, 0),
        pairs[pairs.len() - 1].0.depth.mean,
        median(fp.clone()),
        each(&fp, 0),
        pairs[pairs.len() - 1].1.depth.mean,
        median(per_frame.clone()),
        each(&per_frame, 0)
    );
}

/// Part 5: what the Python walk adds, on the same python3 process.
fn report_python_walk(rounds: &[Round]) {
    let pairs: Vec<(&Run, &Run, f64)> =
        rounds.iter().filter_map(|r| r.python_walk.as_ref().map(|(w, n)| (w, n, r.cheap_ns()))).collect();
    if pairs.is_empty() {
        return;
    }
    let walk: Vec<f64> = pairs.iter().map(|(w, _, cheap)| w.ns_per_unwind(*cheap)).collect();
    let native: Vec<f64> = pairs.iter().map(|(_, n, cheap)| n.ns_per_unwind(*cheap)).collect();
    let ratios: Vec<f64> = walk.iter().zip(&native).map(|(w, n)| w / n).collect();
    let ratio = median(ratios.clone());
    println!(
        "5. Python walk, python3 30 Python calls deep: ns per sample, medians: with the walk {:.0} [{}] at {:.1} \
         frames per sample, native only {:.0} [{}] at {:.1}; ratio {:.2} [{}] (target <= {TARGET_PYTHON_RATIO}: {}).",
        median(walk.clone()),
        each(&walk, 0),
        pairs[pairs.len() - 1].0.depth.mean,
        median(native.clone()),
        each(&native, 0),
        pairs[pairs.len() - 1].1.depth.mean,
        ratio,
        each(&ratios, 2),
        verdict(ratio <= TARGET_PYTHON_RATIO)
    );
}

fn report_memory(rounds: &[Round], svc: &Run, svc_files: &[PathBuf]) {
    let names: Vec<String> = svc_files.iter().map(|f| file_name(f)).collect();
    if let Some(c) = &svc.cfi {
        let t = c.tables;
        // One executable mapping per file, plus the vDSO.
        let entry = process_entry_bytes(svc_files.len() + 1);
        let total = t.bytes + entry;
        println!(
            "3. Map memory for uw-service (g++ -O2; maps {}): {} files, {} rows, {} bytes ({:.2} MiB) of unwind \
             table map memory (budget {} bytes, {:.0} MiB; {} evicted), + {entry} bytes for the \
             process's mapping slots and entry = {total} bytes ({:.2} MiB) in all.",
            names.join(", "),
            t.files,
            t.rows,
            t.bytes,
            mib(t.bytes),
            t.budget,
            mib(t.budget),
            t.evicted,
            mib(total)
        );
        println!(
            "   Its cfi run: {} BPF ns per run, {:.1} user frames per sample ({} samples).",
            svc.bpf.ns_per_run, svc.depth.mean, svc.depth.samples
        );
    }
    if let Some(t) = rounds.iter().filter_map(|r| r.cfi.cfi.map(|c| c.tables)).next_back() {
        println!(
            "   For comparison, uw-deep (glibc only): {} files, {} rows, {} bytes ({:.2} MiB) of table memory, {} \
             bytes with its mapping slots and entry.",
            t.files,
            t.rows,
            t.bytes,
            mib(t.bytes),
            // Its executable, libc, ld.so and the vDSO.
            t.bytes + process_entry_bytes(4)
        );
    }
}
