//! `profiler-agent record`: sample for a while (or until Ctrl-C/SIGTERM),
//! then aggregate -> symbolize -> write files, like `perf record` followed by
//! `perf script | stackcollapse`.

mod blocks;
mod outputs;
mod timeline;
mod wait;

use std::{
    collections::HashMap,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;

use super::{
    collect::collect,
    preflight,
    summary::{JitSummary, ProcessLatency, SchedulerSummary, Summary},
};
use crate::{
    aggregate::{self, Aggregator},
    bpf::{EbpfSource, LoadOptions, OffCpuOptions, SampleSource, UnwindOptions},
    cli::{RecordArgs, Unwinder},
    latency, offcpu,
    process::ProcessTable,
    profile::{Profile, ValueType},
    symbolize::{elf::Blaze, kallsyms::KernelSymbols, Symbolizer},
    unwind,
};
use outputs::Output;
use profiler_common::offcpu::{Histogram, HIST_OFFCPU, HIST_RUNQ};

/// Unique stacks kept per recording; beyond it new stacks are dropped and
/// counted. 1M stacks of ~20 frames is ~400 MB worst case, reached only by
/// pathological workloads in hours-long recordings.
const MAX_UNIQUE_STACKS: usize = 1 << 20;
/// Processes remembered (name and mappings).
const MAX_PROCESSES: usize = 16_384;
/// Symbolized addresses cached.
const SYMBOL_CACHE_ENTRIES: usize = 1 << 18;
/// Processes listed in the latency table of the summary.
const TOP_PROCESSES: usize = 5;

pub async fn record(args: RecordArgs) -> anyhow::Result<()> {
    // Usage errors first, each before anything is loaded or attached.
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    preflight::check_capabilities(&status)?;
    preflight::warn_degraded(&status);
    preflight::check_btf(Path::new("/sys/kernel/btf/vmlinux"))?;
    preflight::check_pids(Path::new("/proc"), &args.pids)?;
    // The earlier recording is checked now, not after recording for minutes.
    let baseline = match &args.compare_to {
        Some(d) => {
            let side = super::diff::load_side("--compare-to", d, Some(crate::diff::ProfileKind::Cpu))?;
            super::diff::check_repeats("--compare-to", &side)?;
            Some(side)
        }
        None => None,
    };
    let mut targets = crate::config::Targets::default();
    args.targets.merge_into(&mut targets);
    let cgroup2 = crate::target::cgroup2_root();
    let selection = crate::target::Selection::build(&args.pids, &targets, cgroup2.as_deref(), false)?;
    let dir = args.output_dir.clone().unwrap_or_else(default_output_dir);
    preflight::prepare_output_dir(&dir)?;

    let opts = LoadOptions {
        frequency: args.frequency,
        pids: args.pids.clone(),
        targets: selection.needs_maintenance(),
        off_cpu: args.off_cpu.then_some(OffCpuOptions {
            min_block_ns: args.off_cpu_min_block.as_nanos() as u64,
            sample_every: args.off_cpu_sample,
            force_raw_tracepoints: args.off_cpu_raw_tracepoints,
        }),
        unwind: (args.unwinder == Unwinder::Cfi)
            .then(|| UnwindOptions { rows: unwind::rows_for(args.unwind_table_memory) }),
    };
    let mut source = EbpfSource::load(&opts).context("loading the eBPF programs failed")?;
    let (tables, feed) = match source.take_unwind_maps().context("setting up CFI unwinding failed")? {
        Some(maps) => {
            let (worker, feed) = unwind::Worker::start(maps, &args.pids).context("starting the unwind table thread")?;
            (Some(worker), Some(feed))
        }
        None => (None, None),
    };
    let procs = Arc::new(Mutex::new(ProcessTable::new("/proc", NonZeroUsize::new(MAX_PROCESSES).expect("non-zero"))));
    // A fixed `--pid` list: other processes' execs need nothing.
    let only = (!selection.needs_maintenance() && !args.pids.is_empty()).then_some(args.pids.as_slice());
    let lifecycle = crate::lifecycle::start_from(&mut source, procs.clone(), feed.as_ref(), only)
        .context("starting process lifecycle tracking")?;
    // The selection is in the kernel before the first sample.
    let selected = match selection.needs_maintenance() {
        true => Some(crate::target::Running::start(
            source.take_target_maps()?,
            selection,
            cgroup2,
            None,
            Default::default(),
        )?),
        false => None,
    };
    // An exec can give a process a name that `--process-name` selects:
    // re-evaluate it then, not at the next rescan.
    if let (Some(t), Some(l)) = (&selected, &lifecycle) {
        let targeter = t.targeter.clone();
        l.subscribe(Box::new(move |e| {
            if let crate::lifecycle::LifecycleEvent::Exec { pid, .. } = e {
                targeter.lock().unwrap_or_else(|e| e.into_inner()).on_exec(*pid);
            }
        }));
    }
    source.attach().with_context(|| crate::app::preflight::attach_failed_hint(args.unwinder == Unwinder::Cfi))?;
    // The window starts when sampling does: `attach` opens the cpu-clock
    // events last.
    let cpus = aya::util::online_cpus().map(|c| c.len()).unwrap_or(0);
    let start_wall = SystemTime::now();
    let started = Instant::now();
    let blocks_start = crate::bpf::monotonic_ns();
    // Off-CPU from the first second: threads blocked since before now are
    // found (their user stacks unwound on another thread, stored before the
    // records are read), and every process's tables load in the background
    // rather than on its first on-CPU sample, which a process that mostly
    // blocks rarely has.
    let found_unwinder = if args.off_cpu {
        let found = offcpu::begin_window(&mut source, blocks_start, args.off_cpu_sample > 1)
            .context("scanning for blocked threads failed")?;
        log::debug!(
            "window open at {blocks_start} ns; {} threads found blocked, in {:?}",
            found.len(),
            started.elapsed()
        );
        // (`--pid` processes were loaded before attaching.)
        if let (Some(feed), true) = (&feed, args.pids.is_empty()) {
            feed.load_in_background(offcpu::running_processes());
        }
        offcpu::PendingFound::start(found)?
    } else {
        offcpu::PendingFound::none()
    };

    // Sampling runs on its own thread: it must keep draining the ring buffer
    // whatever the async side is doing.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let collector = {
        let (stop, progress, procs, off_cpu) = (stop.clone(), progress.clone(), procs.clone(), args.off_cpu);
        std::thread::Builder::new().name("collect".into()).spawn(move || {
            let mut agg = Aggregator::new(MAX_UNIQUE_STACKS);
            let mut tap = blocks::BlockTap::new(source, blocks::Blocks::new(blocks_start, blocks::BLOCK), off_cpu);
            let result = collect(&mut tap, &mut agg, &procs, &stop, &progress, feed.as_ref(), lifecycle.as_ref());
            let blocks::TapParts { source, blocks, timeline, totals } = tap.into_parts();
            let lifecycle = lifecycle.map(|t| t.stop());
            // Dropping the feed (and the tracker's handle) ends the table
            // thread.
            drop(feed);
            (result, source, agg, lifecycle, blocks, timeline, totals)
        })?
    };

    wait::until_done(args.duration, started, &progress).await?;
    stop.store(true, Ordering::Release);
    let (result, mut source, mut agg, lifecycle, mut time_blocks, timeline, mut totals) =
        tokio::task::spawn_blocking(move || collector.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the sampling thread panicked"))?;
    // The window closed when the collector saw `stop`; on- and off-CPU
    // time both end there.
    let end_ns = result.context("reading samples from the kernel failed")?;
    log::debug!("window closed at {end_ns} ns");
    let elapsed = Duration::from_nanos(end_ns.saturating_sub(blocks_start));

    // Detach first, so the maps read below are final and consistent.
    let kernel_stats = source.stats().context("reading the kernel-side counters failed")?;
    let run_time = source.run_time();
    source.detach().context("detaching the eBPF programs failed")?;
    let mut found_unwinder = found_unwinder;
    let found_blocked = found_unwinder.store(&mut source, true).map_or(0, |f| f.threads);
    // Threads still blocked now are counted up to the end.
    let cut = offcpu::cut(&mut source, end_ns).context("counting the threads still blocked failed")?;
    let ended = source.take_off_cpu().context("reading the off-CPU aggregate failed")?;
    totals.add(source.take_thread_totals().context("reading the per-thread off-CPU totals failed")?);
    // The per-second blocks keep the sampled estimates; the recording's
    // profile is scaled to the exact totals, over the whole recording so
    // that a thread sampled in few seconds is still attributed.
    time_blocks.add_off(end_ns, &cut);
    time_blocks.add_off(end_ns, &ended);
    let mut off_cpu_records = timeline.finish(ended, cut);
    if !totals.is_empty() {
        let c = offcpu::sampled::calibrate(&mut off_cpu_records, &totals);
        log::debug!("sampled off-CPU scaled to exact totals: {c:?}");
    }
    let histograms = source.take_histograms().context("reading the latency histograms failed")?;
    let occupancy = source.occupancy().context("reading the scheduler maps failed")?;
    drop(source);
    let unwind_stats = match tables {
        Some(t) => Some(tokio::task::spawn_blocking(move || t.join()).await?),
        None => None,
    };

    let mut symbolizer = Symbolizer::new(
        Blaze::default(),
        KernelSymbols::load(),
        NonZeroUsize::new(SYMBOL_CACHE_ENTRIES).expect("non-zero"),
    );
    let aggregate = agg.take();
    let mut procs = procs.lock().unwrap_or_else(|e| e.into_inner());
    let procs = &mut *procs;
    let period = 1_000_000_000 / args.frequency;
    let mut cpu = Profile::new(
        ValueType::new("samples", "count"),
        Some(ValueType::new("cpu", "nanoseconds")),
        period,
        start_wall,
    );
    cpu.duration_ns = elapsed.as_nanos() as u64;
    symbolizer.symbolize(&aggregate, procs, &mut cpu);

    let mut outputs =
        vec![Output { stem: "cpu", profile: &cpu, title: "On-CPU flame graph", unit: "samples", pprof: true }];
    let (off, wall, scheduler);
    let mut extra_files = Vec::new();
    if args.off_cpu {
        let mut p = Profile::new(ValueType::new("off_cpu", "nanoseconds"), None, 0, start_wall);
        p.duration_ns = cpu.duration_ns;
        symbolizer.symbolize(&aggregate::from_off_cpu(&off_cpu_records, MAX_UNIQUE_STACKS), procs, &mut p);
        off = p;
        wall = outputs::wall_profile(&cpu, &off);
        outputs.push(Output {
            stem: "off-cpu",
            profile: &off,
            title: "Off-CPU flame graph (ns blocked)",
            unit: "ns",
            pprof: true,
        });
        outputs.push(Output {
            stem: "wall",
            profile: &wall,
            title: "Wall-clock flame graph per thread (ns)",
            unit: "ns",
            pprof: false,
        });
        let mut latencies = process_latencies(&histograms, procs);
        let csv = dir.join("latency.csv");
        crate::export::files::write_atomic(&csv, latency_csv(&latencies).as_bytes())?;
        extra_files.push(csv);
        latencies.truncate(TOP_PROCESSES);
        scheduler = Some(SchedulerSummary {
            processes: latencies,
            off_cpu_ns: off.total(),
            blocked_left: occupancy.blocked,
            runnable_left: occupancy.runnable,
            tracked_left: occupancy.threads.len(),
            found_blocked,
            longest_still_blocked: offcpu::longest_still_blocked(&off, TOP_PROCESSES),
        });
    } else {
        scheduler = None;
    }
    let mut files = outputs::write_all(&outputs, &dir, &args.format)?;
    files.extend(extra_files);
    let blocks_abandoned = time_blocks.abandoned();
    if let Some(finished) = time_blocks.finish(end_ns) {
        let (path, n) = blocks::write(&dir, &finished, start_wall, period, &args.format, &mut symbolizer, procs)?;
        if n > 0 {
            files.push(path);
        }
    }

    let mut pids: Vec<u32> = aggregate.stacks.keys().map(|k| k.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    let jit = jit_summary(&symbolizer, procs);
    let summary = Summary {
        elapsed,
        frequency: args.frequency,
        cpus,
        kernel: kernel_stats,
        received: aggregate.samples,
        aggregation_dropped: aggregate.dropped,
        unique_stacks: aggregate.stacks.len(),
        processes: pids.len(),
        symbols: symbolizer.stats(),
        vanished_processes: procs.stats().vanished,
        run_time,
        scheduler,
        unwind: unwind_stats,
        jit,
        lifecycle: lifecycle.map(|e| (e, procs.stats())),
        files,
    };
    eprint!("{}", summary.render());
    if blocks_abandoned {
        eprintln!(
            "Time blocks (for `profiler-agent diff`) not written: more than {} stacks per block in all.",
            blocks::MAX_BLOCK_STACKS
        );
    }
    if let Some(before) = baseline {
        print!("{}", super::diff::compare_recordings(&before, &dir)?);
    }
    Ok(())
}

/// The JIT part of the summary, when a process ran JIT code: which
/// processes had unnamed JIT frames and no map, and the flag that helps.
fn jit_summary(symbolizer: &Symbolizer<Blaze>, procs: &mut ProcessTable) -> Option<JitSummary> {
    let stats = procs.jit.stats();
    let sym = symbolizer.stats();
    if stats.processes == 0 && sym.jit == 0 && sym.jit_unnamed == 0 {
        return None;
    }
    let mut missing = Vec::new();
    for (&pid, &frames) in symbolizer.jit_unnamed() {
        let info = procs.observe(pid, "");
        let (runtime, found) = procs
            .jit
            .status(pid)
            .unwrap_or_else(|| (crate::runtimes::names::runtime_of(info.exe_path.as_deref(), &info.name), false));
        if !found {
            missing.push((pid, info.name.clone(), frames, crate::runtimes::names::hint(runtime)));
        }
    }
    missing.sort_by_key(|m| std::cmp::Reverse(m.2));
    Some(JitSummary { stats, missing })
}

/// Run-queue and off-CPU latency per process, the processes with the most
/// scheduling events first.
fn process_latencies(
    histograms: &[(profiler_common::offcpu::HistKey, Histogram)],
    procs: &mut ProcessTable,
) -> Vec<ProcessLatency> {
    let mut by_pid: HashMap<u32, (Histogram, Histogram)> = HashMap::new();
    for (key, h) in histograms {
        let entry = by_pid.entry(key.tgid).or_insert_with(|| (latency::empty(), latency::empty()));
        match key.kind {
            HIST_RUNQ => latency::merge(&mut entry.0, h),
            HIST_OFFCPU => latency::merge(&mut entry.1, h),
            _ => {}
        }
    }
    let mut rows: Vec<ProcessLatency> = by_pid
        .into_iter()
        .map(|(pid, (runq, off))| ProcessLatency {
            pid,
            name: procs.observe(pid, "").name.clone(),
            runq: latency::percentiles(&runq),
            off_cpu: latency::percentiles(&off),
        })
        .collect();
    rows.sort_by_key(|r| (std::cmp::Reverse(r.runq.count + r.off_cpu.count), r.pid));
    rows
}

/// `latency.csv`: one row per process and kind, for scripts and plots.
fn latency_csv(rows: &[ProcessLatency]) -> String {
    let mut out = String::from("pid,process,kind,count,p50_ns,p95_ns,p99_ns,max_ns\n");
    for r in rows {
        for (kind, p) in [("runqueue", &r.runq), ("offcpu", &r.off_cpu)] {
            if p.count > 0 {
                let name = r.name.replace([',', '\n', '"'], "_");
                out.push_str(&format!(
                    "{},{},{},{},{:.0},{:.0},{:.0},{}\n",
                    r.pid, name, kind, p.count, p.p50, p.p95, p.p99, p.max
                ));
            }
        }
    }
    out
}

/// `./profile-YYYYMMDD-HHMMSS` in local time.
fn default_output_dir() -> PathBuf {
    // SAFETY: time(NULL) and localtime_r only write into `tm`.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&now, &mut tm) };
    PathBuf::from(format!(
        "profile-{:04}{:02}{:02}-{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::Percentiles;

    #[test]
    fn latency_csv_has_a_row_per_process_and_kind_with_data() {
        let rows = vec![ProcessLatency {
            pid: 7,
            name: "a,b".into(),
            runq: Percentiles { count: 3, p50: 1.4, p95: 2.0, p99: 2.0, max: 2 },
            off_cpu: Percentiles::default(),
        }];
        assert_eq!(
            latency_csv(&rows),
            "pid,process,kind,count,p50_ns,p95_ns,p99_ns,max_ns\n7,a_b,runqueue,3,1,2,2,2\n"
        );
    }
}
