//! The table thread: builds tables and writes the unwinder's maps off the
//! sampling path, fed through a bounded queue.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use profiler_common::SAMPLE_FLAG_UNKNOWN_MAPPING;

use super::{
    registry::{ProcessReader, Registry, TableSource, UnwindStats},
    table::{self, TableError, UnwindTable},
};
use crate::{
    bpf::UnwindMaps,
    process::{maps::parse_executable, MapEntry},
};

/// Requests queued for the table thread. A full queue drops (and counts)
/// them: the unwinder asks again with the next sample of the process.
const QUEUE: usize = 4096;
/// How often exited processes are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum Request {
    Seen(u32),
    Refresh(u32),
    /// Lifecycle events: load an exec'd image at once, copy a parent's
    /// mappings to its child, forget an exited process.
    Exec(u32),
    Fork {
        child: u32,
        parent: u32,
    },
    Exit(u32),
    /// Load these when nothing else is asked (the off-CPU start scan:
    /// processes that block are announced and served first).
    Backlog(Vec<u32>),
    /// One process of the backlog.
    Background(u32),
}

/// A process's tables are marked used at most this often; the LRU needs
/// no finer clock, and each message wakes the table thread.
const SEEN_EVERY: Duration = Duration::from_secs(1);
/// Processes remembered for that; beyond it the memory is cleared, which
/// only costs one extra message per process.
const SEEN_REMEMBERED: usize = 8192;

/// The sampling side's handle on the table thread.
pub struct Feed {
    tx: SyncSender<Request>,
    dropped: Arc<AtomicU64>,
    /// When each process was last reported seen.
    last_seen: Mutex<HashMap<u32, Instant>>,
}

impl Feed {
    /// Tells the table thread about a batch of samples: processes not
    /// reported within `SEEN_EVERY`, and those whose unwind met an unknown
    /// mapping (the table thread rate-limits those per process).
    pub fn note(&self, samples: impl IntoIterator<Item = (u32, u32)>) {
        let mut batch = HashSet::new();
        let mut last_seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        if last_seen.len() > SEEN_REMEMBERED {
            last_seen.clear();
        }
        let now = Instant::now();
        for (tgid, flags) in samples {
            let refresh = flags & SAMPLE_FLAG_UNKNOWN_MAPPING != 0;
            if !batch.insert((tgid, refresh)) {
                continue;
            }
            if refresh {
                self.send(Request::Refresh(tgid));
            } else if last_seen.get(&tgid).is_none_or(|t| now.duration_since(*t) >= SEEN_EVERY) {
                last_seen.insert(tgid, now);
                self.send(Request::Seen(tgid));
            }
        }
    }

    /// Loads `tgids` in the background, behind every other request.
    pub fn load_in_background(&self, tgids: Vec<u32>) {
        self.send(Request::Backlog(tgids));
    }

    fn send(&self, r: Request) {
        send(&self.tx, &self.dropped, r);
    }

    /// A handle for the lifecycle tracker, which tells the table thread of
    /// forks, execs and exits as they happen, so a process's tables are in
    /// the kernel before its first sample.
    pub fn lifecycle(&self) -> LifecycleFeed {
        LifecycleFeed { tx: self.tx.clone(), dropped: self.dropped.clone() }
    }
}

fn send(tx: &SyncSender<Request>, dropped: &AtomicU64, r: Request) {
    match tx.try_send(r) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Lifecycle events for the table thread (see [`Feed::lifecycle`]). The
/// table thread runs until this handle, too, is dropped.
#[derive(Clone)]
pub struct LifecycleFeed {
    tx: SyncSender<Request>,
    dropped: Arc<AtomicU64>,
}

impl LifecycleFeed {
    pub fn exec(&self, tgid: u32) {
        send(&self.tx, &self.dropped, Request::Exec(tgid));
    }
    pub fn fork(&self, child: u32, parent: u32) {
        send(&self.tx, &self.dropped, Request::Fork { child, parent });
    }
    pub fn exit(&self, tgid: u32) {
        send(&self.tx, &self.dropped, Request::Exit(tgid));
    }
}

/// The running table thread.
pub struct Worker {
    handle: Option<JoinHandle<()>>,
    stats: Arc<Mutex<UnwindStats>>,
    dropped: Arc<AtomicU64>,
}

impl Worker {
    /// Loads `preload` synchronously (so the first samples of `--pid`
    /// processes unwind fully), then starts the thread. Other processes
    /// are loaded on their first sample (which itself unwinds by frame
    /// pointer): loading every process at start cost 0.5 s of CPU on an
    /// idle 2-CPU VM, for tables most processes never use
    /// (`cargo xtask bench overhead`).
    pub fn start<M: UnwindMaps + 'static>(maps: M, preload: &[u32]) -> std::io::Result<(Worker, Feed)> {
        let mut registry = Registry::new(maps, FileTables::default(), ProcFs);
        for &pid in preload {
            if let Err(e) = registry.load(pid) {
                log::warn!("{e}");
            }
        }
        let stats = Arc::new(Mutex::new(registry.stats()));
        let dropped = Arc::new(AtomicU64::new(0));
        let (tx, rx) = sync_channel(QUEUE);
        let handle = {
            let stats = stats.clone();
            std::thread::Builder::new().name("unwind-tables".into()).spawn(move || {
                // See `raise_priority`: an exec'd image's tables must be in
                // before the process's first samples.
                crate::lifecycle::raise_priority();
                serve(registry, rx, stats)
            })?
        };
        let feed = Feed { tx, dropped: dropped.clone(), last_seen: Mutex::new(HashMap::new()) };
        Ok((Worker { handle: Some(handle), stats, dropped }, feed))
    }

    pub fn stats(&self) -> UnwindStats {
        let mut s = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        s.requests_dropped = self.dropped.load(Ordering::Relaxed);
        s
    }

    /// Waits for the thread, which ends once every [`Feed`] is dropped.
    pub fn join(mut self) -> UnwindStats {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.stats()
    }
}

fn serve<M: UnwindMaps, T: TableSource, P: ProcessReader>(
    mut registry: Registry<M, T, P>,
    rx: Receiver<Request>,
    stats: Arc<Mutex<UnwindStats>>,
) {
    let publish = |r: &Registry<M, T, P>| {
        if let Ok(mut s) = stats.lock() {
            *s = r.stats();
        }
    };
    let mut last_sweep = Instant::now();
    let mut queue = Queue::default();
    // The off-CPU start scan's processes: loaded one at a time whenever
    // nothing else is asked.
    let mut backlog: Vec<u32> = Vec::new();
    loop {
        if queue.is_empty() {
            if backlog.is_empty() {
                match rx.recv_timeout(SWEEP_EVERY) {
                    Ok(r) => queue.push(r),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => queue.push(r),
                    Err(TryRecvError::Empty) => queue.push(Request::Background(backlog.pop().expect("not empty"))),
                    Err(TryRecvError::Disconnected) => break,
                }
            }
        }
        while queue.len() < QUEUE {
            let Ok(r) = rx.try_recv() else { break };
            queue.push(r);
        }
        let result = match queue.pop() {
            Some(Request::Seen(tgid)) => registry.seen(tgid),
            Some(Request::Refresh(tgid)) => registry.refresh(tgid),
            Some(Request::Exec(tgid)) => registry.exec(tgid),
            Some(Request::Fork { child, parent }) => registry.fork(child, parent),
            Some(Request::Exit(tgid)) => registry.exited(tgid),
            Some(Request::Background(tgid)) => registry.load_without_evicting(tgid),
            Some(Request::Backlog(mut tgids)) => {
                // Bounded like the queue; the rest load on first sight.
                tgids.truncate(QUEUE);
                backlog = tgids;
                Ok(())
            }
            None => Ok(()),
        };
        let result = result.and_then(|()| {
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                registry.sweep()
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            // The maps cannot be written: stacks fall back to frame
            // pointers from here on, which the unwind counters show.
            log::warn!("{e}; CFI tables are no longer updated");
            break;
        }
        publish(&registry);
    }
    publish(&registry);
}

/// Requests taken off the channel, lifecycle events first: a process that
/// just exec'd may live only milliseconds, while a request from a sample
/// (a process seen running for a while) can wait behind it. Without this an
/// exec waited behind the loads of every process seen at start (seconds of
/// table building on a busy host), and short-lived processes were sampled
/// before their tables were in (`short_lived_processes_get_symbolized_stacks_reaching_main`).
#[derive(Default)]
struct Queue {
    urgent: std::collections::VecDeque<Request>,
    normal: std::collections::VecDeque<Request>,
}

impl Queue {
    fn push(&mut self, r: Request) {
        match r {
            Request::Exec(_) | Request::Fork { .. } | Request::Exit(_) => self.urgent.push_back(r),
            Request::Seen(_) | Request::Refresh(_) | Request::Backlog(_) | Request::Background(_) => {
                self.normal.push_back(r)
            }
        }
    }
    fn pop(&mut self) -> Option<Request> {
        self.urgent.pop_front().or_else(|| self.normal.pop_front())
    }
    fn len(&self) -> usize {
        self.urgent.len() + self.normal.len()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Tables from the files processes map, opened through `/proc` so files in
/// other mount namespaces and deleted files are found.
#[derive(Default)]
pub struct FileTables {
    vdso: Option<Option<Vec<u8>>>,
    python: crate::runtimes::python::detect::Detector,
}

impl TableSource for FileTables {
    fn file_size(&mut self, tgid: u32, m: &MapEntry) -> Option<u64> {
        let via_map_files = format!("/proc/{tgid}/map_files/{:x}-{:x}", m.start, m.end);
        fs::metadata(via_map_files).ok().map(|md| md.len())
    }

    fn build(&mut self, tgid: u32, m: &MapEntry) -> Result<UnwindTable, TableError> {
        if m.path == "[vdso]" {
            // Every process has the same vDSO: the agent's own.
            let image = self.vdso.get_or_insert_with(table::vdso_image);
            return match image {
                Some(bytes) => table::build(bytes),
                None => Err(TableError::Io(std::io::Error::other("the vDSO image could not be read"))),
            };
        }
        let via_map_files = PathBuf::from(format!("/proc/{tgid}/map_files/{:x}-{:x}", m.start, m.end));
        match table::build_file(&via_map_files) {
            Err(TableError::Io(_)) => table::build_file(&PathBuf::from(format!("/proc/{tgid}/root{}", m.path))),
            other => other,
        }
    }

    fn python(
        &mut self,
        tgid: u32,
        mappings: &[MapEntry],
    ) -> Result<Option<profiler_common::python::PyProcess>, crate::runtimes::python::detect::Unsupported> {
        let found = self.python.find(tgid, mappings, &crate::runtimes::python::memory::ProcessMemory)?;
        Ok(found.map(|f| {
            log::debug!("pid {tgid}: CPython {}.{} in {}", f.layout.version.0, f.layout.version.1, f.path);
            f.record
        }))
    }
}

/// Processes from `/proc`.
#[derive(Default)]
pub struct ProcFs;

impl ProcessReader for ProcFs {
    fn read(&mut self, tgid: u32) -> Option<(u64, Vec<MapEntry>)> {
        let start = self.start_time(tgid)?;
        let maps = fs::read_to_string(format!("/proc/{tgid}/maps")).ok()?;
        Some((start, parse_executable(&maps)))
    }

    fn start_time(&mut self, tgid: u32) -> Option<u64> {
        parse_start_time(&fs::read_to_string(format!("/proc/{tgid}/stat")).ok()?)
    }
}

/// Field 22 (`starttime`) of `/proc/PID/stat`. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after its
/// last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(parse_start_time(stat), Some(123456));
        assert_eq!(parse_start_time("42 (x"), None);
        let own = fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_start_time(&own).is_some());
    }

    #[test]
    fn feed_reports_each_process_once_a_second_but_every_refresh() {
        let (tx, rx) = sync_channel(1);
        let feed = Feed { tx, dropped: Arc::new(AtomicU64::new(0)), last_seen: Mutex::new(HashMap::new()) };
        feed.note([(7, 0), (7, 0), (7, SAMPLE_FLAG_UNKNOWN_MAPPING)]);
        // The queue holds one request: the refresh was dropped and counted.
        assert!(matches!(rx.try_recv(), Ok(Request::Seen(7))));
        assert_eq!(feed.dropped.load(Ordering::Relaxed), 1);
        feed.note([(7, 0)]);
        assert!(rx.try_recv().is_err(), "seen again within a second");
        feed.note([(7, SAMPLE_FLAG_UNKNOWN_MAPPING)]);
        assert!(matches!(rx.try_recv(), Ok(Request::Refresh(7))));
    }

    #[test]
    fn lifecycle_requests_go_before_sample_requests() {
        let mut q = Queue::default();
        q.push(Request::Seen(1));
        q.push(Request::Refresh(2));
        q.push(Request::Exec(3));
        q.push(Request::Exit(4));
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).map(|r| format!("{r:?}")).collect();
        assert_eq!(order, ["Exec(3)", "Exit(4)", "Seen(1)", "Refresh(2)"]);
    }

    proptest! {
        #[test]
        fn start_time_never_panics(s in ".{0,200}") {
            let _ = parse_start_time(&s);
        }
    }
}
