//! Off-CPU stages of the agent that go beyond reading the kernel's
//! aggregate: threads already blocked when recording starts (found by the
//! task iterator, user stacks unwound here), and the longest still-blocked
//! threads of a profile, for the summary; and the sampled mode's scaling
//! to exact per-thread totals.

pub mod sampled;
pub mod user_unwind;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use profiler_common::offcpu::{found_blocked_stack_id, BlockedRegs};

use crate::{
    bpf::{BpfError, OffCpuRecord, SampleSource},
    process::{maps::parse_executable, MapEntry},
    profile::Profile,
    unwind::{registry::TableSource, table::UnwindTable, worker::FileTables},
};
use user_unwind::{unwind, ProcessMemory, ProcessTables, Regs};

/// The start scan's user-stack unwinding stops after this long; threads
/// left keep their leaf frame only. Tables of a few large files (python3,
/// libc) build in ~100 ms each.
const SCAN_BUDGET: Duration = Duration::from_secs(3);

/// What the start scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoundBlocked {
    /// Threads blocked since before the start, now counted from it.
    pub threads: usize,
    /// Of those, threads whose user stack went through a table on every
    /// frame.
    pub complete: usize,
    /// Threads left with their leaf frame only (the scan ran out of time).
    pub leaf_only: usize,
    pub took: Duration,
}

/// Starts the off-CPU window at `at_ns` (CLOCK_MONOTONIC), the moment
/// on-CPU sampling started. Blocked time before it is no longer counted
/// (the kernel clips every block to the window), what the scheduler
/// programs counted between attaching and `at_ns` is dropped, and threads
/// blocked since before they attached are found and counted from `at_ns`.
/// Returns the found threads for [`unwind_found`].
///
/// Loading the task iterator and scanning take tens of milliseconds after
/// the scheduler programs attach; counted, that time put a thread blocked
/// all along 1.5 % over what its schedstat allows in
/// `offcpu_multisite::multi_site_blocking_is_exact_per_site_and_per_thread`.
///
/// `sampled` (`--off-cpu-sample` above 1): the threads' pending exact
/// totals, which counted blocks whole before the window opened, are
/// flushed by a cut and dropped; kept, they put the sampled test's server
/// thread 1.4 % over its schedstat.
pub fn begin_window<S: SampleSource>(
    source: &mut S,
    at_ns: u64,
    sampled: bool,
) -> Result<Vec<(u32, BlockedRegs)>, BpfError> {
    source.open_window(at_ns)?;
    if sampled {
        source.cut_still_blocked(at_ns)?;
        source.take_thread_totals()?;
    }
    // Blocks that ended before the window opened, counted whole; a block
    // ending between these two calls loses its first microseconds.
    source.take_off_cpu()?;
    source.take_histograms()?;
    source.find_blocked(at_ns)
}

/// Cuts every thread still blocked at `at_ns`
/// ([`SampleSource::cut_still_blocked`]). In sampled mode the cut also
/// takes the stacks of blocks that went unsampled and have lasted
/// `LONG_BLOCK_NS`: their user stacks are unwound here, from the
/// registers the cut saved, stored for the records read later, and put on
/// the cut's own records. Each such block is unwound once, at the first
/// cut that finds it long.
pub fn cut<S: SampleSource>(source: &mut S, at_ns: u64) -> Result<Vec<OffCpuRecord>, BpfError> {
    let mut records = source.cut_still_blocked(at_ns)?;
    let regs = source.take_blocked_regs()?;
    if regs.is_empty() {
        return Ok(records);
    }
    let (stacks, found) = unwind_found(regs);
    log::debug!("cut: {} long unsampled blocks unwound in {:?}", found.threads, found.took);
    store_found(source, &stacks);
    let by_id: HashMap<u64, &Vec<u64>> = stacks.iter().map(|(id, f)| (*id, f)).collect();
    for r in records.iter_mut().filter(|r| r.user.is_empty()) {
        if let Some(frames) = by_id.get(&r.key.user_stack) {
            r.user = frames.to_vec();
        }
    }
    Ok(records)
}

/// User stacks of found threads, by the stack id their records use.
pub type FoundStacks = Vec<(u64, Vec<u64>)>;

/// Unwinds the user stacks of the threads the start scan found blocked
/// ([`SampleSource::find_blocked`]), from their saved registers; the caller
/// stores them with [`SampleSource::store_stack`] before it reads records.
/// Slow (it builds the tables of the files those threads map), so it runs
/// off the sampling thread.
pub fn unwind_found(found: Vec<(u32, BlockedRegs)>) -> (FoundStacks, FoundBlocked) {
    let started = Instant::now();
    let mut by_process: HashMap<u32, Vec<(u32, BlockedRegs)>> = HashMap::new();
    for (tid, regs) in found {
        by_process.entry(regs.tgid).or_default().push((tid, regs));
    }
    let mut out = FoundBlocked::default();
    let mut stacks = Vec::new();
    let mut files = FileTables::default();
    // Tables by file (device, inode): one libc table serves every process.
    let mut tables: HashMap<(u32, u32, u64), Option<UnwindTable>> = HashMap::new();
    for (tgid, threads) in by_process {
        out.threads += threads.len();
        let in_time = started.elapsed() < SCAN_BUDGET;
        let maps = if in_time {
            std::fs::read_to_string(format!("/proc/{tgid}/maps")).map(|t| parse_executable(&t)).unwrap_or_default()
        } else {
            Vec::new()
        };
        for m in &maps {
            let id = (m.dev_major, m.dev_minor, m.inode);
            if (m.is_file() || m.path == "[vdso]") && !tables.contains_key(&id) {
                tables.insert(id, files.build(tgid, m).ok());
            }
        }
        let table_of = |m: &MapEntry| tables.get(&(m.dev_major, m.dev_minor, m.inode)).and_then(Option::as_ref);
        let process = ProcessTables::new(maps.clone(), table_of);
        let mem = ProcessMemory(tgid);
        for (tid, r) in threads {
            let frames = if in_time {
                let u = unwind(Regs { ip: r.ip, sp: r.sp, bp: r.bp }, &process, &mem);
                out.complete += usize::from(!u.partial);
                u.frames
            } else {
                out.leaf_only += 1;
                vec![r.ip]
            };
            stacks.push((found_blocked_stack_id(tid), frames));
        }
    }
    out.took = started.elapsed();
    (stacks, out)
}

/// Stores unwound stacks; a stack that cannot be stored leaves its records
/// without user frames, which is logged.
pub fn store_found<S: SampleSource>(source: &mut S, stacks: &FoundStacks) {
    for (id, frames) in stacks {
        if let Err(e) = source.store_stack(*id, frames) {
            log::warn!("storing the stack of a thread found blocked failed: {e}");
        }
    }
}

/// The start scan's unwinding, running on its own thread until its stacks
/// are stored.
pub struct PendingFound(Option<std::thread::JoinHandle<(FoundStacks, FoundBlocked)>>);

impl PendingFound {
    /// Unwinds `found` on a new thread.
    pub fn start(found: Vec<(u32, BlockedRegs)>) -> std::io::Result<Self> {
        if found.is_empty() {
            return Ok(Self(None));
        }
        let t = std::thread::Builder::new().name("found-blocked".into()).spawn(move || unwind_found(found))?;
        Ok(Self(Some(t)))
    }

    /// Nothing to wait for.
    pub fn none() -> Self {
        Self(None)
    }

    /// Stores the stacks if the unwinding is done (or, with `wait`, once it
    /// is); returns what the scan found, once.
    pub fn store<S: SampleSource>(&mut self, source: &mut S, wait: bool) -> Option<FoundBlocked> {
        if !wait && !self.0.as_ref().is_some_and(|t| t.is_finished()) {
            return None;
        }
        let (stacks, found) = self.0.take()?.join().ok()?;
        store_found(source, &stacks);
        Some(found)
    }
}

/// Every process now running, for the unwinder to load at the start.
pub fn running_processes() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// One thread still blocked at the end of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StillBlocked {
    pub pid: u32,
    pub tid: u32,
    pub thread_name: String,
    pub ns: u64,
    /// The innermost two user functions, caller first (`wait_for_input >
    /// read`), else the innermost frame.
    pub blocked_in: String,
}

/// The `n` threads with the most still-blocked time in `off`, longest
/// first.
pub fn longest_still_blocked(off: &Profile, n: usize) -> Vec<StillBlocked> {
    let mut by_thread: HashMap<(u32, u32), StillBlocked> = HashMap::new();
    for s in off.samples.iter().filter(|s| s.still_blocked()) {
        let e = by_thread.entry((s.pid, s.tid)).or_insert_with(|| StillBlocked {
            pid: s.pid,
            tid: s.tid,
            thread_name: s.thread_name.clone(),
            ns: 0,
            blocked_in: String::new(),
        });
        e.ns += s.value;
        if e.blocked_in.is_empty() {
            let frames: Vec<_> = s.frames.iter().filter_map(|&i| off.frames.get(i)).collect();
            let mut user: Vec<&str> = Vec::new();
            for f in frames.iter().filter(|f| f.kind != crate::profile::FrameKind::Kernel) {
                if user.last() != Some(&f.function.as_str()) {
                    user.push(&f.function);
                }
                if user.len() == 2 {
                    break;
                }
            }
            user.reverse();
            e.blocked_in = if user.is_empty() {
                frames.first().map(|f| f.function.clone()).unwrap_or_default()
            } else {
                user.join(" > ")
            };
        }
    }
    let mut v: Vec<StillBlocked> = by_thread.into_values().collect();
    v.sort_by_key(|t| (std::cmp::Reverse(t.ns), t.pid, t.tid));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Frame, FrameKind, Sample, ValueType, STILL_BLOCKED_LABEL};

    fn sample(tid: u32, value: u64, frames: Vec<usize>, still: bool) -> Sample {
        Sample {
            pid: 1,
            tid,
            process_name: "p".into(),
            thread_name: format!("t{tid}"),
            cpu: None,
            frames,
            value,
            labels: if still { vec![(STILL_BLOCKED_LABEL.0.into(), STILL_BLOCKED_LABEL.1.into())] } else { vec![] },
        }
    }

    #[test]
    fn longest_still_blocked_sums_per_thread_and_names_the_user_function() {
        let mut p = Profile::new(ValueType::new("off_cpu", "nanoseconds"), None, 0, std::time::SystemTime::UNIX_EPOCH);
        let mut k = Frame::named("pipe_read", false);
        k.kind = FrameKind::Kernel;
        p.frames =
            vec![k, Frame::named("read", false), Frame::named("wait_for_input", false), Frame::named("main", false)];
        p.samples = vec![
            sample(2, 5, vec![0, 1, 1, 2, 3], true),
            sample(2, 7, vec![0, 1, 1, 2, 3], true),
            sample(3, 100, vec![0, 1], false),
            sample(4, 9, vec![0], true),
        ];
        let top = longest_still_blocked(&p, 5);
        assert_eq!(top.len(), 2, "blocks that ended are not listed");
        assert_eq!((top[0].tid, top[0].ns, top[0].blocked_in.as_str()), (2, 12, "wait_for_input > read"));
        assert_eq!((top[1].tid, top[1].blocked_in.as_str()), (4, "pipe_read"));
        assert_eq!(longest_still_blocked(&p, 1).len(), 1);
    }
}
