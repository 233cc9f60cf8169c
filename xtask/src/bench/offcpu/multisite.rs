//! The multi-site load of `bench offcpu`: a service whose client thread
//! blocks at four places in turn (pipe read, futex, condition variable,
//! timer sleep) and whose server thread sleeps between waking it through
//! each (tests/workloads/offcpu_multisite.c, shared with the tests). Real
//! services block at several places in turn, which is what defeats a
//! one-place stack cache; the ping-pong blocks at one place only.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::super::{pingpong::ctxt, pingpong::LoadRun, workload};

const SOURCE: &str = include_str!("../../../../tests/workloads/offcpu_multisite.c");
/// Slot of the round-trip counter in the workload's counters file.
const ROUND_TRIPS: usize = 10;

/// Builds the workload into `dir`.
pub fn build(dir: &Path) -> Result<PathBuf> {
    workload::build(
        dir,
        "offcpu_multisite",
        "c",
        SOURCE,
        ("CC", "gcc"),
        &["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"],
    )
}

/// A running instance, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pins the calling (forked) process to `cpu`.
fn pin(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; cpu < CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: valid pointer and size; 0 is the calling process.
    if unsafe { libc::sched_setaffinity(0, size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts `bin` pinned to `cpu` with `args`.
pub fn spawn_pinned(bin: &Path, cpu: usize, args: &[String]) -> Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    // SAFETY: the closure only calls sched_setaffinity, which is
    // async-signal-safe.
    unsafe { cmd.pre_exec(move || pin(cpu)) };
    cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))
}

fn round_trips(stats: &Path) -> Result<u64> {
    let bytes = fs::read(stats).with_context(|| format!("cannot read {}", stats.display()))?;
    let at = ROUND_TRIPS * 8;
    let slot = bytes.get(at..at + 8).context("the counters file is short")?;
    Ok(u64::from_le_bytes(slot.try_into().expect("8 bytes")))
}

/// Context switches of `pid`'s threads, counted twice (out and back in):
/// its own share of the machine's switches.
fn own_switches(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    let mut n = 0;
    for t in dir.flatten() {
        let Ok(status) = fs::read_to_string(t.path().join("status")) else { continue };
        for key in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
            n += status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    2 * n
}

/// Runs the service on `cpu` for `d` (after a warm-up): the server sleeps
/// 1, 2 and 3 `unit_us` before each wake-up (0: flat out, no sleeps).
/// Returns the run (switches of the whole machine) and the service's own
/// switches per second.
pub fn run(bin: &Path, cpu: usize, unit_us: u64, d: Duration) -> Result<LoadRun> {
    Ok(run_counting(bin, cpu, unit_us, d)?.0)
}

pub fn run_counting(bin: &Path, cpu: usize, unit_us: u64, d: Duration) -> Result<(LoadRun, f64)> {
    let child = spawn_pinned(bin, cpu, &[unit_us.to_string()])?;
    let mut running = Running(child);
    let stats = PathBuf::from(format!("{}.stats", bin.display()));
    thread::sleep(Duration::from_millis(300));
    if let Some(status) = running.0.try_wait()? {
        bail!("the multi-site workload exited early: {status}");
    }
    let pid = running.0.id();
    let (rt0, ctxt0, own0, start) = (round_trips(&stats)?, ctxt()?, own_switches(pid), Instant::now());
    while start.elapsed() < d {
        if super::super::measure::interrupted() {
            bail!("interrupted");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let (rt1, ctxt1, own1, secs) = (round_trips(&stats)?, ctxt()?, own_switches(pid), start.elapsed().as_secs_f64());
    let run = LoadRun { round_trips: rt1.saturating_sub(rt0), secs, switches: ctxt1.saturating_sub(ctxt0) };
    Ok((run, own1.saturating_sub(own0) as f64 / secs))
}

/// A CPU-bound process pinned to `cpu` until dropped.
pub struct Spinner {
    _child: Running,
}

impl Spinner {
    pub fn start(cpu: usize) -> Result<Spinner> {
        let sh = PathBuf::from("/bin/sh");
        let child = spawn_pinned(&sh, cpu, &["-c".into(), "while :; do :; done".into()])?;
        Ok(Spinner { _child: Running(child) })
    }
}
