//! The sampling loop: drains the BPF source into the aggregator until told
//! to stop, noting each new process on first sight so its mappings are known
//! even if it exits before the profile is symbolized.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use profiler_common::Sample;

use crate::{
    aggregate::Aggregator,
    bpf::{BpfError, SampleSource},
    lifecycle::Tracker,
    process::ProcessTable,
    unwind::Feed,
};

/// How long one poll waits for samples. Short enough that stopping is
/// prompt, long enough that an idle agent wakes only 10 times a second.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// Drains `source` into `agg`, until `stop` is set and the source is empty.
/// `progress` receives the number of samples aggregated so far.
///
/// When it sees `stop` it closes the window: samples taken later are
/// dropped, the source stops counting off-CPU time, and that moment
/// (CLOCK_MONOTONIC ns) is returned, so both views end together although
/// the programs stay attached until the caller detaches them.
pub fn collect<S: SampleSource>(
    source: &mut S,
    agg: &mut Aggregator,
    procs: &Mutex<ProcessTable>,
    stop: &AtomicBool,
    progress: &AtomicU64,
    unwind: Option<&Feed>,
    lifecycle: Option<&Tracker>,
) -> Result<u64, BpfError> {
    let mut batch = Vec::with_capacity(256);
    let mut end_ns = None;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if stopping && end_ns.is_none() {
            let now = crate::bpf::monotonic_ns();
            source.close_window(now)?;
            end_ns = Some(now);
        }
        batch.clear();
        source.poll(&mut batch, if stopping { Duration::ZERO } else { POLL_TIMEOUT })?;
        let polled = batch.len();
        if let Some(end) = end_ns {
            batch.retain(|s| s.time_ns <= end);
        }
        add_batch(&batch, agg, procs, lifecycle);
        if let Some(feed) = unwind {
            feed.note(batch.iter().map(|s| (s.tgid, s.flags)));
            // Blocks of processes the kernel has no tables for: (re)load
            // them, like an unwind that met an unknown mapping (after an
            // exec the table thread may still hold the old image).
            let unknown = profiler_common::SAMPLE_FLAG_UNKNOWN_MAPPING;
            feed.note(source.take_notices().into_iter().map(|tgid| (tgid, unknown)));
        }
        progress.store(agg.samples(), Ordering::Relaxed);
        if let (Some(end), 0) = (end_ns, polled) {
            return Ok(end);
        }
    }
}

/// Stamps each sample with its process's image (generation) and adds it.
/// Lifecycle events are applied first: every exec before these samples is
/// then in the table, so none is stamped with an image it did not run.
pub fn add_batch(batch: &[Sample], agg: &mut Aggregator, procs: &Mutex<ProcessTable>, lifecycle: Option<&Tracker>) {
    if batch.is_empty() {
        return;
    }
    if let Some(t) = lifecycle {
        t.catch_up();
    }
    let mut table = procs.lock().unwrap_or_else(|e| e.into_inner());
    let mut python = crate::runtimes::python::shared().lock().unwrap_or_else(|e| e.into_inner());
    for s in batch {
        let comm = String::from_utf8_lossy(s.comm_bytes());
        let generation = table.observe_at(s.tgid, s.time_ns, &comm);
        // Python functions are named while their process lives.
        python.warm(s.tgid, s.user_stack());
        agg.add_in_generation(s, generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::fake::{sample, FakeSource};
    use std::num::NonZeroUsize;

    #[test]
    fn drains_everything_queued_before_stopping() {
        let mut src = FakeSource { batch: 3, ..Default::default() };
        for i in 0..10 {
            src.push(sample(1, 1, "a", &[], &[0x1000 + i]));
        }
        let dir = tempfile::tempdir().unwrap();
        let procs = Mutex::new(ProcessTable::new(dir.path(), NonZeroUsize::new(4).unwrap()));
        let mut agg = Aggregator::new(100);
        let stop = AtomicBool::new(true);
        let progress = AtomicU64::new(0);
        collect(&mut src, &mut agg, &procs, &stop, &progress, None, None).unwrap();
        assert_eq!(progress.load(Ordering::Relaxed), 10);
        assert_eq!(agg.len(), 10);
        assert!(src.queue.is_empty());
        // The process was looked up on first sight (it had already gone).
        assert_eq!(procs.lock().unwrap().stats().vanished, 1);
    }
}
