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

/// Runs the service on `cpu` for `d` (after a warm-up): the server sleeps
/// 1, 2 and 3 `unit_us` before each wake-up (0: flat out, no sleeps).
/// Switches are those of the whole machine.
pub fn run(bin: &Path, cpu: usize, unit_us: u64, d: Duration) -> Result<LoadRun> {
    let child = spawn_pinned(bin, cpu, &[unit_us.to_string()])?;
    let mut running = Running(child);
    let stats = PathBuf::from(format!("{}.stats", bin.display()));
    thread::sleep(Duration::from_millis(300));
    if let Some(status) = running.0.try_wait()? {
        bail!("the multi-site workload exited early: {status}");
    }
    let (rt0, ctxt0, start) = (round_trips(&stats)?, ctxt()?, Instant::now());
    while start.elapsed() < d {
        if super::super::measure::interrupted() {
            bail!("interrupted");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let (rt1, ctxt1, secs) = (round_trips(&stats)?, ctxt()?, start.elapsed().as_secs_f64());
    Ok(LoadRun { round_trips: rt1.saturating_sub(rt0), secs, switches: ctxt1.saturating_sub(ctxt0) })
}

/// Server sleep units the calibration may pick.
const UNITS_US: std::ops::RangeInclusive<u64> = 20..=5_000;
/// How long the calibration runs the service per unit it tries.
const PROBE: Duration = Duration::from_millis(1_500);
/// Close enough to the asked rate, as a fraction of it.
const TOLERANCE: f64 = 0.05;

/// The server sleep unit that gives the machine about `target` switches/s
/// (`ctxt` of /proc/stat, the figure the report gives) with the service
/// running and a CPU-bound process on `other_cpu`, as in the overhead run.
/// Returns the unit and the rate it gave. The rate is not inversely
/// proportional to the unit: scaling the unit from one probe of the
/// service's own switches at 200 us asked 10k and the overhead run got
/// 6.9-7.6k. So the unit is searched for, by the secant
/// method on 1/rate (the time per switch, close to affine in the unit),
/// from that inverse-scaling guess, for at most five probes.
pub fn calibrate(bin: &Path, cpu: usize, other_cpu: Option<usize>, target: f64) -> Result<(u64, f64)> {
    let _spinner = other_cpu.map(Spinner::start).transpose()?;
    let probe = |unit: u64| -> Result<(u64, f64)> {
        let rate = run(bin, cpu, unit, PROBE)?.switches_per_sec();
        if rate <= 0.0 {
            bail!("the multi-site workload did not switch at all in {PROBE:?} at a {unit} us unit");
        }
        Ok((unit, rate))
    };
    let clamp = |u: f64| (u.round().max(0.0) as u64).clamp(*UNITS_US.start(), *UNITS_US.end());
    let close = |(_, rate): (u64, f64)| (rate - target).abs() <= target * TOLERANCE;
    let mut a = probe(200)?;
    if close(a) {
        return Ok(a);
    }
    let mut b = probe(clamp(a.0 as f64 * a.1 / target))?;
    for _ in 0..3 {
        if close(b) || b.0 == a.0 {
            break;
        }
        let (ga, gb) = (1.0 / a.1 - 1.0 / target, 1.0 / b.1 - 1.0 / target);
        if (gb - ga).abs() < f64::EPSILON {
            break;
        }
        let next = clamp(b.0 as f64 - gb * (b.0 as f64 - a.0 as f64) / (gb - ga));
        if next == b.0 || next == a.0 {
            break;
        }
        a = b;
        b = probe(next)?;
    }
    let off = |(_, rate): (u64, f64)| (rate - target).abs();
    Ok(if off(a) < off(b) { a } else { b })
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
