//! The context-switch load of `bench offcpu`: like `perf bench sched pipe`,
//! two processes pass one byte back and forth over two pipes, so every round
//! trip blocks and wakes each side once. Both are pinned to one CPU, which
//! makes the switch count per round trip steady (about 2) and keeps cross-CPU
//! wakeups and idle exits of a VM out of the figure. A fixed amount of busy
//! work per hop (`work`, in spin iterations) slows the load down to a chosen
//! switch rate while keeping it CPU-bound, so anything added to each switch
//! shows up as lost throughput.

use std::{
    fs,
    hint::black_box,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::measure::interrupted;

/// What one run of the load did.
#[derive(Clone, Copy, Default)]
pub struct LoadRun {
    pub round_trips: u64,
    pub secs: f64,
    /// Context switches on all CPUs during the run (`ctxt` of /proc/stat).
    pub switches: u64,
}

impl LoadRun {
    pub fn round_trips_per_sec(&self) -> f64 {
        self.round_trips as f64 / self.secs
    }

    pub fn switches_per_sec(&self) -> f64 {
        self.switches as f64 / self.secs
    }
}

/// Busy work: `iters` additions the compiler cannot drop.
pub fn spin(iters: u64) {
    let mut x = 0u64;
    for i in 0..iters {
        x = black_box(x.wrapping_add(i));
    }
    black_box(x);
}

/// The highest-numbered CPU this process may run on.
pub fn last_cpu() -> Result<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it in.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size.
    let r = unsafe { libc::sched_getaffinity(0, size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity failed");
    }
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        // SAFETY: cpu is below CPU_SETSIZE.
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .context("no CPU in this process's affinity mask")
}

/// Runs the ping-pong on `cpu` for `duration` with `work` spin iterations per
/// hop. Stops early (and fails) if the bench is interrupted.
pub fn run(cpu: usize, work: u64, duration: Duration) -> Result<LoadRun> {
    on_cpu(cpu, || ping_pong(work, duration))
}

/// Runs `f` on a new thread pinned to `cpu` (processes it forks inherit that).
fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: cpu_set_t is plain data.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: cpu < CPU_SETSIZE (it came from last_cpu).
            unsafe { libc::CPU_SET(cpu, &mut set) };
            // SAFETY: valid pointer and size; 0 is the calling thread.
            if unsafe { libc::sched_setaffinity(0, size_of_val(&set), &set) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("cannot pin the load to CPU {cpu}"));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("the load thread panicked"))
    })
}

fn ping_pong(work: u64, duration: Duration) -> Result<LoadRun> {
    let (to_child_r, to_child_w) = pipe()?;
    let (to_parent_r, to_parent_w) = pipe()?;
    // SAFETY: the child only calls async-signal-safe functions (close, read,
    // write, _exit) and spins, so forking from a threaded process is fine.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork failed");
    }
    if pid == 0 {
        // SAFETY: in the child; these are our copies of the parent's ends.
        unsafe {
            libc::close(to_child_w.as_raw_fd());
            libc::close(to_parent_r.as_raw_fd());
            child(to_child_r.as_raw_fd(), to_parent_w.as_raw_fd(), work)
        }
    }
    drop(to_child_r);
    drop(to_parent_w);

    let ctxt0 = ctxt()?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut round_trips = 0u64;
    let result = loop {
        if !xfer(to_child_w.as_raw_fd(), true) || !xfer(to_parent_r.as_raw_fd(), false) {
            break Err(anyhow::anyhow!("the ping-pong child stopped answering"));
        }
        spin(work);
        round_trips += 1;
        if round_trips.is_multiple_of(16) {
            if interrupted() {
                break Err(anyhow::anyhow!("interrupted"));
            }
            if Instant::now() >= deadline {
                break Ok(());
            }
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let ctxt1 = ctxt()?;
    drop(to_child_w); // the child reads EOF and exits
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    result?;
    Ok(LoadRun { round_trips, secs, switches: ctxt1.saturating_sub(ctxt0) })
}

/// The child: answer each byte after `work` spins until EOF.
///
/// # Safety
/// Only to be called in a freshly forked child; never returns.
unsafe fn child(rx: i32, tx: i32, work: u64) -> ! {
    let mut b = 0u8;
    loop {
        // SAFETY: valid fds and a one-byte buffer.
        if unsafe { libc::read(rx, (&raw mut b).cast(), 1) } != 1 {
            break;
        }
        spin(work);
        // SAFETY: as above.
        if unsafe { libc::write(tx, (&raw const b).cast(), 1) } != 1 {
            break;
        }
    }
    // SAFETY: ends the child without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}

/// Writes or reads one byte, retrying on EINTR; false on EOF or error.
fn xfer(fd: i32, write: bool) -> bool {
    let mut b = 0u8;
    loop {
        // SAFETY: valid fd and a one-byte buffer.
        let n = unsafe {
            if write {
                libc::write(fd, (&raw const b).cast(), 1)
            } else {
                libc::read(fd, (&raw mut b).cast(), 1)
            }
        };
        if n == 1 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return false;
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2 failed");
    }
    // SAFETY: both are new descriptors that nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Context switches since boot, all CPUs.
pub fn ctxt() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .context("no ctxt line in /proc/stat")
}
