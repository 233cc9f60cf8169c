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
    pub frames: AtomicU64,
    pub frames_unsymbolized: AtomicU64,
    pub attached: AtomicBool,
    /// The CFI table thread's latest figures (None: frame pointers only).
    unwind: Mutex<Option<crate::unwind::UnwindStats>>,
    exporters: Mutex<BTreeMap<&'static str, std::sync::Arc<ExporterMetrics>>>,
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
        let counters: [(&str, &str, &AtomicU64); 7] = [
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
            ("profiler_export_healthy", "gauge", "1 when the last export attempt succeeded.", |m| {
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
            let series: [(&str, &str, &str, u64); 9] = [
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
        let _ = writeln!(s, "# HELP profiler_ready 1 when programs are attached and exports succeed.");
        let _ = writeln!(s, "# TYPE profiler_ready gauge\nprofiler_ready {}", u64::from(self.ready()));
        s
    }
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
        // Every non-comment line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad line {line}");
        }
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
}
