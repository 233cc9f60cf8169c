//! `cargo xtask bench offcpu`: what `record --off-cpu` costs a
//! context-switch-heavy load. The load is a pipe ping-pong (see pingpong.rs),
//! run flat out ("max") and slowed by busy work to about 100k switches/s
//! ("paced"). Each round runs both loads alone (baseline), then under
//! `profiler-agent record --off-cpu` system-wide, then under an equivalent
//! bpftrace script if bpftrace is installed; the report gives medians over
//! the rounds. Per-program BPF cost comes from the agent's own end-of-run
//! line "BPF time per run: ..." (the bench keeps BPF statistics on), agent
//! CPU from wait4's rusage (whole run) and /proc/PID/stat (during the loads).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};

use super::{
    measure::{install_signal_handlers, interrupted, measure, Measured},
    pingpong::{self, LoadRun},
    which, BpfStats, TmpDir,
};
use crate::{build, is_root, step};

mod report;

/// Targets: BPF ns per switch event, and throughput loss at this switch rate.
const TARGET_NS_PER_SWITCH: f64 = 300.0;
const TARGET_LOSS_PCT: f64 = 3.0;
const TARGET_RATE: f64 = 100_000.0;
const LOADS: [&str; 2] = ["max", "paced"];
/// Seconds a tracer runs before the loads start and after they end.
const MARGIN: u64 = 1;
/// Processes that may have programs on the scheduler tracepoints.
const OTHER_TRACERS: [&str; 4] = ["profiler-agent", "bpftrace", "perf", "offcputime"];
/// Off-CPU aggregation like the agent's: time blocked, summed per kernel +
/// user stack of the thread that blocked. `{SECS}` is replaced by its run time.
const BPFTRACE_SCRIPT: &str = "tracepoint:sched:sched_switch { @start[tid] = nsecs; } \
     kprobe:finish_task_switch* { $t = @start[tid]; if ($t) { @off[kstack, ustack] = sum(nsecs - $t); delete(@start[tid]); } } \
     interval:s:{SECS} { exit(); } END { clear(@start); clear(@off); }";

/// One tracer's part of one round.
struct Traced {
    loads: Vec<LoadRun>,
    m: Measured,
    /// Its user+sys CPU time during the loads, in % of one core.
    cpu_during_load: Option<f64>,
    /// Per program: (ns per run, runs), from the agent's summary.
    bpf: BTreeMap<String, (u64, u64)>,
}

/// Where and how long the loads run, and how long a tracer runs around them.
struct Plan {
    cpu: usize,
    /// Spin iterations per hop of each load in LOADS.
    works: [u64; 2],
    d: Duration,
    traced_secs: u64,
}

struct Round {
    base: Vec<LoadRun>,
    agent: Traced,
    bpftrace: Option<Traced>,
}

pub fn run(duration: u64, rounds: usize) -> Result<()> {
    ensure!(duration > 0, "--duration must be at least 1 second");
    ensure!(rounds > 0, "--rounds must be at least 1");
    if !is_root() {
        bail!(
            "the offcpu bench traces the whole system and turns on the kernel's BPF statistics, which needs root; \
             run `sudo -E cargo xtask bench offcpu`"
        );
    }
    let agent = build::run(true)?;
    let bpftrace = which("bpftrace");
    let tmp = TmpDir::new()?;
    install_signal_handlers();
    let _stats = BpfStats::enable()?;
    let ncpu = thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = pingpong::last_cpu()?;

    step(format!("bench: calibrating the ping-pong on CPU {cpu}"));
    let probe = pingpong::run(cpu, 0, Duration::from_secs(2))?;
    let ns_per_iter = pingpong::spin_ns_per_iter(cpu)?;
    let switches_per_rt = probe.switches as f64 / probe.round_trips.max(1) as f64;
    let rt_ns = 1e9 / probe.round_trips_per_sec();
    let paced_rt_ns = switches_per_rt / TARGET_RATE * 1e9;
    let work = ((paced_rt_ns - rt_ns) / 2.0 / ns_per_iter).max(0.0) as u64;
    step(format!(
        "bench: max: {:.0} round trips/s, {switches_per_rt:.2} switches each; paced: {work} spins ({:.1} us) per hop",
        probe.round_trips_per_sec(),
        work as f64 * ns_per_iter / 1e3
    ));
    let plan = Plan {
        cpu,
        works: [0, work],
        d: Duration::from_secs(duration),
        traced_secs: LOADS.len() as u64 * duration + 2 * MARGIN,
    };
    let secs = plan.traced_secs.to_string();

    let mut all = Vec::new();
    let mut others = BTreeSet::new();
    for round in 1..=rounds {
        step(format!("bench: round {round}/{rounds}: baseline"));
        note_other_tracers(&mut others);
        let base = run_loads(&plan)?;
        note_other_tracers(&mut others);
        step(format!("bench: round {round}/{rounds}: profiler-agent record --off-cpu"));
        let out = tmp.0.join(format!("agent-{round}"));
        let mut cmd = Command::new(&agent);
        cmd.args(["record", "--off-cpu", "--frequency", "19", "--format", "folded"])
            .args(["--duration", &secs, "-o"])
            .arg(&out);
        let log = tmp.0.join(format!("agent-{round}.log"));
        let agent_run = traced(cmd, "profiler-agent", "Recording", &log, &plan)?;
        note_other_tracers(&mut others);
        let bpftrace_run = match &bpftrace {
            Some(bt) => {
                step(format!("bench: round {round}/{rounds}: bpftrace"));
                let mut cmd = Command::new(bt);
                cmd.arg("-e").arg(BPFTRACE_SCRIPT.replace("{SECS}", &secs));
                let log = tmp.0.join(format!("bpftrace-{round}.log"));
                Some(traced(cmd, "bpftrace", "Attaching", &log, &plan)?)
            }
            None => None,
        };
        all.push(Round { base, agent: agent_run, bpftrace: bpftrace_run });
    }
    note_other_tracers(&mut others);
    report::report(&all, ncpu, cpu, duration, bpftrace.is_some());
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

fn run_loads(plan: &Plan) -> Result<Vec<LoadRun>> {
    plan.works.iter().map(|&w| pingpong::run(plan.cpu, w, plan.d)).collect()
}

/// Starts `cmd` (a tracer that stops by itself after `plan.traced_secs`),
/// waits until its log shows `ready`, waits MARGIN, runs the loads, and
/// collects what the tracer cost once it has exited.
fn traced(cmd: Command, name: &'static str, ready: &str, log: &Path, plan: &Plan) -> Result<Traced> {
    let _ = fs::remove_file(log);
    thread::scope(|s| {
        let tracer = s.spawn(|| measure(cmd, name, log, plan.traced_secs, true));
        let joined = |t: thread::ScopedJoinHandle<'_, Result<Measured>>| {
            t.join().unwrap_or_else(|_| bail!("the thread measuring {name} panicked"))
        };
        let started = Instant::now();
        while !fs::read_to_string(log).is_ok_and(|t| t.contains(ready)) {
            if tracer.is_finished() || interrupted() || started.elapsed() > Duration::from_secs(60) {
                // It stops by itself after `traced_secs` (or measure stops it).
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
        let cpu0 = pid.and_then(cpu_ticks);
        let loads = run_loads(plan);
        let cpu1 = pid.and_then(cpu_ticks);
        let wall = t0.elapsed().as_secs_f64();
        let m = joined(tracer)?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu_during_load = cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a) as f64 / hz / wall * 100.0);
        let text = fs::read_to_string(log).unwrap_or_default();
        Ok(Traced { loads: loads?, m, cpu_during_load, bpf: bpf_time_per_run(&text) })
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
}
