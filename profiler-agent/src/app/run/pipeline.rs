//! The daemon's sampling and symbolizing stages.
//!
//! The sampling thread drains the kernel continuously and, when the
//! interval timer asks for a cut, hands the interval's raw aggregate to the
//! symbolizing thread through a queue of two. Symbolizing never blocks
//! sampling: if it falls two intervals behind, the newest raw interval is
//! dropped and counted.

use std::{
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use profiler_common::offcpu::{HistKey, Histogram, HIST_OFFCPU, HIST_RUNQ};

use crate::{
    aggregate::{self, Aggregate, Aggregator},
    bpf::{BpfError, OffCpuRecord, SampleSource},
    export::otlp_metrics::{LatencyKind, ProcessHistogram},
    process::ProcessTable,
    profile::{ProcessMeta, Profile, ValueType},
    symbolize::{elf::FileResolver, Symbolizer},
    telemetry::Telemetry,
};

/// How long one poll waits for samples.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// How long before an interval's cut a process must have exited for its
/// entry to be dropped after the interval is symbolized.
const EXIT_MARGIN: Duration = Duration::from_secs(1);

/// Signals from the async side to the sampling thread.
#[derive(Debug, Default)]
pub struct Control {
    /// End the current interval at the next poll.
    pub cut: AtomicBool,
    /// Drain, emit the final interval, and return.
    pub stop: AtomicBool,
}

/// One interval as read from the kernel, before symbolization.
pub struct RawInterval {
    pub start: SystemTime,
    pub end: SystemTime,
    pub aggregate: Aggregate,
    pub off_cpu: Vec<OffCpuRecord>,
    /// Per-process latency histograms (off-CPU mode), cleared at every cut
    /// so each covers exactly this interval.
    pub histograms: Vec<(HistKey, Histogram)>,
    /// The interval ended because the agent is stopping.
    pub last: bool,
}

/// One interval's symbolized profiles: what the exporters receive.
pub struct IntervalProfiles {
    pub cpu: Profile,
    pub off_cpu: Option<Profile>,
    /// The interval's run-queue and off-CPU latency histograms per process
    /// (empty without off-CPU tracing).
    pub latency: Vec<ProcessHistogram>,
}

impl IntervalProfiles {
    /// Every process record of the interval, for the metadata stage.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut ProcessMeta> {
        let off = self.off_cpu.iter_mut().flat_map(|p| p.processes.values_mut());
        self.cpu.processes.values_mut().chain(off).chain(self.latency.iter_mut().map(|l| &mut l.process))
    }
}

/// Samples until `control.stop`, emitting an interval at every cut and a
/// final one when stopping.
pub fn sample_intervals<S: SampleSource>(
    source: &mut S,
    procs: &Mutex<ProcessTable>,
    control: &Control,
    capacity: usize,
    out: &SyncSender<RawInterval>,
    telemetry: &Telemetry,
    unwind: Option<(&crate::unwind::Worker, &crate::unwind::Feed)>,
    lifecycle: Option<&crate::lifecycle::Tracker>,
    mut found: crate::offcpu::PendingFound,
) -> Result<(), BpfError> {
    let feed = unwind.map(|(_, f)| f);
    let mut agg = Aggregator::new(capacity);
    let mut batch = Vec::with_capacity(256);
    let mut start = SystemTime::now();
    loop {
        let stopping = control.stop.load(Ordering::Acquire);
        batch.clear();
        source.poll(&mut batch, if stopping { Duration::ZERO } else { POLL_TIMEOUT })?;
        crate::app::collect::add_batch(&batch, &mut agg, procs, lifecycle);
        if let Some(feed) = feed {
            feed.note(batch.iter().map(|s| (s.tgid, s.flags)));
            // Blocks of processes the kernel has no tables for: (re)load
            // them, like an unwind that met an unknown mapping (after an
            // exec the table thread may still hold the old image).
            let unknown = profiler_common::SAMPLE_FLAG_UNKNOWN_MAPPING;
            feed.note(source.take_notices().into_iter().map(|tgid| (tgid, unknown)));
        }
        let last = stopping && batch.is_empty();
        if last || control.cut.swap(false, Ordering::AcqRel) {
            let end = SystemTime::now();
            // Latency histograms are cleared every interval so they stay
            // per-interval (the OTLP metrics exporter sends them as deltas).
            let histograms = source.take_histograms()?;
            let kernel = source.stats()?;
            telemetry.set_kernel(kernel);
            // Stacks of threads found blocked at the start, before records
            // refer to them; then threads still blocked are counted up to
            // the cut (and from it in the next interval), so a hung thread
            // shows in every interval and no time is counted twice.
            found.store(source, last);
            let at = crate::bpf::monotonic_ns();
            if last {
                // The last cut counts every block still going on, sampled
                // or not (the kernel side's `scan::cut`).
                source.close_window(at)?;
            }
            let mut off_cpu = crate::offcpu::cut(source, at)?;
            off_cpu.extend(source.take_off_cpu()?);
            // Sampled mode: each thread's stacks scaled to its exact total.
            let totals = source.take_thread_totals()?;
            if !totals.is_empty() {
                let c = crate::offcpu::sampled::calibrate(&mut off_cpu, &totals.into());
                log::debug!("sampled off-CPU scaled to exact totals: {c:?}");
            }
            if let Some(feed) = feed {
                // Threads that only block are never sampled on-CPU: their
                // processes are loaded from the off-CPU records.
                feed.note(off_cpu.iter().map(|r| (r.key.tgid, 0)));
            }
            if let Some((w, _)) = unwind {
                telemetry.set_unwind(w.stats());
            }
            if let Some(t) = lifecycle {
                let table = procs.lock().unwrap_or_else(|e| e.into_inner()).stats();
                telemetry.set_processes(t.stats(), table);
            }
            let raw = RawInterval { start, end, aggregate: agg.take(), off_cpu, histograms, last };
            // The final interval must not be lost to a full queue: wait.
            let sent = if last { out.send(raw).map_err(|_| ()) } else { try_send(out, raw) };
            if sent.is_err() {
                telemetry.intervals_dropped.fetch_add(1, Ordering::Relaxed);
            }
            start = end;
        }
        if last {
            return Ok(());
        }
    }
}

fn try_send(out: &SyncSender<RawInterval>, raw: RawInterval) -> Result<(), ()> {
    match out.try_send(raw) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(()),
    }
}

/// Symbolizes raw intervals until the channel closes, handing each result
/// to `emit`.
// One stage's inputs, each used once; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn symbolize_intervals<R: FileResolver>(
    input: Receiver<RawInterval>,
    symbolizer: &mut Symbolizer<R>,
    procs: &Mutex<ProcessTable>,
    frequency: u64,
    off_cpu: bool,
    telemetry: &Telemetry,
    enricher: Option<&crate::metadata::Enricher>,
    mut emit: impl FnMut(Arc<IntervalProfiles>),
) {
    for raw in input {
        if raw.last {
            log::debug!("symbolizing the final, partial interval");
        }
        let mut profiles = symbolize_one(&raw, symbolizer, procs, frequency, off_cpu);
        if let Some(e) = enricher {
            e.apply(profiles.processes_mut());
        }
        // Processes that exited before this interval's cut have had their
        // samples symbolized (a sample reaches the aggregate within a poll
        // period, 100 ms, of being taken; the margin covers a late poll).
        let since_cut = SystemTime::now().duration_since(raw.end).unwrap_or_default();
        if let Some(cutoff) = Instant::now().checked_sub(since_cut + EXIT_MARGIN) {
            procs.lock().unwrap_or_else(|e| e.into_inner()).sweep_exited(cutoff);
        }
        symbolizer.resolver_mut().end_pass();
        telemetry.symbol_files_evicted.store(symbolizer.resolver().files_evicted(), Ordering::Relaxed);
        let stats = symbolizer.stats();
        let cache = symbolizer.cache_stats();
        telemetry.frames.store(stats.frames, Ordering::Relaxed);
        telemetry.frames_unsymbolized.store(stats.unsymbolized, Ordering::Relaxed);
        let jit = procs.lock().unwrap_or_else(|e| e.into_inner()).jit.stats();
        telemetry.set_jit(jit, stats.jit, stats.jit_unnamed);
        telemetry.cache_hits.store(cache.hits, Ordering::Relaxed);
        telemetry.cache_misses.store(cache.misses, Ordering::Relaxed);
        telemetry.cache_evictions.store(cache.evictions, Ordering::Relaxed);
        telemetry.cache_entries.store(symbolizer.cache_len() as u64, Ordering::Relaxed);
        telemetry.aggregation_dropped.fetch_add(raw.aggregate.dropped, Ordering::Relaxed);
        telemetry.intervals.fetch_add(1, Ordering::Relaxed);
        emit(Arc::new(profiles));
        // An interval's aggregates, profiles and parsed files were just
        // freed; hand the free pages back instead of letting each arena keep
        // its high-water mark (`cargo xtask bench churn`).
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe { libc::malloc_trim(0) };
    }
}

/// One interval's profiles.
pub fn symbolize_one<R: FileResolver>(
    raw: &RawInterval,
    symbolizer: &mut Symbolizer<R>,
    mut procs: &Mutex<ProcessTable>,
    frequency: u64,
    off_cpu: bool,
) -> IntervalProfiles {
    let duration_ns = raw.end.duration_since(raw.start).map_or(0, |d| d.as_nanos() as u64);
    let period = 1_000_000_000 / frequency.max(1);
    let mut cpu =
        Profile::new(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")), period, raw.start);
    cpu.duration_ns = duration_ns;
    symbolizer.symbolize(&raw.aggregate, &mut procs, &mut cpu);
    let off = off_cpu.then(|| {
        let mut p = Profile::new(ValueType::new("off_cpu", "nanoseconds"), None, 0, raw.start);
        p.duration_ns = duration_ns;
        let agg = aggregate::from_off_cpu(&raw.off_cpu, usize::MAX);
        symbolizer.symbolize(&agg, &mut procs, &mut p);
        p
    });
    let latency = process_histograms(&raw.histograms, &[Some(&cpu), off.as_ref()], procs);
    IntervalProfiles { cpu, off_cpu: off, latency }
}

/// The kernel's histograms with what is known of their processes: from the
/// profiles, else the process table, else a cheap look at `/proc` (a process
/// that only waited or slept has no samples, and reading its maps just to
/// name it is not worth it).
fn process_histograms(
    hists: &[(HistKey, Histogram)],
    profiles: &[Option<&Profile>],
    procs: &Mutex<ProcessTable>,
) -> Vec<ProcessHistogram> {
    let mut known: std::collections::HashMap<u32, ProcessMeta> = std::collections::HashMap::new();
    hists
        .iter()
        .filter_map(|(key, h)| {
            let kind = match key.kind {
                HIST_RUNQ => LatencyKind::RunQueue,
                HIST_OFFCPU => LatencyKind::OffCpu,
                _ => return None,
            };
            let process = known
                .entry(key.tgid)
                .or_insert_with(|| {
                    let pid = key.tgid;
                    if let Some(m) = profiles.iter().flatten().find_map(|p| p.processes.get(&pid)) {
                        return m.clone();
                    }
                    let cached = procs.lock().unwrap_or_else(|e| e.into_inner()).get(pid);
                    match cached {
                        Some(info) => ProcessMeta {
                            pid,
                            name: info.name.clone(),
                            exe_path: info.exe_path.clone(),
                            container_id: info.container_id.clone(),
                            pod_uid: info.pod_uid.clone(),
                            pod: None,
                        },
                        None => {
                            let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
                            let name = std::fs::read_to_string(dir.join("comm"))
                                .map(|s| s.trim_end_matches('\n').to_owned())
                                .unwrap_or_default();
                            let exe_path =
                                std::fs::read_link(dir.join("exe")).ok().map(|p| p.to_string_lossy().into_owned());
                            ProcessMeta { pid, name, exe_path, ..Default::default() }
                        }
                    }
                })
                .clone();
            Some(ProcessHistogram { process, kind, histogram: *h })
        })
        .collect()
}

/// A process table sized for a long-running daemon.
pub fn process_table() -> Mutex<ProcessTable> {
    Mutex::new(ProcessTable::new("/proc", NonZeroUsize::new(16_384).expect("non-zero")))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;

    use super::*;
    use crate::{
        bpf::fake::{sample, FakeSource},
        symbolize::{cache::Resolved, kallsyms::KernelSymbols},
    };

    struct NoSymbols;
    impl FileResolver for NoSymbols {
        fn resolve(&mut self, _: &std::path::Path, offsets: &[u64]) -> Vec<Resolved> {
            offsets.iter().map(|_| Resolved::from(Vec::new())).collect()
        }
    }

    #[test]
    fn cuts_intervals_and_emits_a_final_one_on_stop() {
        let mut src = FakeSource::default();
        for i in 0..3 {
            src.push(sample(1, 1, "a", &[], &[0x1000 + i]));
        }
        let dir = tempfile::tempdir().unwrap();
        let procs = Mutex::new(ProcessTable::new(dir.path(), NonZeroUsize::new(4).unwrap()));
        let control = Control::default();
        control.cut.store(true, Ordering::Relaxed);
        control.stop.store(true, Ordering::Relaxed);
        let (tx, rx) = sync_channel(2);
        let telemetry = Telemetry::default();
        sample_intervals(
            &mut src,
            &procs,
            &control,
            100,
            &tx,
            &telemetry,
            None,
            None,
            crate::offcpu::PendingFound::none(),
        )
        .unwrap();
        drop(tx);
        let raws: Vec<RawInterval> = rx.into_iter().collect();
        // The cut happens after the first batch (all 3 samples); the final
        // interval is empty and marked last.
        assert_eq!(raws.len(), 2);
        assert_eq!(raws[0].aggregate.samples, 3);
        assert!(!raws[0].last && raws[1].last);
        assert_eq!(raws[1].aggregate.samples, 0);
        assert!(raws[0].start <= raws[0].end && raws[0].end <= raws[1].start + Duration::from_millis(1));

        let mut sym = Symbolizer::new(NoSymbols, KernelSymbols::default(), NonZeroUsize::new(16).unwrap());
        let p = symbolize_one(&raws[0], &mut sym, &procs, 19, true);
        assert_eq!(p.cpu.total(), 3);
        assert_eq!(p.cpu.period, 1_000_000_000 / 19);
        assert!(p.off_cpu.as_ref().is_some_and(|o| o.samples.is_empty()));
    }

    /// A source whose only data is one run-queue and one off-CPU histogram
    /// for the test process itself (never sampled, not in the table).
    struct Histograms(Vec<(HistKey, Histogram)>);
    impl SampleSource for Histograms {
        fn poll(&mut self, _: &mut Vec<profiler_common::Sample>, _: Duration) -> Result<usize, BpfError> {
            Ok(0)
        }
        fn stats(&self) -> Result<crate::bpf::KernelStats, BpfError> {
            Ok(Default::default())
        }
        fn take_histograms(&mut self) -> Result<Vec<(HistKey, Histogram)>, BpfError> {
            Ok(std::mem::take(&mut self.0))
        }
    }

    #[test]
    fn latency_histograms_reach_the_exporters_with_their_process() {
        let pid = std::process::id();
        let mut h = crate::latency::empty();
        h.buckets[12] = 5;
        h.max_ns = 3_000;
        let mut src = Histograms(vec![
            (HistKey { tgid: pid, kind: HIST_RUNQ }, h),
            (HistKey { tgid: pid, kind: HIST_OFFCPU }, h),
            (HistKey { tgid: pid, kind: 7 }, h),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let procs = Mutex::new(ProcessTable::new(dir.path(), NonZeroUsize::new(4).unwrap()));
        let control = Control::default();
        control.stop.store(true, Ordering::Relaxed);
        let (tx, rx) = sync_channel(2);
        sample_intervals(
            &mut src,
            &procs,
            &control,
            100,
            &tx,
            &Telemetry::default(),
            None,
            None,
            crate::offcpu::PendingFound::none(),
        )
        .unwrap();
        drop(tx);
        let raw = rx.recv().unwrap();
        assert_eq!(raw.histograms.len(), 3, "taken at the cut, as the kernel gave them");
        let mut sym = Symbolizer::new(NoSymbols, KernelSymbols::default(), NonZeroUsize::new(16).unwrap());
        let p = symbolize_one(&raw, &mut sym, &procs, 19, true);
        let kinds: Vec<LatencyKind> = p.latency.iter().map(|l| l.kind).collect();
        assert_eq!(kinds, [LatencyKind::RunQueue, LatencyKind::OffCpu], "unknown kinds are skipped");
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        for l in &p.latency {
            assert_eq!(l.process.pid, pid);
            assert_eq!(l.process.name, comm.trim_end(), "named from /proc without reading its maps");
            assert_eq!(crate::latency::count(&l.histogram), 5);
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_intervals_but_never_the_last() {
        let mut src = FakeSource::default();
        src.push(sample(1, 1, "a", &[], &[0x1000]));
        let dir = tempfile::tempdir().unwrap();
        let procs = Mutex::new(ProcessTable::new(dir.path(), NonZeroUsize::new(4).unwrap()));
        let control = Control::default();
        let (tx, rx) = sync_channel(1);
        let telemetry = Telemetry::default();
        // Fill the queue, then cut once more: that interval is dropped.
        tx.send(RawInterval {
            start: SystemTime::now(),
            end: SystemTime::now(),
            aggregate: Aggregate::default(),
            off_cpu: vec![],
            histograms: vec![],
            last: false,
        })
        .unwrap();
        control.cut.store(true, Ordering::Relaxed);
        control.stop.store(true, Ordering::Relaxed);
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            rx.into_iter().count()
        });
        sample_intervals(
            &mut src,
            &procs,
            &control,
            100,
            &tx,
            &telemetry,
            None,
            None,
            crate::offcpu::PendingFound::none(),
        )
        .unwrap();
        drop(tx);
        assert_eq!(telemetry.intervals_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(reader.join().unwrap(), 2, "the pre-filled one and the last one");
    }
}
