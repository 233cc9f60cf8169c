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
        match self.tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
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
            std::thread::Builder::new().name("unwind-tables".into()).spawn(move || serve(registry, rx, stats))?
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
    let mut backlog: Vec<u32> = Vec::new();
    loop {
        let next = if backlog.is_empty() {
            rx.recv_timeout(SWEEP_EVERY)
        } else {
            match rx.try_recv() {
                Ok(r) => Ok(r),
                Err(TryRecvError::Empty) => Ok(Request::Background(backlog.pop().expect("not empty"))),
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            }
        };
        let result = match next {
            Ok(Request::Seen(tgid)) => registry.seen(tgid),
            Ok(Request::Refresh(tgid)) => registry.refresh(tgid),
            Ok(Request::Background(tgid)) => registry.load_without_evicting(tgid),
            Ok(Request::Backlog(mut tgids)) => {
                // Bounded like the queue; the rest load on first sight.
                tgids.truncate(QUEUE);
                backlog = tgids;
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => Ok(()),
            Err(RecvTimeoutError::Disconnected) => break,
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

/// Tables from the files processes map, opened through `/proc` so files in
/// other mount namespaces and deleted files are found.
#[derive(Default)]
pub struct FileTables {
    vdso: Option<Option<Vec<u8>>>,
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

    proptest! {
        #[test]
        fn start_time_never_panics(s in ".{0,200}") {
            let _ = parse_start_time(&s);
        }
    }
}
