//! `profiler-agent run`: the daemon. Samples continuously; every interval
//! the sampling thread cuts a raw aggregate, the symbolizing thread turns it
//! into profiles, and each exporter task writes or sends them. Sampling
//! never waits for symbolization or exporters: the queues between them are
//! bounded, and what does not fit is dropped and counted in `/metrics`.

mod exporters;
mod http;
mod pipeline;
mod retry;
pub(crate) mod settings;

use std::{
    num::NonZeroUsize,
    path::Path,
    sync::{atomic::Ordering, mpsc::sync_channel, Arc},
    time::Duration,
};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use super::preflight;
use crate::{
    bpf::{EbpfSource, LoadOptions, OffCpuOptions, SampleSource, UnwindOptions},
    cli::RunArgs,
    cli::Unwinder,
    config::Config,
    export::rolling::RollingDir,
    symbolize::{elf::Blaze, kallsyms::KernelSymbols, Symbolizer},
    telemetry::Telemetry,
    unwind,
};
use pipeline::Control;

/// Unique stacks per interval before new ones are dropped (and counted).
const MAX_UNIQUE_STACKS: usize = 1 << 18;
/// Symbolized addresses cached across intervals.
const SYMBOL_CACHE_ENTRIES: usize = 1 << 18;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = settings::resolve(&args, |k| std::env::var(k).ok())?;
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    preflight::check_capabilities(&status)?;
    preflight::warn_degraded(&status);
    preflight::check_btf(Path::new("/sys/kernel/btf/vmlinux"))?;
    preflight::check_pids(Path::new("/proc"), &config.sampling.pids)?;
    let host_name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let kubernetes = config
        .kubernetes
        .resolve(|k| std::env::var(k).ok(), &host_name)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let cgroup2 = crate::target::cgroup2_root();
    let selection = crate::target::Selection::build(
        &config.sampling.pids,
        &config.targets,
        cgroup2.as_deref(),
        kubernetes.is_some(),
    )?;
    let k8s_client = kubernetes.as_ref().map(crate::metadata::kubernetes::watch::client).transpose()?;
    if let Some(files) = &config.export.files {
        preflight::prepare_output_dir(&files.dir)?;
    }
    exporters::check(&config)?;
    let listener = http::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--http-listen)", config.http.listen))?;

    limit_malloc_arenas();
    let telemetry = Arc::new(Telemetry::default());
    let enricher = kubernetes.map(|s| crate::metadata::Enricher::new(s, telemetry.metadata.clone()));
    if let (Some(client), Some(e)) = (k8s_client, &enricher) {
        log::info!("Kubernetes metadata: pods of node {} from {}", e.settings.node_name, e.settings.api_url);
        tokio::spawn(crate::metadata::kubernetes::watch::run(client, e.clone()));
    }
    let opts = LoadOptions {
        frequency: config.sampling.frequency,
        pids: config.sampling.pids.clone(),
        targets: selection.needs_maintenance(),
        off_cpu: config.sampling.off_cpu.then_some(OffCpuOptions {
            min_block_ns: config.sampling.off_cpu_min_block.0.as_nanos() as u64,
            sample_every: config.sampling.off_cpu_sample,
            force_raw_tracepoints: false,
        }),
        unwind: (config.sampling.unwinder == Unwinder::Cfi)
            .then(|| UnwindOptions { rows: unwind::rows_for(config.sampling.unwind_table_memory.0) }),
    };
    let mut source = EbpfSource::load(&opts).context("loading the eBPF programs failed")?;
    let tables = match source.take_unwind_maps().context("setting up CFI unwinding failed")? {
        Some(maps) => {
            Some(unwind::Worker::start(maps, &config.sampling.pids).context("starting the unwind table thread")?)
        }
        None => None,
    };
    let procs = Arc::new(pipeline::process_table());
    let only =
        (!selection.needs_maintenance() && !config.sampling.pids.is_empty()).then_some(config.sampling.pids.as_slice());
    let lifecycle = crate::lifecycle::start_from(&mut source, procs.clone(), tables.as_ref().map(|(_, f)| f), only)
        .context("starting process lifecycle tracking")?;
    // The selection is in the kernel before the first sample.
    let selected = match selection.needs_maintenance() {
        true => Some(crate::target::Running::start(
            source.take_target_maps()?,
            selection,
            cgroup2,
            enricher.as_ref().map(|e| e.cache.clone()),
            telemetry.targets.clone(),
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
    source
        .attach()
        .with_context(|| crate::app::preflight::attach_failed_hint(config.sampling.unwinder == Unwinder::Cfi))?;
    // Threads blocked since before now are counted from now, and every
    // process's tables load in the background (see `record`).
    let found = if config.sampling.off_cpu {
        let sampled = config.sampling.off_cpu_sample > 1;
        let found = crate::offcpu::begin_window(&mut source, crate::bpf::monotonic_ns(), sampled)
            .context("scanning for blocked threads failed")?;
        if let (Some((_, feed)), true) = (&tables, config.sampling.pids.is_empty()) {
            feed.load_in_background(crate::offcpu::running_processes());
        }
        crate::offcpu::PendingFound::start(found)?
    } else {
        crate::offcpu::PendingFound::none()
    };
    telemetry.attached.store(true, Ordering::Relaxed);
    let http_task = tokio::spawn(http::serve(listener, telemetry.clone()));
    // Exporters, each behind its own bounded queue.
    let (senders, tasks, destinations) = start_exporters(&config, &telemetry)?;
    log::info!(
        "profiling at {} Hz{}, exporting every {:?} to {}; health and metrics on http://{}",
        config.sampling.frequency,
        if config.sampling.off_cpu { " with off-CPU" } else { "" },
        config.export.interval.0,
        destinations.join(", "),
        config.http.listen
    );

    // Sampling and symbolizing threads.
    let control = Arc::new(Control::default());
    let (raw_tx, raw_rx) = sync_channel(2);
    let sampler = {
        let (procs, control, telemetry) = (procs.clone(), control.clone(), telemetry.clone());
        std::thread::Builder::new().name("sample".into()).spawn(move || {
            let unwind = tables.as_ref().map(|(w, f)| (w, f));
            let r = pipeline::sample_intervals(
                &mut source,
                &procs,
                &control,
                MAX_UNIQUE_STACKS,
                &raw_tx,
                &telemetry,
                unwind,
                lifecycle.as_ref(),
                found,
            );
            drop(source.detach());
            // Releases its unwind handle before `tables` goes.
            drop(lifecycle);
            // The feed goes with `tables`, which ends the table thread.
            r
        })?
    };
    let symbolizer_thread = {
        let (procs, telemetry) = (procs.clone(), telemetry.clone());
        let (frequency, off_cpu) = (config.sampling.frequency, config.sampling.off_cpu);
        std::thread::Builder::new().name("symbolize".into()).spawn(move || {
            let mut symbolizer = Symbolizer::new(
                Blaze::releasing_file_pages(),
                KernelSymbols::load(),
                NonZeroUsize::new(SYMBOL_CACHE_ENTRIES).expect("non-zero"),
            );
            let enricher = enricher.as_ref();
            pipeline::symbolize_intervals(
                raw_rx,
                &mut symbolizer,
                &procs,
                frequency,
                off_cpu,
                &telemetry,
                enricher,
                |p| {
                    for (name, tx) in &senders {
                        if tx.try_send(p.clone()).is_err() {
                            telemetry.exporter(name).dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                },
            );
        })?
    };

    wait_for_shutdown(&config, &control).await?;
    control.stop.store(true, Ordering::Release);
    let deadline = config.export.shutdown_deadline.0;
    let finished = tokio::time::timeout(deadline, async {
        let sampled = tokio::task::spawn_blocking(move || sampler.join()).await;
        let _ = tokio::task::spawn_blocking(move || symbolizer_thread.join()).await;
        for task in tasks {
            let _ = task.await;
        }
        sampled
    })
    .await;
    http_task.abort();
    match finished {
        Ok(Ok(Ok(Ok(())))) => Ok(()),
        Ok(Ok(Ok(Err(e)))) => Err(e).context("reading samples from the kernel failed"),
        Ok(_) => Err(anyhow::anyhow!("the sampling thread panicked")),
        Err(_) => {
            log::warn!("the last interval was not exported within {deadline:?} (export.shutdown_deadline)");
            Ok(())
        }
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per CPU),
/// and each keeps its freed pages: the daemon's sampling, lifecycle,
/// table, symbolizing and exporter threads then hold several high-water
/// marks at once. Two arenas are plenty for its allocation rate (`cargo
/// xtask bench churn`). `MALLOC_ARENA_MAX` in the environment wins.
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes an allocator tunable.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

type Senders = Vec<(&'static str, tokio::sync::mpsc::Sender<Arc<pipeline::IntervalProfiles>>)>;

/// Starts every configured exporter; returns their queues, their tasks, and
/// a description of where data goes.
fn start_exporters(
    config: &Config,
    telemetry: &Arc<Telemetry>,
) -> anyhow::Result<(Senders, Vec<tokio::task::JoinHandle<()>>, Vec<String>)> {
    let (mut senders, mut tasks, mut destinations): (Senders, _, Vec<String>) = (Vec::new(), Vec::new(), Vec::new());
    let host_name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let extra: Vec<(String, String)> = config.resource.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if let Some(files) = &config.export.files {
        let rolling = RollingDir::new(&files.dir, files.max_bytes.0, files.max_age.0)?;
        let (tx, task) = exporters::spawn_files(rolling, telemetry.clone());
        senders.push(("files", tx));
        tasks.push(task);
        destinations.push(files.dir.display().to_string());
    }
    if let Some(otlp) = &config.export.otlp {
        let resource = crate::export::otlp::Resource {
            host_name: host_name.clone(),
            service_name_override: config.resource.service_name.clone(),
            extra_attributes: extra.clone(),
        };
        let (tx, task) = exporters::spawn_otlp(otlp, resource.clone(), telemetry.clone())
            .with_context(|| format!("invalid OTLP endpoint {}", otlp.endpoint))?;
        senders.push(("otlp", tx));
        tasks.push(task);
        if otlp.metrics {
            let (tx, task) = exporters::spawn_otlp_metrics(otlp, resource, telemetry.clone())
                .with_context(|| format!("invalid OTLP endpoint {}", otlp.endpoint))?;
            senders.push(("otlp_metrics", tx));
            tasks.push(task);
        }
        let what = if otlp.metrics { "profiles and metrics" } else { "profiles" };
        destinations.push(format!("OTLP {} ({what})", otlp.endpoint));
    }
    if let Some(p) = &config.export.pyroscope {
        let labels = crate::export::pyroscope::PushLabels {
            host_name,
            service_name_override: config.resource.service_name.clone(),
            extra,
        };
        let (tx, task) = exporters::spawn_pyroscope(p, labels, telemetry.clone())
            .with_context(|| format!("invalid Pyroscope URL {}", p.url))?;
        senders.push(("pyroscope", tx));
        tasks.push(task);
        destinations.push(format!("Pyroscope {}", p.url));
    }
    Ok((senders, tasks, destinations))
}

/// Cuts an interval every `export.interval` until SIGTERM or SIGINT.
async fn wait_for_shutdown(config: &Config, control: &Control) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let period = config.export.interval.0.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => control.cut.store(true, Ordering::Release),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => log::warn!("SIGHUP ignored: restart profiler-agent to apply a changed configuration"),
        }
    }
    log::info!("stopping: exporting the last interval");
    Ok(())
}
