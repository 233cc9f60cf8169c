//! Process lifecycle: fork, exec and exit events from the kernel, applied
//! as they happen to the process table (the image's mappings are read while
//! the process is alive) and to the unwind table thread (a new image gets
//! its tables before its first sample), then handed to subscribers.
//!
//! A process that lives 30 ms is gone long before the sampling thread's
//! next poll (every 100 ms), so reading `/proc` on first sight of a sample
//! finds nothing. The kernel wakes this thread at every fork and exec
//! instead; the `/proc` read happens within a few hundred microseconds of
//! the exec.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use profiler_common::process::{ProcessEvent, EVENT_EXEC, EVENT_EXIT, EVENT_FORK};

use crate::{
    bpf::ProcessEventSource,
    process::{ProcRead, ProcessTable},
    unwind::worker::LifecycleFeed,
};

/// How long the thread waits for events before checking whether to stop.
const WAIT: Duration = Duration::from_millis(100);

/// At exec the new image's shared libraries are not mapped yet (the dynamic
/// loader maps them in the new process, ~1 ms of its CPU time later for a
/// small C program, but on a busy host it may wait in the run queue for
/// longer), so the mappings are read again this long after the exec, for
/// both the symbolizer and the unwinder, and while the process lives, at
/// the later delays too. A process gone by then costs one failed open.
const RELOAD_AFTER: Duration = Duration::from_millis(10);
const RELOAD_LATER: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(250)];
/// Re-reads waiting at most; beyond it (an exec storm) they are skipped and
/// counted, and those processes' libraries are read on demand.
const MAX_DEFERRED: usize = 4096;

/// How often exited processes that were never sampled are dropped, and how
/// long after their exit: by then any sample taken before the exit has been
/// drained (the sampling thread polls every 100 ms) and would have marked
/// them.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const UNSAMPLED_GRACE: Duration = Duration::from_secs(1);

/// One lifecycle event, as subscribers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// A new process `pid`, forked from `parent`; it runs the parent's image.
    Fork { pid: u32, parent: u32, time_ns: u64 },
    /// `pid` now runs a new program, named `comm`; its mappings are in the
    /// process table by the time subscribers are called.
    Exec { pid: u32, comm: String, time_ns: u64 },
    /// `pid` exited (its thread-group leader did).
    Exit { pid: u32, time_ns: u64 },
}

impl LifecycleEvent {
    /// The user-side form of a kernel event; `None` for an unknown kind.
    pub fn from_kernel(e: &ProcessEvent) -> Option<Self> {
        Some(match e.kind {
            EVENT_FORK => LifecycleEvent::Fork { pid: e.tgid, parent: e.parent, time_ns: e.time_ns },
            EVENT_EXEC => LifecycleEvent::Exec {
                pid: e.tgid,
                comm: String::from_utf8_lossy(e.comm_bytes()).into_owned(),
                time_ns: e.time_ns,
            },
            EVENT_EXIT => LifecycleEvent::Exit { pid: e.tgid, time_ns: e.time_ns },
            _ => return None,
        })
    }
}

/// A callback run on the tracker's thread for every event, after the
/// process table and the unwinder have been told. Keep it short: events
/// queue behind it.
pub type Subscriber = Box<dyn FnMut(&LifecycleEvent) + Send>;

/// Event counters, for the summary and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LifecycleStats {
    pub forks: u64,
    pub execs: u64,
    pub exits: u64,
    /// Events the kernel dropped because the ring buffer was full.
    pub lost: u64,
    /// Post-exec re-reads skipped because too many were waiting.
    pub reloads_skipped: u64,
    /// Forks and execs of processes outside a fixed `--pid` list, not
    /// acted on.
    pub untracked: u64,
}

struct Core {
    source: Box<dyn ProcessEventSource>,
    procs: Arc<Mutex<ProcessTable>>,
    unwind: Option<LifecycleFeed>,
    /// A fixed `--pid` list: other processes' forks and execs are counted
    /// but neither read from /proc nor given unwind tables, which they
    /// would never use (their samples are filtered in the kernel).
    only: Option<std::collections::HashSet<u32>>,
    subscribers: Vec<Subscriber>,
    stats: LifecycleStats,
    buf: Vec<ProcessEvent>,
    /// Post-exec re-reads: when, which process, and which of the delays.
    deferred: BinaryHeap<Reverse<(Instant, u32, usize)>>,
}

impl Core {
    /// Applies every event waiting in the kernel.
    fn pump(&mut self) {
        self.buf.clear();
        let mut buf = std::mem::take(&mut self.buf);
        self.source.drain(&mut buf);
        for e in &buf {
            if let Some(event) = LifecycleEvent::from_kernel(e) {
                self.apply(&event);
            }
        }
        self.buf = buf;
    }

    /// Reads the kernel's count of lost events. Only when the counters are
    /// asked for: it is a per-CPU map read (a system call, and aya reads
    /// the possible-CPU list from sysfs for it), and on every wake-up it
    /// was about 11 % of the agent's own CPU in the overhead run of `cargo
    /// xtask bench offcpu` (perf over 20 s, 2-CPU VM); once a second, 5 %.
    fn read_lost(&mut self) {
        self.stats.lost = self.source.lost();
    }

    /// Runs the re-reads that are due; returns how long until the next.
    fn reload_due(&mut self) -> Option<Duration> {
        let now = Instant::now();
        while let Some(&Reverse((at, pid, stage))) = self.deferred.peek() {
            if at > now {
                return Some(at - now);
            }
            self.deferred.pop();
            let alive = self.table().refresh(pid).is_some();
            if alive {
                if let Some(u) = &self.unwind {
                    u.exec(pid);
                }
                if let Some(later) = RELOAD_LATER.get(stage) {
                    let next = now + (*later - RELOAD_AFTER.min(*later));
                    self.deferred.push(Reverse((next, pid, stage + 1)));
                }
            }
        }
        None
    }

    fn apply(&mut self, event: &LifecycleEvent) {
        let pid = match *event {
            LifecycleEvent::Fork { pid, .. } | LifecycleEvent::Exec { pid, .. } | LifecycleEvent::Exit { pid, .. } => {
                pid
            }
        };
        let tracked = self.only.as_ref().is_none_or(|only| only.contains(&pid));
        match *event {
            LifecycleEvent::Fork { .. } | LifecycleEvent::Exec { .. } if !tracked => {
                self.stats.untracked += 1;
                match event {
                    LifecycleEvent::Fork { .. } => self.stats.forks += 1,
                    _ => self.stats.execs += 1,
                }
            }
            LifecycleEvent::Fork { pid, parent, .. } => {
                self.stats.forks += 1;
                if let Some(u) = &self.unwind {
                    u.fork(pid, parent);
                }
                self.table().fork(pid, parent);
            }
            LifecycleEvent::Exec { pid, ref comm, time_ns } => {
                self.stats.execs += 1;
                // The table thread reads the maps on its own; tell it first
                // so both reads overlap.
                if let Some(u) = &self.unwind {
                    u.exec(pid);
                }
                let root = self.table().proc_root().to_path_buf();
                let read = ProcRead::read(&root, pid);
                self.table().exec(pid, time_ns, comm, read);
                if self.deferred.len() < MAX_DEFERRED {
                    self.deferred.push(Reverse((Instant::now() + RELOAD_AFTER, pid, 0)));
                } else {
                    self.stats.reloads_skipped += 1;
                }
            }
            LifecycleEvent::Exit { pid, time_ns } => {
                self.stats.exits += 1;
                if let Some(u) = &self.unwind {
                    u.exit(pid);
                }
                self.table().exit(pid, time_ns);
            }
        }
        for s in &mut self.subscribers {
            s(event);
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, ProcessTable> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running tracker thread.
pub struct Tracker {
    core: Arc<Mutex<Core>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Tracker {
    /// Starts the thread that applies `source`'s events to `procs` and
    /// `unwind`.
    /// `only`: a fixed `--pid` list, the only processes acted on.
    pub fn start(
        source: impl ProcessEventSource + 'static,
        procs: Arc<Mutex<ProcessTable>>,
        unwind: Option<LifecycleFeed>,
        only: Option<&[u32]>,
    ) -> std::io::Result<Tracker> {
        Self::with_thread(source, procs, unwind, only, true)
    }

    fn with_thread(
        source: impl ProcessEventSource + 'static,
        procs: Arc<Mutex<ProcessTable>>,
        unwind: Option<LifecycleFeed>,
        only: Option<&[u32]>,
        thread: bool,
    ) -> std::io::Result<Tracker> {
        let fd = source.wait_fd();
        let core = Arc::new(Mutex::new(Core {
            source: Box::new(source),
            procs,
            unwind,
            only: only.map(|p| p.iter().copied().collect()),
            subscribers: Vec::new(),
            stats: LifecycleStats::default(),
            buf: Vec::with_capacity(256),
            deferred: BinaryHeap::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        if !thread {
            return Ok(Tracker { core, stop, handle: None });
        }
        let handle = {
            let (core, stop) = (core.clone(), stop.clone());
            std::thread::Builder::new().name("lifecycle".into()).spawn(move || {
                raise_priority();
                let mut timeout = WAIT;
                let mut last_sweep = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    wait(fd, timeout);
                    let mut core = lock(&core);
                    core.pump();
                    timeout = core.reload_due().map_or(WAIT, |d| d.min(WAIT));
                    if last_sweep.elapsed() >= SWEEP_EVERY {
                        last_sweep = Instant::now();
                        if let Some(cutoff) = last_sweep.checked_sub(UNSAMPLED_GRACE) {
                            core.table().sweep_unsampled(cutoff);
                        }
                    }
                }
            })?
        };
        Ok(Tracker { core, stop, handle: Some(handle) })
    }

    /// A tracker without its thread: events are applied only by
    /// [`catch_up`](Self::catch_up), so tests control the order.
    #[cfg(test)]
    pub(crate) fn manual(
        source: impl ProcessEventSource + 'static,
        procs: Arc<Mutex<ProcessTable>>,
        unwind: Option<LifecycleFeed>,
        only: Option<&[u32]>,
    ) -> Tracker {
        Self::with_thread(source, procs, unwind, only, false).expect("no thread to start")
    }

    /// Adds a subscriber; it sees events from now on.
    pub fn subscribe(&self, subscriber: Subscriber) {
        lock(&self.core).subscribers.push(subscriber);
    }

    /// Applies the events already in the kernel now, on the caller's
    /// thread. The sampling thread calls it after draining a batch of
    /// samples and before stamping them with their image: every exec
    /// before those samples is then in the table.
    pub fn catch_up(&self) {
        let mut core = lock(&self.core);
        core.pump();
        core.reload_due();
    }

    pub fn stats(&self) -> LifecycleStats {
        let mut core = lock(&self.core);
        core.read_lost();
        core.stats
    }

    /// Applies what is left, stops the thread, and returns the counters.
    /// Dropping the tracker also releases its unwind handle, so the table
    /// thread can end.
    pub fn stop(mut self) -> LifecycleStats {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let mut core = lock(&self.core);
        core.pump();
        core.read_lost();
        core.unwind = None;
        core.stats
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        lock(&self.core).unwind = None;
    }
}

/// Why the tracker could not start.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    #[error("starting the lifecycle thread failed: {0}")]
    Thread(#[from] std::io::Error),
}

/// Starts a tracker on the loaded programs' event stream, telling
/// `unwind`'s table thread too; `None` if the stream was already taken.
/// `only`: see [`Tracker::start`].
pub fn start_from(
    source: &mut crate::bpf::EbpfSource,
    procs: Arc<Mutex<ProcessTable>>,
    unwind: Option<&crate::unwind::Feed>,
    only: Option<&[u32]>,
) -> Result<Option<Tracker>, LifecycleError> {
    let Some(events) = source.take_process_events()? else { return Ok(None) };
    Ok(Some(Tracker::start(events, procs, unwind.map(|f| f.lifecycle()), only)?))
}

fn lock(core: &Mutex<Core>) -> std::sync::MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises the calling thread's priority (nice -10). The lifecycle and unwind
/// table threads run briefly, but a process that lives 30 ms needs its image
/// read and its tables written within a few ms of its exec: at normal
/// priority on a host with 30 runnable tasks per CPU they waited tens of ms
/// in the run queue, and a sixth of a short-lived process's samples were
/// taken before its tables were in
/// (`short_lived_processes_get_symbolized_stacks_reaching_main`). Failure
/// (no CAP_SYS_NICE) leaves the default priority. Without that capability
/// the call is not even made: the packaged unit's system-call filter
/// refuses `setpriority` (`@resources`), and the agent's capabilities there
/// do not include CAP_SYS_NICE.
pub fn raise_priority() {
    const CAP_SYS_NICE: u32 = 23;
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:")).map(|v| v.trim().to_owned()))
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0);
    if eff & (1u64 << CAP_SYS_NICE) == 0 {
        return;
    }
    // SAFETY: setpriority on this thread's own tid; no memory is passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -10);
    }
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait(fd: Option<std::os::fd::RawFd>, timeout: Duration) {
    let Some(fd) = fd else {
        std::thread::sleep(timeout.min(Duration::from_millis(10)));
        return;
    };
    let mut fds = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
    // SAFETY: one valid pollfd for the duration of the call. Errors
    // (EINTR) just end the wait early.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
}

#[cfg(test)]
mod tests;
