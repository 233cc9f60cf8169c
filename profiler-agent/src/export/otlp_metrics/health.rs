//! The agent's own health series, read from the Prometheus text that
//! [`crate::telemetry::Telemetry::render`] serves on `/metrics`.
//!
//! Reading the rendered text rather than the counters keeps one source of
//! truth: every series `/metrics` has, including ones added later, is also
//! exported over OTLP, with the same values and labels. Prometheus names get
//! OpenTelemetry-style names (`profiler_export_attempts_total` ->
//! `profiler.export.attempts`, unit suffix -> unit), which a Collector's
//! Prometheus exporter turns back into the `/metrics` names.

/// Counter or gauge, as the `# TYPE` line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthKind {
    Counter,
    Gauge,
}

/// One series (one label set) of one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthSeries {
    /// OpenTelemetry-style name.
    pub name: String,
    /// The Prometheus name it came from.
    pub prometheus_name: String,
    pub unit: &'static str,
    pub help: String,
    pub kind: HealthKind,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// The value was written as a float (`0.003000`), not an integer: the
    /// metric is a double metric whatever this value happens to be, so its
    /// OTLP type does not flip between requests.
    pub float: bool,
}

/// Names of the known series: (Prometheus, OpenTelemetry, unit).
const NAMES: &[(&str, &str, &str)] = &[
    ("profiler_kernel_events_total", "profiler.kernel.events", "{event}"),
    ("profiler_intervals_total", "profiler.intervals", "{interval}"),
    ("profiler_intervals_dropped_total", "profiler.intervals.dropped", "{interval}"),
    ("profiler_aggregation_dropped_total", "profiler.aggregation.dropped", "{sample}"),
    ("profiler_symbol_cache_hits_total", "profiler.symbol_cache.hits", "{lookup}"),
    ("profiler_symbol_cache_misses_total", "profiler.symbol_cache.misses", "{lookup}"),
    ("profiler_symbol_cache_evictions_total", "profiler.symbol_cache.evictions", "{entry}"),
    ("profiler_symbol_cache_entries", "profiler.symbol_cache.entries", "{entry}"),
    ("profiler_frames_total", "profiler.frames", "{frame}"),
    ("profiler_frames_unsymbolized_total", "profiler.frames.unsymbolized", "{frame}"),
    ("profiler_export_attempts_total", "profiler.export.attempts", "{attempt}"),
    ("profiler_export_failures_total", "profiler.export.failures", "{attempt}"),
    ("profiler_export_dropped_total", "profiler.export.dropped", "{interval}"),
    ("profiler_export_latency_seconds_total", "profiler.export.latency", "s"),
    ("profiler_export_buffered_bytes", "profiler.export.buffered", "By"),
    ("profiler_export_healthy", "profiler.export.healthy", "{state}"),
    ("profiler_resident_memory_bytes", "profiler.resident_memory", "By"),
    ("profiler_ready", "profiler.ready", "{state}"),
];

/// The OpenTelemetry name and unit of a Prometheus series: from `NAMES`,
/// else by rule (drop `_total`, a `_seconds` / `_bytes` suffix becomes the
/// unit, `_` becomes `.`). Counts get the annotation `{count}` rather than
/// the unit `1`: a Collector's Prometheus exporter adds `_ratio` to a gauge
/// in `1`, and drops annotations, so the name comes back as on /metrics.
pub fn otel_name(prometheus: &str) -> (String, &'static str) {
    if let Some((_, name, unit)) = NAMES.iter().find(|(p, _, _)| *p == prometheus) {
        return ((*name).to_owned(), unit);
    }
    let base = prometheus.strip_suffix("_total").unwrap_or(prometheus);
    let (base, unit) = if let Some(b) = base.strip_suffix("_seconds") {
        (b, "s")
    } else if let Some(b) = base.strip_suffix("_bytes") {
        (b, "By")
    } else {
        (base, "{count}")
    };
    (base.replace('_', "."), unit)
}

/// Parses the Prometheus text exposition format as `Telemetry::render`
/// writes it: `# HELP` and `# TYPE` lines, then `name{k="v",...} value` or
/// `name value`. Series of other types, or unparsable lines, are skipped.
pub fn parse(text: &str) -> Vec<HealthSeries> {
    let mut out = Vec::new();
    let mut kinds: Vec<(String, HealthKind)> = Vec::new();
    let mut helps: Vec<(String, String)> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                let kind = match kind {
                    "counter" => HealthKind::Counter,
                    "gauge" => HealthKind::Gauge,
                    _ => continue,
                };
                kinds.push((name.to_owned(), kind));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, help)) = rest.split_once(' ') {
                helps.push((name.to_owned(), help.to_owned()));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value, float)) = parse_sample(line) else { continue };
        let Some(kind) = kinds.iter().rev().find(|(n, _)| *n == name).map(|(_, k)| *k) else { continue };
        let help = helps.iter().rev().find(|(n, _)| *n == name).map(|(_, h)| h.clone()).unwrap_or_default();
        let (otel, unit) = otel_name(name);
        out.push(HealthSeries { name: otel, prometheus_name: name.to_owned(), unit, help, kind, labels, value, float });
    }
    out
}

/// Name, labels, value, and whether the value is written as a float.
type Sample<'a> = (&'a str, Vec<(String, String)>, f64, bool);

/// `name{labels} value` -> its parts.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let (head, text) = line.rsplit_once(' ')?;
    let value: f64 = text.parse().ok()?;
    let float = text.parse::<i64>().is_err();
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head, Vec::new(), value, float));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .take_while(|&c| c != '=')
            .collect::<String>()
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_owned();
        if key.is_empty() {
            break;
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut v = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        labels.push((key, v));
    }
    Some((name, labels, value, float))
}
