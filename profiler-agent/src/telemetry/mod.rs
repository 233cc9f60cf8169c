//! The agent's own health metrics: counters and gauges updated by the
//! stages, rendered as Prometheus text on `/metrics`.
//!
//! Kept dependency-free on purpose: the hot paths only touch atomics, and
//! the set of series is fixed, so no registry or label allocation is needed.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::Duration,
};

use profiler_common::Stat;

use crate::bpf::KernelStats;

/// (metric name, Prometheus type, help, how to read it from an exporter).
type ExporterSeries = (&'static str, &'static str, &'static str, fn(&ExporterMetrics) -> u64);

/// Per-exporter counters.
#[derive(Debug, Default)]
pub struct ExporterMetrics {
    pub attempts: AtomicU64,
    pub failures: AtomicU64,
    pub successes: AtomicU64,
    /// Intervals dropped because the exporter's buffer was full or too old.
    pub dropped: AtomicU64,
    pub buffered_bytes: AtomicU64,
    /// Sum of export latencies, in microseconds (with `attempts`, the mean).
    pub latency_us_total: AtomicU64,
    /// Whether the last attempt succeeded (or none failed yet).
    pub healthy: AtomicBool,
}

/// All of the agent's own metrics.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Latest kernel-side counters (cumulative since load).
    kernel: Mutex<KernelStats>,
    pub intervals: AtomicU64,
    /// Intervals lost because symbolization fell behind.
    pub intervals_dropped: AtomicU64,
    pub aggregation_dropped: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_evictions: AtomicU64,
    /// Addresses in the symbolization cache now.
    pub cache_entries: AtomicU64,
    pub frames: AtomicU64,
    pub frames_unsymbolized: AtomicU64,
    pub attached: AtomicBool,
    /// The CFI table thread's latest figures (None: frame pointers only).
    unwind: Mutex<Option<crate::unwind::UnwindStats>>,
    /// Perf map / jitdump tables and JIT frames named.
    jit: Mutex<Option<(crate::runtimes::RuntimeStats, u64, u64)>>,
    exporters: Mutex<BTreeMap<&'static str, std::sync::Arc<ExporterMetrics>>>,
    /// Times the symbolizer dropped its per-file caches to stay bounded.
    pub symbol_files_evicted: AtomicU64,
    /// Lifecycle events and the process table's figures (None: not tracked).
    processes: Mutex<Option<(crate::lifecycle::LifecycleStats, crate::process::ProcessStats)>>,
    /// Kubernetes metadata (API errors, cache), shared with that stage.
    pub metadata: crate::metadata::SharedMetrics,
    /// Target selection (kernel filter sets), shared with that stage.
    pub targets: std::sync::Arc<crate::target::sync::TargetStats>,
}

impl Telemetry {
    /// The metrics of one exporter, created on first use.
    pub fn exporter(&self, name: &'static str) -> std::sync::Arc<ExporterMetrics> {
        let mut map = self.exporters.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name)
            .or_insert_with(|| {
                std::sync::Arc::new(ExporterMetrics { healthy: AtomicBool::new(true), ..Default::default() })
            })
            .clone()
    }

    pub fn set_kernel(&self, k: KernelStats) {
        *self.kernel.lock().unwrap_or_else(|e| e.into_inner()) = k;
    }

    pub fn set_unwind(&self, u: crate::unwind::UnwindStats) {
        *self.unwind.lock().unwrap_or_else(|e| e.into_inner()) = Some(u);
    }

    /// The JIT tables' figures, and the JIT frames named and left unnamed.
    pub fn set_jit(&self, stats: crate::runtimes::RuntimeStats, named: u64, unnamed: u64) {
        *self.jit.lock().unwrap_or_else(|e| e.into_inner()) = Some((stats, named, unnamed));
    }

    pub fn set_processes(&self, events: crate::lifecycle::LifecycleStats, table: crate::process::ProcessStats) {
        *self.processes.lock().unwrap_or_else(|e| e.into_inner()) = Some((events, table));
    }

    pub fn record_export(&self, m: &ExporterMetrics, ok: bool, took: Duration) {
        m.attempts.fetch_add(1, Relaxed);
        m.latency_us_total.fetch_add(took.as_micros() as u64, Relaxed);
        if ok {
            m.successes.fetch_add(1, Relaxed);
        } else {
            m.failures.fetch_add(1, Relaxed);
        }
        m.healthy.store(ok, Relaxed);
    }

    /// Ready: programs attached and every exporter's last attempt succeeded
    /// (an exporter that is retrying within its buffer is reported by
    /// `healthy = false` only once its buffer starts dropping data).
    pub fn ready(&self) -> bool {
        self.attached.load(Relaxed)
            && self.exporters.lock().unwrap_or_else(|e| e.into_inner()).values().all(|m| m.healthy.load(Relaxed))
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let k = *self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            s,
            "# HELP profiler_kernel_events_total Kernel-side counters by kind (samples, drops by reason, switches)."
        );
        let _ = writeln!(s, "# TYPE profiler_kernel_events_total counter");
        for stat in Stat::ALL {
            let _ = writeln!(s, "profiler_kernel_events_total{{kind=\"{}\"}} {}", stat.name(), k.get(stat));
        }
        let counters: [(&str, &str, &AtomicU64); 8] = [
            ("profiler_intervals_total", "Profiling intervals completed.", &self.intervals),
            (
                "profiler_intervals_dropped_total",
                "Intervals dropped because symbolization fell behind.",
                &self.intervals_dropped,
            ),
            (
                "profiler_aggregation_dropped_total",
                "Samples dropped because the aggregation table was full.",
                &self.aggregation_dropped,
            ),
            ("profiler_symbol_cache_hits_total", "Symbolization cache hits.", &self.cache_hits),
            ("profiler_symbol_cache_misses_total", "Symbolization cache misses.", &self.cache_misses),
            (
                "profiler_symbol_cache_evictions_total",
                "Addresses evicted from the symbolization cache (least recently used) to stay within its bound.",
                &self.cache_evictions,
            ),
            ("profiler_frames_total", "Frames symbolized.", &self.frames),
            (
                "profiler_frames_unsymbolized_total",
                "Frames left unsymbolized (module+offset or [unknown]).",
                &self.frames_unsymbolized,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
        let _ = writeln!(
            s,
            "# HELP profiler_symbol_cache_entries Addresses in the symbolization cache.\n\
             # TYPE profiler_symbol_cache_entries gauge\nprofiler_symbol_cache_entries {}",
            self.cache_entries.load(Relaxed)
        );
        let exporters = self.exporters.lock().unwrap_or_else(|e| e.into_inner());
        let series: [ExporterSeries; 6] = [
            ("profiler_export_attempts_total", "counter", "Export attempts.", |m| m.attempts.load(Relaxed)),
            ("profiler_export_failures_total", "counter", "Failed export attempts.", |m| m.failures.load(Relaxed)),
            ("profiler_export_dropped_total", "counter", "Intervals dropped from the export buffer.", |m| {
                m.dropped.load(Relaxed)
            }),
            ("profiler_export_latency_seconds_total", "counter", "Total time spent in export attempts.", |m| {
                m.latency_us_total.load(Relaxed)
            }),
            ("profiler_export_buffered_bytes", "gauge", "Bytes waiting in the export buffer.", |m| {
                m.buffered_bytes.load(Relaxed)
            }),
            ("profiler_export_healthy", "gauge", "0 once an interval was lost (dropped or rejected) since the last successful export; 1 while delivering or retrying within the buffer.", |m| {
                u64::from(m.healthy.load(Relaxed))
            }),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (exporter, m) in exporters.iter() {
                let v = get(m);
                if name == "profiler_export_latency_seconds_total" {
                    let _ = writeln!(s, "{name}{{exporter=\"{exporter}\"}} {:.6}", v as f64 / 1e6);
                } else {
                    let _ = writeln!(s, "{name}{{exporter=\"{exporter}\"}} {v}");
                }
            }
        }
        // `ready` takes the same lock.
        drop(exporters);
        if let Some(u) = self.unwind.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            let series: [(&str, &str, &str, u64); 11] = [
                ("profiler_unwind_tables", "gauge", "Files with a CFI table in the kernel.", u.tables),
                ("profiler_unwind_table_rows", "gauge", "CFI table rows in the kernel.", u.rows),
                ("profiler_unwind_table_bytes", "gauge", "Kernel map memory used by CFI tables.", u.table_bytes),
                (
                    "profiler_unwind_table_budget_bytes",
                    "gauge",
                    "Kernel map memory reserved for CFI tables.",
                    u.budget_bytes,
                ),
                ("profiler_unwind_processes", "gauge", "Processes whose mappings the unwinder knows.", u.processes),
                ("profiler_unwind_tables_evicted_total", "counter", "CFI tables evicted to stay in budget.", u.evicted),
                (
                    "profiler_unwind_table_build_errors_total",
                    "counter",
                    "Files without usable CFI (none, unreadable, malformed).",
                    u.build_errors,
                ),
                (
                    "profiler_unwind_tables_too_big_total",
                    "counter",
                    "CFI tables that did not fit the memory budget even after evictions.",
                    u.too_big,
                ),
                (
                    "profiler_unwind_requests_dropped_total",
                    "counter",
                    "Table requests dropped because the table thread's queue was full.",
                    u.requests_dropped,
                ),
                (
                    "profiler_python_processes",
                    "gauge",
                    "Processes whose CPython frames the kernel walks.",
                    u.python_processes,
                ),
                (
                    "profiler_python_unsupported_total",
                    "counter",
                    "Python processes left with native frames: interpreter version or build not supported.",
                    u.python_unsupported,
                ),
            ];
            for (name, kind, help, v) in series {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            }
            // The CPython code object cache (runtimes/python), shared by the
            // sampling loop and the symbolizer.
            let py = crate::runtimes::python::shared().lock().unwrap_or_else(|e| e.into_inner()).stats();
            let series: [(&str, &str, u64); 3] = [
                (
                    "profiler_python_code_cache_evictions_total",
                    "Python code objects evicted from the bounded cache.",
                    py.evictions,
                ),
                (
                    "profiler_python_code_cache_stale_total",
                    "Cached Python code objects found replaced by another object at the same address.",
                    py.stale,
                ),
                (
                    "profiler_python_frames_unnamed_total",
                    "Python frames left unnamed: the code object could not be read.",
                    py.unreadable,
                ),
            ];
            for (name, help, v) in series {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
            }
        }
        if let Some((j, named, unnamed)) = *self.jit.lock().unwrap_or_else(|e| e.into_inner()) {
            let series: [(&str, &str, &str, u64); 11] = [
                ("profiler_jit_frames_total", "counter", "Frames named from perf maps or jitdump.", named),
                ("profiler_jit_frames_unnamed_total", "counter", "Frames in JIT code no map named.", unnamed),
                ("profiler_jit_processes", "gauge", "Processes with JIT code.", j.processes),
                ("profiler_jit_processes_with_map", "gauge", "Processes with a perf map or jitdump read.", j.with_map),
                ("profiler_jit_functions", "gauge", "JIT functions in the tables.", j.entries),
                ("profiler_jit_table_bytes", "gauge", "Approximate memory of the JIT tables.", j.bytes),
                (
                    "profiler_jit_malformed_lines_total",
                    "counter",
                    "Perf map lines skipped as malformed.",
                    j.malformed_lines,
                ),
                (
                    "profiler_jit_malformed_records_total",
                    "counter",
                    "jitdump records skipped as malformed.",
                    j.malformed_records,
                ),
                (
                    "profiler_jit_entries_evicted_total",
                    "counter",
                    "JIT functions evicted by the per-process bound.",
                    j.entries_evicted,
                ),
                (
                    "profiler_jit_processes_evicted_total",
                    "counter",
                    "JIT tables evicted by the total bound.",
                    j.processes_evicted,
                ),
                ("profiler_jit_read_errors_total", "counter", "Perf map or jitdump reads that failed.", j.read_errors),
            ];
            for (name, kind, help, v) in series {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            }
        }
        if let Some((e, t)) = *self.processes.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = writeln!(s, "# HELP profiler_process_events_total Process lifecycle events from the kernel.");
            let _ = writeln!(s, "# TYPE profiler_process_events_total counter");
            for (kind, v) in [("fork", e.forks), ("exec", e.execs), ("exit", e.exits), ("lost", e.lost)] {
                let _ = writeln!(s, "profiler_process_events_total{{kind=\"{kind}\"}} {v}");
            }
            let series: [(&str, &str, &str, u64); 6] = [
                ("profiler_processes", "gauge", "Processes in the process table.", t.entries),
                (
                    "profiler_symbol_files_evicted_total",
                    "counter",
                    "Parsed files the symbolizer dropped: idle for two exports, or past its bound of 64 files or 64 MB.",
                    self.symbol_files_evicted.load(Relaxed),
                ),
                (
                    "profiler_processes_exited",
                    "gauge",
                    "Exited processes kept until their last samples are symbolized.",
                    t.exited_pending,
                ),
                ("profiler_processes_evicted_total", "counter", "Processes evicted from the full table.", t.evicted),
                (
                    "profiler_processes_vanished_total",
                    "counter",
                    "Processes gone before their mappings could be read.",
                    t.vanished,
                ),
                (
                    "profiler_processes_removed_total",
                    "counter",
                    "Exited processes removed after their samples were symbolized.",
                    t.exited_removed,
                ),
            ];
            for (name, kind, help, v) in series {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            }
        }
        self.metadata.render(&mut s);
        self.targets.render(&mut s);
        if let Some(rss) = rss_bytes() {
            let _ = writeln!(s, "# HELP profiler_resident_memory_bytes Resident set size of the agent.");
            let _ = writeln!(s, "# TYPE profiler_resident_memory_bytes gauge\nprofiler_resident_memory_bytes {rss}");
        }
        if let Some(cpu) = cpu_seconds() {
            let _ = writeln!(s, "# HELP profiler_cpu_seconds_total User and system CPU time of the agent.");
            let _ = writeln!(s, "# TYPE profiler_cpu_seconds_total counter\nprofiler_cpu_seconds_total {cpu:.6}");
        }
        let _ = writeln!(s, "# HELP profiler_ready 1 when programs are attached and exports succeed.");
        let _ = writeln!(s, "# TYPE profiler_ready gauge\nprofiler_ready {}", u64::from(self.ready()));
        s
    }
}

/// User + system CPU seconds of this process, from /proc/self/stat.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_seconds_from_stat(&stat, clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// utime + stime (fields 14 and 15) in seconds. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn cpu_seconds_from_stat(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second)
}

/// VmRSS of this process.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_exporter_labels() {
        let t = Telemetry::default();
        let mut k = KernelStats::default();
        k.counts[Stat::RingBufferFull as usize] = 3;
        t.set_kernel(k);
        t.intervals.store(5, Relaxed);
        let files = t.exporter("files");
        t.record_export(&files, true, Duration::from_millis(2));
        let otlp = t.exporter("otlp");
        t.record_export(&otlp, false, Duration::from_millis(10));
        let text = t.render();
        assert!(text.contains("profiler_kernel_events_total{kind=\"ring_buffer_full\"} 3"), "{text}");
        assert!(text.contains("profiler_intervals_total 5"), "{text}");
        assert!(text.contains("profiler_export_failures_total{exporter=\"otlp\"} 1"), "{text}");
        assert!(text.contains("profiler_export_healthy{exporter=\"files\"} 1"), "{text}");
        assert!(text.contains("profiler_export_latency_seconds_total{exporter=\"otlp\"} 0.010000"), "{text}");
        assert!(text.contains("# TYPE profiler_export_buffered_bytes gauge"), "{text}");
        assert!(text.contains("# TYPE profiler_cpu_seconds_total counter"), "{text}");
        // Every non-comment line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad line {line}");
        }
    }

    #[test]
    fn jit_series_appear_once_set() {
        let t = Telemetry::default();
        assert!(!t.render().contains("profiler_jit_"));
        let stats = crate::runtimes::RuntimeStats { processes: 2, malformed_lines: 4, ..Default::default() };
        t.set_jit(stats, 90, 10);
        let text = t.render();
        for want in ["profiler_jit_frames_total 90", "profiler_jit_frames_unnamed_total 10", "profiler_jit_processes 2"]
        {
            assert!(text.contains(want), "{want}\n{text}");
        }
        assert!(text.contains("profiler_jit_malformed_lines_total 4"), "{text}");
        assert!(text.contains("profiler_kernel_events_total{kind=\"unwind_jit_frames\"} 0"), "{text}");
    }

    #[test]
    fn ready_needs_attachment_and_healthy_exporters() {
        let t = Telemetry::default();
        assert!(!t.ready());
        t.attached.store(true, Relaxed);
        assert!(t.ready());
        let e = t.exporter("pyroscope");
        t.record_export(&e, false, Duration::ZERO);
        assert!(!t.ready());
        t.record_export(&e, true, Duration::ZERO);
        assert!(t.ready());
    }

    #[test]
    fn cpu_seconds_count_fields_after_the_command_name() {
        let stat = "42 (my (odd) proc) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(super::cpu_seconds_from_stat(stat, 100.0), Some(3.0));
        assert_eq!(super::cpu_seconds_from_stat("garbage", 100.0), None);
    }
}
