//! OTLP metrics export: per-process scheduler latency histograms, per-process
//! on-CPU / off-CPU counters, and the agent's own health series, sent every
//! interval to the same receiver as the OTLP profiles.
//!
//! # Why not the OpenTelemetry SDK
//!
//! The issue asked for `opentelemetry` / `opentelemetry_sdk` /
//! `opentelemetry-otlp` 0.33. They were tried first and do build on Rust 1.95
//! next to our tonic 0.14 / prost 0.14 (`opentelemetry-otlp` with
//! `grpc-tonic`, `http-proto`, `metrics` and `hyper-client`; its
//! `reqwest-client` would have added reqwest 0.13 beside our 0.12). They were
//! not used, because the SDK cannot carry what the kernel gives us:
//!
//! - The kernel hands over *pre-bucketed* log2 histograms per process and
//!   interval. The SDK's only input is `Histogram::record(value)`, one value
//!   at a time; its data model (`ResourceMetrics`, `ExponentialHistogram`,
//!   ...) has `pub(crate)` fields, so no exporter, reader or producer can
//!   inject ready-made buckets. Feeding it would mean replaying every event
//!   (run-queue latency is one event per context switch, 100k+/s on a busy
//!   host; measured at ~45 ns per `record`, so a few ms of CPU per second)
//!   as a *made-up* value per bucket, which fabricates `sum`, `min` and
//!   `max` and rescales the buckets the SDK's way instead of ours.
//! - The SDK's periodic reader runs on its own timer and thread, not at our
//!   interval cuts, and its exporter has no byte/age-bounded retry buffer or
//!   drop counters; ours (`app::run::retry::deliver`) is what every other
//!   network exporter of the daemon uses and reports in `/metrics`.
//!
//! So the payload is built directly from the `opentelemetry-proto` 0.33
//! metrics types (feature `metrics`; already a dependency for profiles) and
//! sent by the small client in [`client`], with the OTLP exporter's endpoint,
//! protocol, headers and timeouts, through the daemon's retry buffer.
//!
//! # What is sent
//!
//! One `ResourceMetrics` for the agent (`service.name` = the configured
//! override or `profiler-agent`, `host.name`, the extra resource attributes),
//! one scope `profiler-agent`, and these metrics:
//!
//! | name | type | unit | attributes |
//! | --- | --- | --- | --- |
//! | `profiler.runqueue.latency` | exponential histogram, delta | ns | `process.pid`, `process.executable.name` |
//! | `profiler.offcpu.duration` | exponential histogram, delta | ns | same |
//! | `profiler.offcpu.time` | sum (monotonic, delta, double) | s | same |
//! | `profiler.oncpu.samples` | sum (monotonic, delta, int) | {sample} | same |
//! | `profiler.*` health (see [`health`]) | cumulative sums and gauges | | `kind`, `exporter` |
//!
//! The kernel's log2 histograms map exactly onto exponential histograms of
//! scale 0 (see [`encode::exponential_buckets`]); quantiles are derived by
//! the backend from the buckets. The unit stays nanoseconds: bucket
//! boundaries are powers of two *of the unit*, so seconds would break the
//! exact mapping.
//!
//! # Temporality
//!
//! Per-process metrics are DELTA, each point spanning exactly one interval
//! (start and end of the interval): the kernel clears its histograms at every
//! cut, so delta is what we have without keeping state, and processes come
//! and go too fast for the agent to keep a cumulative series per pid forever
//! (it would need its own eviction and would still reset on restart). A
//! Collector's `deltatocumulative` processor converts for backends that only
//! take cumulative data (Prometheus). The agent's health series are
//! cumulative counters since the exporter started, as `/metrics` serves them.

pub mod client;
pub mod encode;
pub mod health;

#[cfg(test)]
mod tests;

pub use client::{MetricsOutcome, OtlpMetricsClient};
pub use encode::{encode, IntervalMetrics, LatencyKind, ProcessHistogram};
pub use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
