//! Off-CPU recordings (`record --off-cpu`): reading `off-cpu.folded`,
//! `wall.folded`, `latency.csv` and the scheduler lines of the summary;
//! per-thread scheduler counters from /proc; counters shared with a C
//! workload; and recording with snapshots taken at the moments the agent's
//! programs start and stop seeing events.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::agent::{sampling_fds, spawn_record, RecordOutput, RECORD_TIMEOUT};
use crate::folded::{parse_folded, Folded};
use crate::workload::Workload;

/// Reads and parses a folded file written by the agent (`off-cpu.folded`,
/// `wall.folded`, ...), panicking with the agent's stderr if it is missing.
pub fn read_folded(out: &RecordOutput, name: &str) -> Folded {
    let bytes = out.read(name);
    let text = String::from_utf8(bytes).unwrap_or_else(|e| panic!("{name} is not UTF-8: {e}\n{}", out.context()));
    parse_folded(&text)
}

/// One row of `latency.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyRow {
    pub pid: u32,
    pub process: String,
    /// `runqueue` or `offcpu`.
    pub kind: String,
    pub count: u64,
    pub p50_ns: f64,
    pub p95_ns: f64,
    pub p99_ns: f64,
    pub max_ns: u64,
}

/// The header line `latency.csv` must start with.
pub const LATENCY_CSV_HEADER: &str = "pid,process,kind,count,p50_ns,p95_ns,p99_ns,max_ns";

/// Parses `latency.csv`, panicking on a wrong header or malformed row.
pub fn parse_latency_csv(text: &str) -> Vec<LatencyRow> {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(LATENCY_CSV_HEADER), "latency.csv header:\n{text}");
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 8, "latency.csv row has {} fields: {line:?}", f.len());
            let num =
                |i: usize| -> f64 { f[i].parse().unwrap_or_else(|e| panic!("latency.csv field {i} ({e}): {line:?}")) };
            LatencyRow {
                pid: num(0) as u32,
                process: f[1].to_string(),
                kind: f[2].to_string(),
                count: num(3) as u64,
                p50_ns: num(4),
                p95_ns: num(5),
                p99_ns: num(6),
                max_ns: num(7) as u64,
            }
        })
        .collect()
}

/// Reads and parses `latency.csv` of a recording.
pub fn read_latency(out: &RecordOutput) -> Vec<LatencyRow> {
    let text = String::from_utf8(out.read("latency.csv"))
        .unwrap_or_else(|e| panic!("latency.csv is not UTF-8: {e}\n{}", out.context()));
    parse_latency_csv(&text)
}

/// The row of process `pid` and `kind` (`runqueue` / `offcpu`), if any.
pub fn latency_row<'a>(rows: &'a [LatencyRow], pid: u32, kind: &str) -> Option<&'a LatencyRow> {
    rows.iter().find(|r| r.pid == pid && r.kind == kind)
}

/// The scheduler lines of the agent's end-of-run summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedSummary {
    pub switches: u64,
    pub blocks: u64,
    /// Blocks shorter than `--off-cpu-min-block` (not recorded).
    pub short_blocks: u64,
    pub off_cpu_secs: f64,
    /// Total of `Scheduler events dropped: N (...)`.
    pub dropped: u64,
    /// `Scheduler maps at exit: A threads still blocked, B waiting to run.`
    pub still_blocked: u64,
    pub waiting_to_run: u64,
    /// `..., C threads tracked.` (entries of the per-thread map), if the
    /// agent reports it.
    pub threads_tracked: Option<u64>,
}

/// Parses the scheduler lines of the summary; None if any is missing.
/// Reads each figure next to the words that name it, so extra clauses
/// (e.g. `; stacks reused for R`, `, C threads tracked`) do not matter:
///
/// `Scheduler: N switches; M blocks captured (K shorter than --off-cpu-min-block...); X.XXX s off-CPU recorded.`
/// `Scheduler events dropped: D (...).`
/// `Scheduler maps at exit: A threads still blocked, B waiting to run...`
pub fn parse_sched_summary(stderr: &str) -> Option<SchedSummary> {
    let line = |prefix: &str| stderr.lines().find_map(|l| l.trim().strip_prefix(prefix));
    let is_num = |c: char| c.is_ascii_digit() || c == '.';
    // The number right after `after` (skipping spaces).
    let after = |text: &str, marker: &str| -> Option<f64> {
        let rest = text[text.find(marker)? + marker.len()..].trim_start();
        let end = rest.find(|c: char| !is_num(c)).unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    // The number right before `marker` (skipping spaces).
    let before = |text: &str, marker: &str| -> Option<f64> {
        let head = text[..text.find(marker)?].trim_end();
        let start = head.rfind(|c: char| !is_num(c)).map_or(0, |i| i + 1);
        head[start..].parse().ok()
    };
    let main = line("Scheduler: ")?;
    let dropped = line("Scheduler events dropped: ")?;
    let maps = line("Scheduler maps at exit: ")?;
    Some(SchedSummary {
        switches: before(main, " switches")? as u64,
        blocks: before(main, " blocks captured")? as u64,
        short_blocks: before(main, " shorter than --off-cpu-min-block")? as u64,
        off_cpu_secs: before(main, " s off-CPU recorded")?,
        dropped: after(dropped, "")? as u64,
        still_blocked: before(maps, " threads still blocked")? as u64,
        waiting_to_run: before(maps, " waiting to run")? as u64,
        threads_tracked: before(maps, " threads tracked").map(|n| n as u64),
    })
}

/// The thread ids of process `pid` (empty if it is gone).
pub fn thread_ids(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut tids: Vec<u32> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    tids.sort_unstable();
    tids
}

/// Scheduler counters of one thread, from /proc/PID/task/TID/{schedstat,status}.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadSched {
    /// Time on a CPU (schedstat field 1).
    pub cpu_ns: u64,
    /// Time runnable but waiting on a run queue (schedstat field 2).
    pub runq_wait_ns: u64,
    pub voluntary_switches: u64,
    pub nonvoluntary_switches: u64,
}

impl ThreadSched {
    pub fn switches(&self) -> u64 {
        self.voluntary_switches + self.nonvoluntary_switches
    }

    /// `self - earlier`, field by field (saturating).
    pub fn since(&self, earlier: &ThreadSched) -> ThreadSched {
        ThreadSched {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            runq_wait_ns: self.runq_wait_ns.saturating_sub(earlier.runq_wait_ns),
            voluntary_switches: self.voluntary_switches.saturating_sub(earlier.voluntary_switches),
            nonvoluntary_switches: self.nonvoluntary_switches.saturating_sub(earlier.nonvoluntary_switches),
        }
    }
}

/// The counters of thread `tid` of process `pid`; None if it is gone.
pub fn thread_sched(pid: u32, tid: u32) -> Option<ThreadSched> {
    let base = format!("/proc/{pid}/task/{tid}");
    let schedstat = std::fs::read_to_string(format!("{base}/schedstat")).ok()?;
    let mut f = schedstat.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (cpu_ns, runq_wait_ns) = (f.next()??, f.next()??);
    let status = std::fs::read_to_string(format!("{base}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim_start_matches(':').trim().parse().ok())
    };
    Some(ThreadSched {
        cpu_ns,
        runq_wait_ns,
        voluntary_switches: field("voluntary_ctxt_switches")?,
        nonvoluntary_switches: field("nonvoluntary_ctxt_switches")?,
    })
}

/// The name (comm) of thread `tid` of process `pid`.
pub fn thread_name(pid: u32, tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// Time one CPU spent busy and in total, from /proc/stat (in USER_HZ ticks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
}

impl CpuTimes {
    /// Share of the time between `earlier` and `self` the CPU was busy.
    pub fn busy_share_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        self.busy.saturating_sub(earlier.busy) as f64 / total.max(1) as f64
    }
}

/// The /proc/stat times of CPU `cpu`; None if there is no such CPU.
pub fn cpu_times(cpu: usize) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let prefix = format!("cpu{cpu} ");
    let line = stat.lines().find(|l| l.starts_with(&prefix))?;
    let v: Vec<u64> = line[prefix.len()..].split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already
    // included in user and nice).
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Some(CpuTimes { busy, total: busy + at(3) + at(4) })
}

/// C code for counters shared with the test: `counters_open(argv[0])` maps
/// the file `<argv0>.stats` (COUNTER_SLOTS little-endian u64 slots, zeroed)
/// and `counters[i]` is then read by the test with [`Counters`]. Also
/// `now_ns()` (CLOCK_MONOTONIC). Prepend it to a workload's source; it
/// defines `_GNU_SOURCE` and includes the usual headers.
pub const COUNTERS_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define COUNTER_SLOTS 64
static volatile uint64_t *counters;

static void counters_open(const char *argv0) {
    char path[4096];
    snprintf(path, sizeof path, "%s.stats", argv0);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, COUNTER_SLOTS * 8) != 0) { perror(path); exit(2); }
    void *p = mmap(0, COUNTER_SLOTS * 8, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(2); }
    counters = p;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* nanosleep(ns) through the calling function's OWN syscall instruction (no
 * libc wrapper, which has no frame pointer), so that a frame-pointer walk from
 * the kernel entry starts in that function. Stores the result in `ret`. */
#define SLEEP_SYSCALL(ret, ns)                                                \
    do {                                                                      \
        struct timespec ts_ = {(long)((ns) / 1000000000ull),                   \
                               (long)((ns) % 1000000000ull)};                  \
        long r_;                                                              \
        __asm__ volatile("syscall"                                            \
                         : "=a"(r_)                                           \
                         : "0"((long)SYS_nanosleep), "D"(&ts_), "S"(0L)       \
                         : "rcx", "r11", "memory");                           \
        (ret) = r_;                                                           \
    } while (0)
"#;

/// Number of u64 slots of the counters file (see [`COUNTERS_C`]).
pub const COUNTER_SLOTS: usize = 64;

/// The counters file of a workload built with [`COUNTERS_C`].
pub struct Counters {
    file: std::fs::File,
    path: PathBuf,
}

impl Counters {
    /// Opens `<binary>.stats` of `w`, waiting up to 5 s for the workload to
    /// create it.
    pub fn open(w: &Workload) -> Counters {
        let path = PathBuf::from(format!("{}.stats", w.bin().display()));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(&path) {
                if file.metadata().map(|m| m.len()).unwrap_or(0) >= (COUNTER_SLOTS * 8) as u64 {
                    return Counters { file, path };
                }
            }
            assert!(Instant::now() < deadline, "workload {} did not create {}", w.name(), path.display());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// All slots, as the workload last wrote them (the file is its shared
    /// mapping, so reads see the page cache the workload writes to).
    pub fn read(&self) -> Vec<u64> {
        let mut buf = vec![0u8; COUNTER_SLOTS * 8];
        self.file.read_exact_at(&mut buf, 0).unwrap_or_else(|e| panic!("read {}: {e}", self.path.display()));
        buf.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// Sets slot `i` (for the test to signal the workload).
    pub fn write(&self, i: usize, value: u64) {
        assert!(i < COUNTER_SLOTS);
        self.file
            .write_all_at(&value.to_le_bytes(), (i * 8) as u64)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.path.display()));
    }
}

/// A recording with snapshots taken when the agent started recording and
/// when it detached its programs.
pub struct Windowed<T> {
    pub out: RecordOutput,
    /// Taken when the agent printed `Recording...` (after everything is
    /// attached).
    pub start: T,
    /// Taken when the agent's perf-event/bpf-link fds began to close, i.e.
    /// when it detached (or, failing that, when it exited).
    pub end: T,
    /// Time between the two snapshots.
    pub window: Duration,
}

/// How often the edges of the window are polled for. Polling runs only
/// near the edges, so the test process barely competes with the workloads.
const EDGE_POLL: Duration = Duration::from_millis(1);
/// Polling for the end starts this long before the requested duration ends.
const END_POLL_LEAD: Duration = Duration::from_millis(300);

/// Runs `record <args> --duration <duration>` and calls `snapshot` when the
/// agent has attached everything (it prints `Recording ...` on stderr right
/// after) and when it detaches at the end (its perf-event and bpf-link fds
/// start closing, which it does before reading the maps).
///
/// The edges are known to within [`EDGE_POLL`] plus scheduling delays of
/// the test process: a few milliseconds.
pub fn record_windowed<T>(args: &[&str], duration: Duration, mut snapshot: impl FnMut() -> T) -> Windowed<T> {
    let secs = format!("{}ms", duration.as_millis());
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--duration", &secs]);
    let mut agent = spawn_record(&all);
    let pid = agent.pid();
    let stderr_path = format!("/proc/{pid}/fd/2");
    // Opening /proc/PID/fd/2 gives a file description of our own: reading it
    // does not move the agent's write offset.
    let stderr_now = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(60);
    while !stderr_now().contains("Recording") {
        if !agent.is_running() || Instant::now() > deadline {
            let out = agent.wait(RECORD_TIMEOUT);
            panic!("agent never reported it was recording\n{}", out.context());
        }
        std::thread::sleep(EDGE_POLL);
    }
    let (start, t0) = (snapshot(), Instant::now());
    let mut attached = sampling_fds(pid);

    std::thread::sleep(duration.saturating_sub(END_POLL_LEAD));
    let (end, t1) = loop {
        let fds = sampling_fds(pid);
        if fds < attached || !agent.is_running() {
            break (snapshot(), Instant::now());
        }
        attached = attached.max(fds);
        if t0.elapsed() > duration + RECORD_TIMEOUT {
            panic!("agent (pid {pid}) did not detach");
        }
        std::thread::sleep(EDGE_POLL);
    };
    let out = agent.wait(RECORD_TIMEOUT);
    out.assert_success();
    Windowed { out, start, end, window: t1 - t0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_latency_csv() {
        let rows = parse_latency_csv(
            "pid,process,kind,count,p50_ns,p95_ns,p99_ns,max_ns\n\
             7,a_b,runqueue,3,1,2,2,2\n7,a_b,offcpu,4,10,20,30,45\n",
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(latency_row(&rows, 7, "offcpu").unwrap().max_ns, 45);
        assert_eq!(latency_row(&rows, 7, "runqueue").unwrap().p50_ns, 1.0);
        assert!(latency_row(&rows, 8, "runqueue").is_none());
    }

    #[test]
    fn parses_scheduler_summary() {
        let s = parse_sched_summary(
            "Recorded 5.0 s ...\n\
             Scheduler: 8546 switches; 512 blocks captured (3 shorter than --off-cpu-min-block); 20.885 s off-CPU recorded.\n\
             Scheduler events dropped: 2 (off_cpu_pending_map_full 0, stack_map_full 2).\n\
             Latency of the busiest processes (p50 / p95 / p99 / max, count):\n\
             Scheduler maps at exit: 16 threads still blocked, 1 waiting to run.\n",
        )
        .unwrap();
        assert_eq!(
            s,
            SchedSummary {
                switches: 8546,
                blocks: 512,
                short_blocks: 3,
                off_cpu_secs: 20.885,
                dropped: 2,
                still_blocked: 16,
                waiting_to_run: 1,
                threads_tracked: None,
            }
        );
        assert!(parse_sched_summary("Recorded 5.0 s\n").is_none());
        let s = parse_sched_summary(
            "Scheduler: 443532 switches; 1459 blocks captured (7 shorter than --off-cpu-min-block; stacks reused for 93); 5.282 s off-CPU recorded.\n\
             Scheduler events dropped: 0 (thread_map_full 0).\n\
             Scheduler maps at exit: 1 threads still blocked, 0 waiting to run, 1 threads tracked.\n",
        )
        .unwrap();
        assert_eq!((s.switches, s.blocks, s.short_blocks, s.off_cpu_secs), (443532, 1459, 7, 5.282));
        assert_eq!((s.dropped, s.still_blocked, s.waiting_to_run), (0, 1, 0));
        assert_eq!(s.threads_tracked, Some(1));
    }
}
