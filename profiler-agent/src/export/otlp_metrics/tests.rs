use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use flate2::read::GzDecoder;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point, AggregationTemporality, Metric};
use profiler_common::offcpu::{hist_bucket, Histogram, HIST_BUCKETS};
use proptest::prelude::*;
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;

use super::client::http_url;
use super::encode::{exponential_buckets, OFFCPU_DURATION, OFFCPU_TIME, ONCPU_SAMPLES, RUNQ_LATENCY};
use super::health::{self, HealthKind};
use super::*;
use crate::export::otlp::{ClientConfig, OtlpError, Protocol, Resource};
use crate::export::testutil::{on_cpu_profile, sample};
use crate::profile::{ProcessMeta, Profile, ValueType};
use crate::telemetry::Telemetry;

fn hist(values: &[u64]) -> Histogram {
    let mut h = Histogram { buckets: [0; HIST_BUCKETS], max_ns: 0 };
    for &v in values {
        h.buckets[hist_bucket(v)] += 1;
        h.max_ns = h.max_ns.max(v);
    }
    h
}

/// The OTLP scale-0 bucket holding `v > 0`: index `i` covers `(2^i, 2^(i+1)]`.
fn otlp_index(v: u64) -> i32 {
    // ceil(log2(v)) - 1
    (64 - (v - 1).leading_zeros()) as i32 - 1
}

/// A quantile read from OTLP buckets the way a backend would (linear inside
/// the bucket).
fn otlp_quantile(zero: u64, offset: i32, counts: &[u64], q: f64) -> f64 {
    let total = zero + counts.iter().sum::<u64>();
    let rank = q * total as f64;
    if rank <= zero as f64 {
        return 0.0;
    }
    let mut seen = zero as f64;
    for (j, &n) in counts.iter().enumerate() {
        if seen + n as f64 >= rank && n > 0 {
            let lo = 2f64.powi(offset + j as i32);
            return lo + (rank - seen) / n as f64 * lo;
        }
        seen += n as f64;
    }
    f64::NAN
}

#[test]
fn kernel_buckets_map_onto_scale_zero() {
    let (zero, offset, counts) = exponential_buckets(&hist(&[0, 0, 5, 6, 7, 1000, 1023]));
    assert_eq!(zero, 2);
    // 5..7 have 3 significant bits: kernel bucket 3, OTLP index 2 = (4, 8].
    assert_eq!(offset, 2);
    // 1000 and 1023 have 10 bits: OTLP index 9 = (512, 1024].
    assert_eq!(counts.len(), 8);
    assert_eq!((counts[0], counts[7]), (3, 2));
    assert!(counts[1..7].iter().all(|&n| n == 0));
    assert_eq!(exponential_buckets(&hist(&[])), (0, 0, vec![]));
    assert_eq!(exponential_buckets(&hist(&[0])), (1, 0, vec![]));
}

proptest! {
    /// Every value lands in the OTLP bucket that holds it, or (exactly at a
    /// power of two) at that bucket's upper boundary one index lower.
    #[test]
    fn every_value_lands_in_its_otlp_bucket(v in 1u64..(1 << 62)) {
        let (_, offset, counts) = exponential_buckets(&hist(&[v]));
        prop_assert_eq!(counts, vec![1]);
        let want = otlp_index(v);
        if v.is_power_of_two() {
            prop_assert_eq!(offset, want + 1);
        } else {
            prop_assert_eq!(offset, want);
        }
    }

    /// Backends deriving p50/p95/p99 from the OTLP buckets get what the
    /// agent's own summary computes, up to the max clamp.
    #[test]
    fn quantiles_agree_with_the_agents_own(values in proptest::collection::vec(1u64..10_000_000_000, 1..300)) {
        let h = hist(&values);
        let (zero, offset, counts) = exponential_buckets(&h);
        for q in [0.5, 0.95, 0.99] {
            let ours = crate::latency::quantile(&h, q);
            let theirs = otlp_quantile(zero, offset, &counts, q);
            prop_assert!((theirs.min(h.max_ns as f64) - ours).abs() <= 1e-6 * ours.max(1.0), "q{}: {} vs {}", q, theirs, ours);
        }
    }
}

fn meta(pid: u32, name: &str, exe: Option<&str>) -> ProcessMeta {
    ProcessMeta { pid, name: name.into(), exe_path: exe.map(Into::into), ..Default::default() }
}

fn off_cpu_profile(start: SystemTime) -> Profile {
    let mut p = Profile::new(ValueType::new("off_cpu", "nanoseconds"), None, 0, start);
    p.samples = vec![
        sample(100, 101, "app", "worker", vec![], 1_500_000_000),
        sample(100, 102, "app", "io", vec![], 500_000_000),
        sample(200, 200, "db", "db", vec![], 250_000_000),
    ];
    p.processes.insert(100, meta(100, "app", Some("/usr/bin/app-server")));
    p
}

fn find<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
    metrics.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no {name}"))
}

fn attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<any_value::Value> {
    attrs.iter().find(|a| a.key == key).and_then(|a| a.value.clone()).and_then(|v| v.value)
}

#[test]
fn encodes_histograms_counters_and_health() {
    let (cpu, _) = on_cpu_profile();
    let start = cpu.start;
    let end = start + Duration::from_nanos(cpu.duration_ns);
    let off = off_cpu_profile(start);
    let latency = vec![
        ProcessHistogram {
            process: meta(100, "app", Some("/usr/bin/app-server")),
            kind: LatencyKind::RunQueue,
            histogram: hist(&[3_000, 3_500, 0]),
        },
        ProcessHistogram {
            process: meta(100, "app", Some("/usr/bin/app-server")),
            kind: LatencyKind::OffCpu,
            histogram: hist(&[20_000_000; 4]),
        },
        // Empty: no point.
        ProcessHistogram { process: meta(300, "idle", None), kind: LatencyKind::RunQueue, histogram: hist(&[]) },
    ];
    let telemetry = Telemetry::default();
    telemetry.record_export(&telemetry.exporter("otlp"), true, Duration::from_millis(3));
    let series = health::parse(&telemetry.render());
    let resource = Resource {
        host_name: "node-1".into(),
        service_name_override: None,
        extra_attributes: vec![("deployment.environment".into(), "test".into())],
    };
    let interval = IntervalMetrics { start, end, cpu: &cpu, off_cpu: Some(&off), latency: &latency };
    let now = end + Duration::from_secs(1);
    let req = encode(&interval, &series, &resource, start - Duration::from_secs(60), now);

    assert_eq!(req.resource_metrics.len(), 1);
    let rm = &req.resource_metrics[0];
    let res = rm.resource.as_ref().unwrap();
    assert_eq!(attr(&res.attributes, "service.name"), Some(any_value::Value::StringValue("profiler-agent".into())));
    assert_eq!(attr(&res.attributes, "host.name"), Some(any_value::Value::StringValue("node-1".into())));
    assert_eq!(attr(&res.attributes, "deployment.environment"), Some(any_value::Value::StringValue("test".into())));
    let metrics = &rm.scope_metrics[0].metrics;
    let nanos = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64;

    let Some(Data::ExponentialHistogram(runq)) = &find(metrics, RUNQ_LATENCY).data else { panic!() };
    assert_eq!(runq.aggregation_temporality, AggregationTemporality::Delta as i32);
    assert_eq!(runq.data_points.len(), 1, "the empty histogram has no point");
    let p = &runq.data_points[0];
    assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (nanos(start), nanos(end)));
    assert_eq!((p.count, p.zero_count, p.scale), (3, 1, 0));
    assert_eq!(p.positive.as_ref().map(|b| (b.offset, b.bucket_counts.clone())), Some((11, vec![2])));
    assert_eq!((p.sum, p.min, p.max), (None, None, Some(3_500.0)));
    assert_eq!(attr(&p.attributes, "process.pid"), Some(any_value::Value::IntValue(100)));
    assert_eq!(
        attr(&p.attributes, "process.executable.name"),
        Some(any_value::Value::StringValue("app-server".into()))
    );
    assert_eq!(find(metrics, RUNQ_LATENCY).unit, "ns");
    let Some(Data::ExponentialHistogram(off_h)) = &find(metrics, OFFCPU_DURATION).data else { panic!() };
    assert_eq!(off_h.data_points[0].count, 4);

    let Some(Data::Sum(off_s)) = &find(metrics, OFFCPU_TIME).data else { panic!() };
    assert!(off_s.is_monotonic && off_s.aggregation_temporality == AggregationTemporality::Delta as i32);
    let secs: Vec<(Option<any_value::Value>, Option<number_data_point::Value>)> =
        off_s.data_points.iter().map(|p| (attr(&p.attributes, "process.pid"), p.value)).collect();
    assert_eq!(
        secs,
        [
            (Some(any_value::Value::IntValue(100)), Some(number_data_point::Value::AsDouble(2.0))),
            (Some(any_value::Value::IntValue(200)), Some(number_data_point::Value::AsDouble(0.25))),
        ]
    );
    // Without a ProcessMeta the comm names the process.
    assert_eq!(
        attr(&off_s.data_points[1].attributes, "process.executable.name"),
        Some(any_value::Value::StringValue("db".into()))
    );
    let Some(Data::Sum(on)) = &find(metrics, ONCPU_SAMPLES).data else { panic!() };
    assert_eq!(on.data_points.len(), 1);
    assert_eq!(on.data_points[0].value, Some(number_data_point::Value::AsInt(cpu.total() as i64)));

    // Health: cumulative since the given start, same values as /metrics.
    let Some(Data::Sum(attempts)) = &find(metrics, "profiler.export.attempts").data else { panic!() };
    assert_eq!(attempts.aggregation_temporality, AggregationTemporality::Cumulative as i32);
    let p = &attempts.data_points[0];
    assert_eq!(attr(&p.attributes, "exporter"), Some(any_value::Value::StringValue("otlp".into())));
    assert_eq!(p.value, Some(number_data_point::Value::AsInt(1)));
    assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (nanos(start - Duration::from_secs(60)), nanos(now)));
    let latency_m = find(metrics, "profiler.export.latency");
    assert_eq!(latency_m.unit, "s");
    let Some(Data::Sum(l)) = &latency_m.data else { panic!() };
    assert_eq!(l.data_points[0].value, Some(number_data_point::Value::AsDouble(0.003)));
    let Some(Data::Gauge(buffered)) = &find(metrics, "profiler.export.buffered").data else { panic!() };
    assert_eq!(buffered.data_points[0].start_time_unix_nano, 0, "gauges have no start");
    assert_eq!(buffered.data_points[0].value, Some(number_data_point::Value::AsInt(0)));
    assert!(matches!(find(metrics, "profiler.ready").data, Some(Data::Gauge(_))));
    let Some(Data::Sum(kernel)) = &find(metrics, "profiler.kernel.events").data else { panic!() };
    assert!(kernel.data_points.iter().any(|p| attr(&p.attributes, "kind").is_some()));
    // Every metric name is unique within the scope.
    let mut names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n);
}

#[test]
fn service_name_override_names_the_agent_resource() {
    let (cpu, _) = on_cpu_profile();
    let resource = Resource { service_name_override: Some("fleet-profiler".into()), ..Default::default() };
    let interval = IntervalMetrics { start: cpu.start, end: cpu.start, cpu: &cpu, off_cpu: None, latency: &[] };
    let req = encode(&interval, &[], &resource, cpu.start, cpu.start);
    let res = req.resource_metrics[0].resource.as_ref().unwrap();
    assert_eq!(attr(&res.attributes, "service.name"), Some(any_value::Value::StringValue("fleet-profiler".into())));
    let names: Vec<&str> = req.resource_metrics[0].scope_metrics[0].metrics.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [ONCPU_SAMPLES], "no off-CPU, no histograms, no health given");
}

#[test]
fn every_rendered_series_is_parsed_with_an_otel_name() {
    let t = Telemetry::default();
    t.intervals.store(7, std::sync::atomic::Ordering::Relaxed);
    t.record_export(&t.exporter("otlp_metrics"), false, Duration::from_millis(1));
    let text = t.render();
    let series = health::parse(&text);
    let samples = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    assert_eq!(series.len(), samples, "{text}");
    for s in &series {
        // Underscores only where the /metrics name needs them back.
        let kept = ["symbol_cache", "resident_memory"];
        assert!(
            s.name.starts_with("profiler.") && (!s.name.contains('_') || kept.iter().any(|k| s.name.contains(k))),
            "{s:?}"
        );
        assert_ne!(s.unit, "1", "a gauge in 1 comes back from a Collector as *_ratio: {s:?}");
        assert!(!s.help.is_empty(), "{s:?}");
    }
    let get = |name: &str| series.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name}"));
    assert_eq!(get("profiler.intervals").value, 7.0);
    assert_eq!(get("profiler.intervals").kind, HealthKind::Counter);
    let failures = get("profiler.export.failures");
    assert_eq!(failures.labels, [("exporter".to_owned(), "otlp_metrics".to_owned())]);
    assert_eq!(failures.value, 1.0);
    assert!(!failures.float);
    // Written as 0.001000: a double metric even when the value is whole.
    assert!(get("profiler.export.latency").float);
    assert_eq!(get("profiler.export.healthy").kind, HealthKind::Gauge);
    assert_eq!(health::otel_name("profiler_new_thing_seconds_total"), ("profiler.new.thing".into(), "s"));
    assert_eq!(health::otel_name("profiler_queue_bytes"), ("profiler.queue".into(), "By"));
}

#[test]
fn parses_escaped_label_values() {
    let text = "# TYPE x_total counter\nx_total{a=\"q\\\"uote\",b=\"back\\\\slash\"} 2\nignored 1\n";
    let series = health::parse(text);
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].labels, [("a".to_owned(), "q\"uote".to_owned()), ("b".to_owned(), "back\\slash".to_owned())]);
}

#[test]
fn http_url_follows_the_shared_endpoint() {
    assert_eq!(http_url("http://c:4318"), "http://c:4318/v1/metrics");
    assert_eq!(http_url("http://c:4318/"), "http://c:4318/v1/metrics");
    assert_eq!(http_url("http://c:4318/v1/metrics"), "http://c:4318/v1/metrics");
    assert_eq!(http_url("http://c:4318/v1development/profiles"), "http://c:4318/v1/metrics");
    assert_eq!(http_url("https://c/otlp"), "https://c/otlp/v1/metrics");
}

fn config(protocol: Protocol, addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        endpoint: format!("http://{addr}"),
        protocol,
        headers: vec![("x-tenant".into(), "team-a".into())],
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_millis(500),
        tls: Default::default(),
    }
}

fn request() -> ExportMetricsServiceRequest {
    let (cpu, _) = on_cpu_profile();
    let interval = IntervalMetrics { start: cpu.start, end: cpu.start, cpu: &cpu, off_cpu: None, latency: &[] };
    encode(&interval, &[], &Resource::default(), cpu.start, cpu.start)
}

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(tonic::metadata::MetadataMap, ExportMetricsServiceRequest)>>,
    fail_with: Option<tonic::Code>,
}

#[tonic::async_trait]
impl MetricsService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        if let Some(code) = self.fail_with {
            return Err(tonic::Status::new(code, "refused by test"));
        }
        let metadata = request.metadata().clone();
        self.seen.lock().unwrap().push((metadata, request.into_inner()));
        let partial = ExportMetricsPartialSuccess { rejected_data_points: 1, error_message: "stale".into() };
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: Some(partial) }))
    }
}

async fn grpc_receiver(recorder: Arc<Recorder>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = MetricsServiceServer::from_arc(recorder).accept_compressed(CompressionEncoding::Gzip);
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(service, TcpIncoming::from(listener)));
    addr
}

#[tokio::test]
async fn grpc_export_sends_gzip_and_headers() {
    let recorder = Arc::new(Recorder::default());
    let client = OtlpMetricsClient::new(config(Protocol::Grpc, grpc_receiver(recorder.clone()).await)).unwrap();
    let outcome = client.export(request()).await.unwrap();
    assert_eq!(outcome, MetricsOutcome { rejected_data_points: 1, message: Some("stale".into()) });
    let seen = recorder.seen.lock().unwrap();
    let (metadata, received) = &seen[0];
    assert_eq!(received, &request());
    let header = |k: &str| metadata.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(header("grpc-encoding").as_deref(), Some("gzip"));
    assert_eq!(header("x-tenant").as_deref(), Some("team-a"));
    assert_eq!(header("otlp-profiles-development-version"), None, "a profiles-only header");
}

#[tokio::test]
async fn grpc_unimplemented_is_not_retried_and_unavailable_is() {
    // A receiver without the metrics service (a profiles-only backend)
    // answers Unimplemented: retrying cannot help.
    for (code, retryable) in [(tonic::Code::Unimplemented, false), (tonic::Code::Unavailable, true)] {
        let recorder = Arc::new(Recorder { fail_with: Some(code), ..Default::default() });
        let client = OtlpMetricsClient::new(config(Protocol::Grpc, grpc_receiver(recorder).await)).unwrap();
        let err = client.export(request()).await.unwrap_err();
        assert!(matches!(err, OtlpError::Status { code: c, .. } if c == code), "{err:?}");
        assert_eq!(err.retryable(), retryable);
    }
}

#[tokio::test]
async fn http_export_posts_gzip_protobuf_to_v1_metrics() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = OtlpMetricsClient::new(config(Protocol::HttpProtobuf, listener.local_addr().unwrap())).unwrap();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap().to_ascii_lowercase();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).unwrap();
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
        }
        let mut raw = Vec::new();
        GzDecoder::new(&buf[head_end..]).read_to_end(&mut raw).unwrap();
        let body = ExportMetricsServiceResponse::default().encode_to_vec();
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(reply.as_bytes()).await.unwrap();
        conn.write_all(&body).await.unwrap();
        (head, raw)
    });
    let outcome = client.export(request()).await.unwrap();
    assert_eq!(outcome, MetricsOutcome::default());
    let (head, raw) = server.await.unwrap();
    assert!(head.starts_with("post /v1/metrics http/1.1\r\n"), "{head}");
    for line in ["content-type: application/x-protobuf", "content-encoding: gzip", "x-tenant: team-a"] {
        assert!(head.contains(line), "{line} missing in {head}");
    }
    assert_eq!(ExportMetricsServiceRequest::decode(raw.as_slice()).unwrap(), request());
}

#[tokio::test]
async fn silent_receiver_times_out_and_closed_port_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            held.push(c);
        }
    });
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let started = std::time::Instant::now();
        let err = OtlpMetricsClient::new(config(protocol, silent)).unwrap().export(request()).await.unwrap_err();
        assert!(matches!(err, OtlpError::Timeout { .. }), "{protocol:?}: {err:?}");
        assert!(err.retryable() && started.elapsed() < Duration::from_secs(3), "{protocol:?}");
        let err = OtlpMetricsClient::new(config(protocol, closed)).unwrap().export(request()).await.unwrap_err();
        assert!(matches!(err, OtlpError::Connect { .. }), "{protocol:?}: {err:?}");
    }
}
