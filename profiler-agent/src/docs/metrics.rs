//! The metrics reference of docs/operations.md: the series `/metrics`
//! renders, and the OTLP metrics the agent sends with the Prometheus names
//! a Collector's exporter gives them. Both come from the code that
//! produces them (the renderer, the OTLP metrics encoder), so they cannot
//! drift from it; the tests below also hold the reference to every series
//! name in the renderers' source and in packaging/grafana's dashboards.

use std::{fmt::Write as _, path::Path};

use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point, Metric};

use crate::telemetry::Telemetry;

use super::render;

pub(super) fn metrics_reference(out: &mut String) {
    out.push_str(
        "\n## Metrics reference\n\n\
         `GET /metrics` on `http.listen` serves these series as Prometheus text.\n\
         Counters count from the agent's start; the `profiler_export_*` series have one\n\
         line per configured exporter (`exporter=\"otlp\"`, `\"pyroscope\"`, `\"files\"`),\n\
         the `profiler_unwind_*` series appear with the CFI unwinder (the default), the\n\
         `profiler_jit_*` series once the first interval is symbolized, and the\n\
         `profiler_process*` series while process lifecycle tracking (the kernel's\n\
         fork, exec and exit events) runs.\n\n\
         | series | type | labels | meaning |\n|---|---|---|---|\n",
    );
    let t = Telemetry::default();
    for name in ["otlp", "pyroscope", "files"] {
        t.exporter(name);
    }
    t.set_unwind(Default::default());
    t.set_jit(Default::default(), 0, 0);
    t.set_processes(Default::default(), Default::default());
    let text = t.render();
    let mut series: Vec<(String, String, String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            series.push((name.to_owned(), String::new(), String::new(), help.to_owned()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let (Some(last), Some((_, kind))) = (series.last_mut(), rest.split_once(' ')) {
                last.1 = kind.to_owned();
            }
        } else if let (Some(last), Some(open)) = (series.last_mut(), line.find('{')) {
            let labels = &line[open + 1..line.find('}').unwrap_or(line.len())];
            let key = labels.split('=').next().unwrap_or("");
            if last.2.is_empty() {
                last.2 = format!("`{key}`");
            }
        }
    }
    for (name, kind, labels, help) in &series {
        let _ = writeln!(out, "| `{name}` | {kind} | {labels} | {help} |");
    }
    let kinds: Vec<String> = profiler_common::Stat::ALL.iter().map(|s| format!("`{}`", s.name())).collect();
    let _ = writeln!(out, "\n`profiler_kernel_events_total` has one series per `kind`: {}.", kinds.join(", "));
    otlp_metrics_reference(out, &text);
}

/// Stands for a pod label key in the sample process, shown as `<key>`.
const POD_LABEL: &str = "LABELKEY";

/// When each attribute of the per-process OTLP points is there. Generation
/// fails on an attribute missing here, so a new one cannot go undocumented.
const ATTRIBUTE_PRESENCE: &[(&str, &str)] = &[
    ("process.pid", "always"),
    ("process.executable.name", "when known: the base name of `/proc/PID/exe`, else the comm"),
    ("container.id", "when the process runs in a container"),
    ("k8s.pod.name", "with `[kubernetes]` metadata, once the process's pod is known"),
    ("k8s.pod.uid", "same"),
    ("k8s.namespace.name", "same"),
    ("k8s.container.name", "same"),
    ("k8s.node.name", "same"),
    ("k8s.pod.label.<key>", "same, one per `kubernetes.pod_labels` key the pod has"),
];

/// One interval of one process (in a container of a Kubernetes pod, with a
/// configured pod label), with a point of every per-process metric, as the
/// OTLP metrics encoder builds it.
fn sample_metrics() -> Vec<Metric> {
    use std::{
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use profiler_common::offcpu::{Histogram, HIST_BUCKETS};

    use crate::export::otlp_metrics::{encode, IntervalMetrics, LatencyKind, ProcessHistogram};
    use crate::profile::{PodMeta, ProcessMeta, Profile, ValueType};

    let pod = PodMeta {
        name: "web-0".into(),
        uid: "6f0e1c2a".into(),
        namespace: "shop".into(),
        node: "node-1".into(),
        container: Some("web".into()),
        labels: vec![(POD_LABEL.into(), "v".into())],
        service_name: None,
    };
    let meta = ProcessMeta {
        pid: 100,
        name: "web".into(),
        exe_path: Some("/usr/bin/web".into()),
        container_id: Some("0123456789ab".into()),
        pod_uid: Some("6f0e1c2a".into()),
        pod: Some(Arc::new(pod)),
    };
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let end = start + Duration::from_secs(10);
    let profile = |kind: &str, unit: &str, value: u64| {
        let mut p = Profile::new(ValueType::new(kind, unit), None, 0, start);
        p.samples = vec![crate::export::testutil::sample(100, 100, "web", "web", vec![], value)];
        p.processes.insert(100, meta.clone());
        p
    };
    let (cpu, off) = (profile("samples", "count", 3), profile("off_cpu", "nanoseconds", 5_000_000));
    let mut histogram = Histogram { buckets: [0; HIST_BUCKETS], max_ns: 5000 };
    histogram.buckets[13] = 1;
    let latency: Vec<ProcessHistogram> = [LatencyKind::RunQueue, LatencyKind::OffCpu]
        .into_iter()
        .map(|kind| ProcessHistogram { process: meta.clone(), kind, histogram })
        .collect();
    let interval = IntervalMetrics { start, end, cpu: &cpu, off_cpu: Some(&off), latency: &latency };
    let request = encode(&interval, &[], &Default::default(), start, end);
    request.resource_metrics.into_iter().flat_map(|r| r.scope_metrics).flat_map(|s| s.metrics).collect()
}

/// What a Prometheus exporter needs to know of an OTLP metric's type.
#[derive(Clone, Copy, PartialEq)]
enum OtlpKind {
    Gauge,
    Sum { monotonic: bool },
    Histogram,
    ExponentialHistogram,
}

/// The series name a Collector's Prometheus exporter gives an OTLP metric,
/// by OpenTelemetry's Prometheus compatibility rules with the unit and type
/// suffixes on (the exporter's default), as its translator applies them:
/// the name's alphanumeric tokens joined by `_`; then the unit's word
/// (`ns` -> `nanoseconds`, `By` -> `bytes`, `By/s` -> `bytes_per_second`)
/// unless the name already has that token, nothing for `1` or a unit with
/// a `{annotation}`; `total` last on monotonic sums, `ratio` last on gauges
/// of unit `1`. An exponential histogram is one native histogram of that
/// name. tests/packaging/checks/grafana.py's `prom_name` renames the
/// metrics a real daemon sent by the same rules.
fn prometheus_name(name: &str, unit: &str, kind: OtlpKind) -> String {
    let mut tokens: Vec<String> =
        name.split(|c: char| !c.is_ascii_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_owned).collect();
    let (main, per) = match unit.split_once('/') {
        Some((m, p)) => (m.trim(), p.trim()),
        None => (unit.trim(), ""),
    };
    let main_word = match main {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "Hz" => "hertz",
        "%" => "percent",
        "1" => "",
        other => other,
    };
    let per_word = match per {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        other => other,
    };
    if !main_word.is_empty() && !main.contains(['{', '}']) && !tokens.iter().any(|t| t == main_word) {
        tokens.push(main_word.to_owned());
    }
    if !per_word.is_empty() && !per.contains(['{', '}']) && !tokens.iter().any(|t| t == per_word) {
        tokens.push("per".to_owned());
        tokens.push(per_word.to_owned());
    }
    if kind == (OtlpKind::Sum { monotonic: true }) {
        tokens.retain(|t| t != "total");
        tokens.push("total".to_owned());
    }
    if unit == "1" && kind == OtlpKind::Gauge {
        tokens.retain(|t| t != "ratio");
        tokens.push("ratio".to_owned());
    }
    tokens.join("_")
}

/// An attribute key as a Prometheus label name.
fn prometheus_label(key: &str) -> String {
    key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == ':' { c } else { '_' }).collect()
}

/// (kind, what the table says of its type, its points' attribute keys).
fn describe(metric: &Metric) -> (OtlpKind, String, Vec<String>) {
    let temporality = |t: i32| if t == 1 { "delta" } else { "cumulative" };
    let number = |p: Option<&number_data_point::Value>| match p {
        Some(number_data_point::Value::AsDouble(_)) => "double",
        _ => "int",
    };
    let keys = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]| -> Vec<String> {
        attrs.iter().map(|a| a.key.clone()).collect()
    };
    match metric.data.as_ref() {
        Some(Data::ExponentialHistogram(h)) => (
            OtlpKind::ExponentialHistogram,
            format!("exponential histogram ({}, scale 0)", temporality(h.aggregation_temporality)),
            h.data_points.first().map(|p| keys(&p.attributes)).unwrap_or_default(),
        ),
        Some(Data::Histogram(h)) => (
            OtlpKind::Histogram,
            format!("histogram ({})", temporality(h.aggregation_temporality)),
            h.data_points.first().map(|p| keys(&p.attributes)).unwrap_or_default(),
        ),
        Some(Data::Sum(s)) => {
            let first = s.data_points.first();
            let monotonic = if s.is_monotonic { "monotonic, " } else { "" };
            (
                OtlpKind::Sum { monotonic: s.is_monotonic },
                format!(
                    "sum ({monotonic}{}, {})",
                    temporality(s.aggregation_temporality),
                    number(first.and_then(|p| p.value.as_ref()))
                ),
                first.map(|p| keys(&p.attributes)).unwrap_or_default(),
            )
        }
        Some(Data::Gauge(g)) => {
            let first = g.data_points.first();
            (
                OtlpKind::Gauge,
                format!("gauge ({})", number(first.and_then(|p| p.value.as_ref()))),
                first.map(|p| keys(&p.attributes)).unwrap_or_default(),
            )
        }
        _ => panic!("{}: a metric type the reference does not describe", metric.name),
    }
}

fn otlp_metrics_reference(out: &mut String, metrics_text: &str) {
    out.push_str(
        "\n### OTLP metrics\n\n\
         With `[export.otlp]` and `metrics = true` (the default) the agent also sends OTLP\n\
         metrics to the same endpoint, every interval: per-process scheduler latency\n\
         histograms and counters, and the health series above. Per-process points are\n\
         DELTA, each spanning one interval; a Collector's `deltatocumulative` processor\n\
         converts them for Prometheus. The \"Prometheus series\" column is the name a\n\
         Collector's Prometheus exporter serves, by OpenTelemetry's naming rules; the\n\
         exponential histograms (scale 0: the kernel's log2 buckets, exactly) become\n\
         native histograms, so Prometheus must accept those, and quantiles are read with\n\
         `histogram_quantile(0.99, sum by (k8s_namespace_name) (rate(profiler_runqueue_latency_nanoseconds[5m])))`.\n\n\
         | OTLP metric | type | unit | Prometheus series | meaning |\n|---|---|---|---|---|\n",
    );
    let metrics = sample_metrics();
    let mut attributes: Option<Vec<String>> = None;
    for m in &metrics {
        let (kind, what, keys) = describe(m);
        let prom = prometheus_name(&m.name, &m.unit, kind);
        let _ = writeln!(out, "| `{}` | {what} | `{}` | `{prom}` | {} |", m.name, m.unit, m.description);
        match &attributes {
            None => attributes = Some(keys),
            Some(a) => assert_eq!(a, &keys, "{}: other attributes than the first metric's", m.name),
        }
    }
    out.push_str(
        "\nEvery point of these metrics carries the process's attributes; with\n\
         Prometheus they are labels:\n\n\
         | attribute | Prometheus label | present |\n|---|---|---|\n",
    );
    for raw in attributes.unwrap_or_default() {
        let key = raw.replace(POD_LABEL, "<key>");
        let presence = ATTRIBUTE_PRESENCE
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("attribute {key}: add when it is present to ATTRIBUTE_PRESENCE"));
        let label = prometheus_label(&raw).replace(POD_LABEL, "<key>");
        let _ = writeln!(out, "| `{key}` | `{label}` | {presence} |");
    }
    out.push_str(
        "\nA pod label key becomes a label the same way (`app.kubernetes.io/name` ->\n\
         `k8s_pod_label_app_kubernetes_io_name`). The resource is the agent's own:\n\
         `service.name` (`profiler-agent` unless `[resource].service_name` or\n\
         `OTEL_SERVICE_NAME` sets it), `service.version`, `host.name` and\n\
         `[resource].attributes`; the exporter serves it as `target_info`, or as labels on\n\
         every series with `resource_to_telemetry_conversion`.\n\n\
         The health series go out as cumulative sums (counters) and gauges under\n\
         OpenTelemetry names, so through a Collector some arrive under another\n\
         Prometheus name than `/metrics` gives them:\n\n\
         | `/metrics` series | OTLP metric | unit | Prometheus series via a Collector |\n|---|---|---|---|\n",
    );
    let mut seen = std::collections::BTreeSet::new();
    for s in crate::export::otlp_metrics::health::parse(metrics_text) {
        if !seen.insert(s.prometheus_name.clone()) {
            continue;
        }
        let kind = match s.kind {
            crate::export::otlp_metrics::health::HealthKind::Counter => OtlpKind::Sum { monotonic: true },
            crate::export::otlp_metrics::health::HealthKind::Gauge => OtlpKind::Gauge,
        };
        let prom = prometheus_name(&s.name, s.unit, kind);
        let same = if prom == s.prometheus_name { "the same".to_owned() } else { format!("`{prom}`") };
        let _ = writeln!(out, "| `{}` | `{}` | `{}` | {same} |", s.prometheus_name, s.name, s.unit);
    }
}

/// Every series name the renderers can write is in the reference: the
/// optional sections only appear once their setter ran, which
/// `metrics_reference` must do for each.
#[test]
fn reference_lists_every_series_the_agent_renders() {
    let doc = render();
    let sources = [
        ("telemetry/mod.rs", include_str!("../telemetry/mod.rs")),
        ("metadata/mod.rs", include_str!("../metadata/mod.rs")),
        ("target/sync.rs", include_str!("../target/sync.rs")),
    ];
    let mut names = 0;
    for (file, src) in sources {
        for (i, _) in src.match_indices("\"profiler_") {
            let name: String = src[i + 1..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if name.ends_with('_') {
                continue; // a prefix, in an assertion
            }
            names += 1;
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{file} renders {name}, which docs/operations.md does not list: make metrics_reference in \
                 docs.rs call the setter that turns it on"
            );
        }
    }
    assert!(names > 50, "only {names} series names found in the renderers' source");
}

/// The dashboards under packaging/grafana query only series the reference
/// documents, from /metrics or as a Collector serves the OTLP metrics.
#[test]
fn reference_names_every_series_the_dashboards_query() {
    let doc = render();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("packaging/grafana/dashboards") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices("profiler_") {
            if text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            checked += 1;
            assert!(
                doc.contains(&format!("`{name}`")),
                "{} queries {name}, which docs/operations.md does not document",
                path.display()
            );
        }
    }
    assert!(checked > 10, "only {checked} series names found in the dashboards");
}

#[test]
fn prometheus_names_follow_the_collectors_rules() {
    let sum = OtlpKind::Sum { monotonic: true };
    assert_eq!(
        prometheus_name("profiler.runqueue.latency", "ns", OtlpKind::ExponentialHistogram),
        "profiler_runqueue_latency_nanoseconds"
    );
    assert_eq!(prometheus_name("profiler.offcpu.time", "s", sum), "profiler_offcpu_time_seconds_total");
    assert_eq!(prometheus_name("profiler.oncpu.samples", "{sample}", sum), "profiler_oncpu_samples_total");
    assert_eq!(prometheus_name("profiler.export.healthy", "1", OtlpKind::Gauge), "profiler_export_healthy_ratio");
    assert_eq!(prometheus_name("profiler.x", "1", sum), "profiler_x_total");
    assert_eq!(prometheus_name("profiler.memory.resident", "By", OtlpKind::Gauge), "profiler_memory_resident_bytes");
    assert_eq!(prometheus_name("a.rate", "By/s", OtlpKind::Gauge), "a_rate_bytes_per_second");
    assert_eq!(prometheus_name("a.b", "", OtlpKind::Sum { monotonic: false }), "a_b");
    // A unit already in the name is not repeated; `total` and `ratio` move last.
    assert_eq!(prometheus_name("cpu.seconds.used", "s", sum), "cpu_seconds_used_total");
    assert_eq!(prometheus_name("a.total.b", "{x}", sum), "a_b_total");
    assert_eq!(prometheus_name("a.ratio.b", "1", OtlpKind::Gauge), "a_b_ratio");
    assert_eq!(prometheus_name("a.b", "{packet}/s", OtlpKind::Gauge), "a_b_per_second");
    assert_eq!(prometheus_label("k8s.pod.label.app.kubernetes.io/name"), "k8s_pod_label_app_kubernetes_io_name");
}
