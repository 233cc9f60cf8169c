//! Where a process runs: its container and Kubernetes pod.
//!
//! - [`cgroup`]: container id and pod uid from `/proc/PID/cgroup`;
//! - [`kubernetes`]: this node's pods from the API server (list + watch),
//!   in a bounded cache;
//! - [`Enricher`]: joins the two onto the processes of a profile, for the
//!   exporters (`k8s.*` attributes, Pyroscope labels, `service.name`).

pub mod cgroup;
pub mod kubernetes;

use std::sync::{
    atomic::{AtomicU64, Ordering::Relaxed},
    Arc,
};

pub use kubernetes::{Enricher, PodCache};

/// The metadata stage's own counters, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct MetadataMetrics {
    /// API calls that failed or timed out (the agent then labels with
    /// `container.id` only and retries with backoff).
    pub api_errors: AtomicU64,
    /// Successful full lists of this node's pods.
    pub lists: AtomicU64,
    /// Watch events applied.
    pub watch_events: AtomicU64,
    /// Processes in a container whose pod was not in the cache.
    pub lookup_misses: AtomicU64,
    /// Pods evicted because the cache was full.
    pub evicted: AtomicU64,
    /// Pods in the cache (live and in their grace period).
    pub pods: AtomicU64,
    /// 1 while the last API call succeeded.
    pub connected: AtomicU64,
}

impl MetadataMetrics {
    /// Appends the Prometheus text of these series.
    pub fn render(&self, s: &mut String) {
        use std::fmt::Write as _;
        let series: [(&str, &str, &str, &AtomicU64); 7] = [
            (
                "profiler_kubernetes_api_errors_total",
                "counter",
                "Kubernetes API calls that failed or timed out.",
                &self.api_errors,
            ),
            ("profiler_kubernetes_lists_total", "counter", "Lists of this node's pods.", &self.lists),
            ("profiler_kubernetes_watch_events_total", "counter", "Pod watch events applied.", &self.watch_events),
            (
                "profiler_kubernetes_lookup_misses_total",
                "counter",
                "Container processes whose pod was not in the cache.",
                &self.lookup_misses,
            ),
            ("profiler_kubernetes_pods_evicted_total", "counter", "Pods evicted from the full cache.", &self.evicted),
            ("profiler_kubernetes_pods", "gauge", "Pods in the metadata cache.", &self.pods),
            (
                "profiler_kubernetes_connected",
                "gauge",
                "1 when the last Kubernetes API call succeeded.",
                &self.connected,
            ),
        ];
        for (name, kind, help, v) in series {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", v.load(Relaxed));
        }
    }
}

/// Shared handle used by the stages and the telemetry.
pub type SharedMetrics = Arc<MetadataMetrics>;
