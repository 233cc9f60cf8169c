//! `profiler-agent record`: sample for a while (or until Ctrl-C/SIGTERM),
//! then aggregate -> symbolize -> write files, like `perf record` followed by
//! `perf script | stackcollapse`.

use std::{
    io::{IsTerminal, Write},
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use super::{collect::collect, preflight, summary::Summary};
use crate::{
    aggregate::Aggregator,
    bpf::{EbpfSource, LoadOptions, SampleSource},
    cli::{Format, RecordArgs},
    export::{files::write_atomic, folded, pprof, svg},
    process::ProcessTable,
    profile::{Profile, ValueType},
    symbolize::{elf::Blaze, kallsyms::KernelSymbols, Symbolizer},
};

/// Unique stacks kept per recording; beyond it new stacks are dropped and
/// counted. 1M stacks of ~20 frames is ~400 MB worst case, reached only by
/// pathological workloads in hours-long recordings.
const MAX_UNIQUE_STACKS: usize = 1 << 20;
/// Processes remembered (name and mappings).
const MAX_PROCESSES: usize = 16_384;
/// Symbolized addresses cached.
const SYMBOL_CACHE_ENTRIES: usize = 1 << 18;

pub async fn record(args: RecordArgs) -> anyhow::Result<()> {
    // Usage errors first, each before anything is loaded or attached.
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    preflight::check_capabilities(&status)?;
    preflight::check_btf(Path::new("/sys/kernel/btf/vmlinux"))?;
    preflight::check_pids(Path::new("/proc"), &args.pids)?;
    let dir = args.output_dir.clone().unwrap_or_else(default_output_dir);
    preflight::prepare_output_dir(&dir)?;

    let opts = LoadOptions { frequency: args.frequency, pids: args.pids.clone() };
    let mut source = EbpfSource::load(&opts).context("loading the eBPF programs failed")?;
    let cpus = aya::util::online_cpus().map(|c| c.len()).unwrap_or(0);
    let start_wall = SystemTime::now();
    let started = Instant::now();

    // Sampling runs on its own thread: it must keep draining the ring buffer
    // whatever the async side is doing.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let collector = {
        let (stop, progress) = (stop.clone(), progress.clone());
        std::thread::Builder::new().name("collect".into()).spawn(move || {
            let mut agg = Aggregator::new(MAX_UNIQUE_STACKS);
            let mut procs = ProcessTable::new("/proc", NonZeroUsize::new(MAX_PROCESSES).expect("non-zero"));
            let result = collect(&mut source, &mut agg, &mut procs, &stop, &progress);
            (result, source, agg, procs)
        })?
    };

    wait_until_done(args.duration, started, &progress).await?;
    stop.store(true, Ordering::Release);
    let (result, source, mut agg, mut procs) =
        tokio::task::spawn_blocking(move || collector.join()).await?.map_err(|_| anyhow::anyhow!("the sampling thread panicked"))?;
    result.context("reading samples from the kernel failed")?;
    let elapsed = started.elapsed();
    let kernel_stats = source.stats().context("reading the kernel-side counters failed")?;
    let bpf_run = source.run_time();
    drop(source); // detach before the (possibly slow) symbolization

    let aggregate = agg.take();
    let period = 1_000_000_000 / args.frequency;
    let mut profile =
        Profile::new(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")), period, start_wall);
    profile.duration_ns = elapsed.as_nanos() as u64;
    let mut symbolizer = Symbolizer::new(
        Blaze::default(),
        KernelSymbols::load(),
        NonZeroUsize::new(SYMBOL_CACHE_ENTRIES).expect("non-zero"),
    );
    symbolizer.symbolize(&aggregate, &mut procs, &mut profile);

    let files = write_outputs(&profile, &dir, &args.format)?;
    let mut pids: Vec<u32> = aggregate.stacks.keys().map(|k| k.pid).collect();
    pids.sort_unstable();
    pids.dedup();
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
        bpf_run,
        files,
    };
    eprint!("{}", summary.render());
    Ok(())
}

/// Waits for the duration, Ctrl-C or SIGTERM, showing progress when stderr
/// is a terminal.
async fn wait_until_done(duration: Option<Duration>, started: Instant, progress: &AtomicU64) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let tty = std::io::stderr().is_terminal();
    let deadline = duration.map(|d| tokio::time::Instant::from_std(started + d));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    if !tty {
        eprintln!("Recording{}; Ctrl-C stops and writes the profile.", duration.map_or(String::new(), |d| format!(" for {:.0?}", d)));
    }
    loop {
        tokio::select! {
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => break,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tick.tick() => {
                if tty {
                    let total = duration.map_or(String::new(), |d| format!(" / {}s", d.as_secs()));
                    eprint!("\rrecording: {}s{total}, {} samples   ", started.elapsed().as_secs(), progress.load(Ordering::Relaxed));
                    let _ = std::io::stderr().flush();
                }
            }
        }
    }
    if tty {
        eprintln!();
    }
    Ok(())
}

fn write_outputs(profile: &Profile, dir: &Path, formats: &[Format]) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let folded_text = folded::encode(profile);
    for format in formats {
        let (name, bytes) = match format {
            Format::Folded => ("cpu.folded", folded_text.clone().into_bytes()),
            Format::Pprof => ("cpu.pb.gz", pprof::to_gzip(profile)?),
            Format::Svg => ("cpu.svg", svg::render(&folded_text, "On-CPU flame graph", "samples")?),
        };
        let path = dir.join(name);
        write_atomic(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}

/// `./profile-YYYYMMDD-HHMMSS` in local time.
fn default_output_dir() -> PathBuf {
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: localtime_r writes only into `tm`.
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
