//! Building one `ExportMetricsServiceRequest` per interval.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric::Data, number_data_point, AggregationTemporality,
    ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource as OtlpResource;
use profiler_common::offcpu::{Histogram, HIST_BUCKETS};

use super::health::{HealthKind, HealthSeries};
use crate::export::otlp::{profiles::SCOPE_NAME, Resource};
use crate::profile::{ProcessMeta, Profile};

pub const RUNQ_LATENCY: &str = "profiler.runqueue.latency";
pub const OFFCPU_DURATION: &str = "profiler.offcpu.duration";
pub const OFFCPU_TIME: &str = "profiler.offcpu.time";
pub const ONCPU_SAMPLES: &str = "profiler.oncpu.samples";

/// `service.name` of the agent's resource when none is configured.
const AGENT_SERVICE: &str = "profiler-agent";

/// Which scheduler latency a histogram measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LatencyKind {
    /// Wakeup or preemption to on-CPU (`HIST_RUNQ`).
    RunQueue,
    /// Blocked switch-out to on-CPU (`HIST_OFFCPU`).
    OffCpu,
}

/// One process's latency histogram over one interval, as the kernel kept it.
#[derive(Clone)]
pub struct ProcessHistogram {
    pub process: ProcessMeta,
    pub kind: LatencyKind,
    pub histogram: Histogram,
}

impl std::fmt::Debug for ProcessHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessHistogram")
            .field("pid", &self.process.pid)
            .field("kind", &self.kind)
            .field("count", &crate::latency::count(&self.histogram))
            .finish()
    }
}

/// What one interval contributes.
pub struct IntervalMetrics<'a> {
    pub start: SystemTime,
    pub end: SystemTime,
    /// On-CPU samples: the value is a sample count.
    pub cpu: &'a Profile,
    /// Off-CPU time: the value is nanoseconds blocked.
    pub off_cpu: Option<&'a Profile>,
    pub latency: &'a [ProcessHistogram],
}

/// Encodes one interval plus a snapshot of the agent's health series.
///
/// `health_start` is when the health counters started counting (the start of
/// their cumulative series) and `now` when `health` was read.
pub fn encode(
    interval: &IntervalMetrics,
    health: &[HealthSeries],
    resource: &Resource,
    health_start: SystemTime,
    now: SystemTime,
) -> ExportMetricsServiceRequest {
    let (start, end) = (nanos(interval.start), nanos(interval.end));
    let mut metrics = Vec::new();
    for (name, kind, description) in [
        (
            RUNQ_LATENCY,
            LatencyKind::RunQueue,
            "Run-queue latency of the process's threads: wakeup or preemption to on-CPU.",
        ),
        (OFFCPU_DURATION, LatencyKind::OffCpu, "Off-CPU durations of the process's threads: blocked to back on-CPU."),
    ] {
        let points = latency_points(interval.latency, kind, start, end);
        if !points.is_empty() {
            metrics.push(Metric {
                name: name.into(),
                description: description.into(),
                unit: "ns".into(),
                data: Some(Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                })),
                ..Default::default()
            });
        }
    }
    if let Some(off) = interval.off_cpu {
        let points: Vec<NumberDataPoint> = per_process(off)
            .into_iter()
            .map(|(meta, ns)| number_point(process_attributes(&meta), start, end, Value::Double(ns as f64 / 1e9)))
            .collect();
        push_sum(&mut metrics, OFFCPU_TIME, "Time the process's threads spent blocked (off-CPU).", "s", points, true);
    }
    let points: Vec<NumberDataPoint> = per_process(interval.cpu)
        .into_iter()
        .map(|(meta, n)| {
            number_point(process_attributes(&meta), start, end, Value::Int(i64::try_from(n).unwrap_or(i64::MAX)))
        })
        .collect();
    push_sum(&mut metrics, ONCPU_SAMPLES, "On-CPU samples of the process.", "{sample}", points, true);
    metrics.extend(health_metrics(health, nanos(health_start), nanos(now)));

    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(agent_resource(resource)),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The positive buckets of a kernel log2 histogram as an exponential
/// histogram of scale 0 (base 2): `(zero_count, offset, bucket_counts)`.
///
/// Kernel bucket `i >= 1` holds the integers `[2^(i-1), 2^i - 1]` (`i`
/// significant bits); OTLP bucket `index` holds `(2^index, 2^(index+1)]`, so
/// kernel bucket `i` is OTLP index `i - 1`. The two agree on every value but
/// the lower boundary `2^(i-1)` itself, which OTLP would file one bucket
/// lower: at most one value in `2^(i-1)` per bucket, and a quantile read
/// from either lands on the same boundary. Kernel bucket 0 holds exactly 0,
/// OTLP's zero bucket (`zero_threshold` 0). The kernel's last bucket also
/// holds everything from 2^63 ns (292 years) up.
pub fn exponential_buckets(h: &Histogram) -> (u64, i32, Vec<u64>) {
    let zero = h.buckets[0];
    let positive = &h.buckets[1..HIST_BUCKETS];
    let Some(first) = positive.iter().position(|&n| n > 0) else {
        return (zero, 0, Vec::new());
    };
    let last = positive.iter().rposition(|&n| n > 0).unwrap_or(first);
    // positive[j] is kernel bucket j + 1, i.e. OTLP index j.
    (zero, first as i32, positive[first..=last].to_vec())
}

/// One data point per process with a non-empty histogram of `kind`.
fn latency_points(
    hists: &[ProcessHistogram],
    kind: LatencyKind,
    start: u64,
    end: u64,
) -> Vec<ExponentialHistogramDataPoint> {
    // The kernel keys by (tgid, kind), so there is one per process; merging
    // keeps a point per process should the caller split them.
    let mut by_pid: BTreeMap<u32, (&ProcessMeta, Histogram)> = BTreeMap::new();
    for h in hists.iter().filter(|h| h.kind == kind) {
        by_pid
            .entry(h.process.pid)
            .and_modify(|(_, acc)| crate::latency::merge(acc, &h.histogram))
            .or_insert((&h.process, h.histogram));
    }
    by_pid
        .into_values()
        .filter_map(|(meta, h)| {
            let count = crate::latency::count(&h);
            if count == 0 {
                return None;
            }
            let (zero_count, offset, bucket_counts) = exponential_buckets(&h);
            Some(ExponentialHistogramDataPoint {
                attributes: process_attributes(meta),
                start_time_unix_nano: start,
                time_unix_nano: end,
                count,
                // The kernel keeps counts and the maximum only: no sum and no
                // minimum are invented.
                sum: None,
                scale: 0,
                zero_count,
                positive: Some(Buckets { offset, bucket_counts }),
                negative: None,
                flags: 0,
                exemplars: Vec::new(),
                min: None,
                max: Some(h.max_ns as f64),
                zero_threshold: 0.0,
            })
        })
        .collect()
}

/// Sum of sample values per process, with what the profile knows of it.
fn per_process(profile: &Profile) -> Vec<(ProcessMeta, u64)> {
    let mut sums: BTreeMap<u32, (u64, &str)> = BTreeMap::new();
    for s in &profile.samples {
        let e = sums.entry(s.pid).or_insert((0, &s.process_name));
        e.0 += s.value;
    }
    sums.into_iter()
        .filter(|(_, (v, _))| *v > 0)
        .map(|(pid, (v, name))| {
            let meta = profile.processes.get(&pid).cloned().unwrap_or_else(|| ProcessMeta {
                pid,
                name: name.to_owned(),
                ..Default::default()
            });
            (meta, v)
        })
        .collect()
}

/// `process.pid` and, when known, `process.executable.name` (the base name
/// of `/proc/PID/exe`, else the comm, as the profiles exporter does).
pub fn process_attributes(meta: &ProcessMeta) -> Vec<KeyValue> {
    let mut attrs = vec![kv("process.pid", any_value::Value::IntValue(meta.pid.into()))];
    let from_path = meta.exe_path.as_deref().and_then(|p| {
        let base = p.trim_end_matches(" (deleted)").rsplit('/').next()?;
        (!base.is_empty()).then_some(base)
    });
    let name = from_path.unwrap_or(&meta.name);
    if !name.is_empty() {
        attrs.push(kv("process.executable.name", any_value::Value::StringValue(name.to_owned())));
    }
    if let Some(id) = meta.container_id.as_deref() {
        attrs.push(kv("container.id", any_value::Value::StringValue(id.to_owned())));
    }
    for (k, v) in crate::export::workload::k8s_attributes(meta) {
        attrs.push(kv(&k, any_value::Value::StringValue(v)));
    }
    attrs
}

fn agent_resource(r: &Resource) -> OtlpResource {
    let extra_service = r.extra_attributes.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.as_str());
    let service = r.service_name_override.as_deref().or(extra_service).unwrap_or(AGENT_SERVICE);
    let mut attributes = vec![
        kv("service.name", any_value::Value::StringValue(service.to_owned())),
        kv("service.version", any_value::Value::StringValue(env!("CARGO_PKG_VERSION").to_owned())),
    ];
    if !r.host_name.is_empty() {
        attributes.push(kv("host.name", any_value::Value::StringValue(r.host_name.clone())));
    }
    for (k, v) in &r.extra_attributes {
        if !attributes.iter().any(|a| &a.key == k) {
            attributes.push(kv(k, any_value::Value::StringValue(v.clone())));
        }
    }
    OtlpResource { attributes, ..Default::default() }
}

/// The health series as OTLP: counters become cumulative monotonic sums,
/// gauges gauges; a metric whose values `/metrics` writes as integers is an
/// int metric, one written with a fraction (`0.003000`) a double metric.
fn health_metrics(health: &[HealthSeries], start: u64, now: u64) -> Vec<Metric> {
    // Group by OTLP name, keeping the order of first appearance.
    let mut order: Vec<&str> = Vec::new();
    let mut groups: BTreeMap<&str, Vec<&HealthSeries>> = BTreeMap::new();
    for s in health {
        if !groups.contains_key(s.name.as_str()) {
            order.push(&s.name);
        }
        groups.entry(&s.name).or_default().push(s);
    }
    order
        .into_iter()
        .map(|name| {
            let series = &groups[name];
            let first = series[0];
            let float = series.iter().any(|s| s.float);
            // Gauges have no start time (the spec says receivers ignore it).
            let start = if first.kind == HealthKind::Gauge { 0 } else { start };
            let points = series
                .iter()
                .map(|s| {
                    let attrs = s.labels.iter().map(|(k, v)| kv(k, any_value::Value::StringValue(v.clone()))).collect();
                    let value = if float { Value::Double(s.value) } else { Value::Int(s.value as i64) };
                    number_point(attrs, start, now, value)
                })
                .collect();
            let data = match first.kind {
                HealthKind::Counter => Data::Sum(Sum {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
                HealthKind::Gauge => Data::Gauge(Gauge { data_points: points }),
            };
            Metric {
                name: name.to_owned(),
                description: first.help.clone(),
                unit: first.unit.to_owned(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect()
}

enum Value {
    Int(i64),
    Double(f64),
}

fn number_point(attributes: Vec<KeyValue>, start: u64, end: u64, value: Value) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: end,
        exemplars: Vec::new(),
        flags: 0,
        value: Some(match value {
            Value::Int(v) => number_data_point::Value::AsInt(v),
            Value::Double(v) => number_data_point::Value::AsDouble(v),
        }),
    }
}

fn push_sum(
    metrics: &mut Vec<Metric>,
    name: &str,
    description: &str,
    unit: &str,
    points: Vec<NumberDataPoint>,
    delta: bool,
) {
    if points.is_empty() {
        return;
    }
    let temporality = if delta { AggregationTemporality::Delta } else { AggregationTemporality::Cumulative };
    metrics.push(Metric {
        name: name.into(),
        description: description.into(),
        unit: unit.into(),
        data: Some(Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: temporality as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    });
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
