//! Exporter tasks. Each owns a bounded queue of interval profiles; the
//! symbolizing thread never waits for them.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    pipeline::IntervalProfiles,
    retry::{self, Attempt, RetryPolicy},
};
use crate::{
    config,
    export::{otlp, otlp_metrics, pyroscope, rolling::RollingDir},
    telemetry::Telemetry,
};

/// Intervals an exporter may have queued before new ones are dropped.
const QUEUE: usize = 4;

/// The rolling local-file exporter.
pub fn spawn_files(
    mut rolling: RollingDir,
    telemetry: Arc<Telemetry>,
) -> (mpsc::Sender<Arc<IntervalProfiles>>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Arc<IntervalProfiles>>(QUEUE);
    let metrics = telemetry.exporter("files");
    let task = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            let started = Instant::now();
            // File writes block; keep them off the async workers.
            let (r, result) = tokio::task::spawn_blocking(move || {
                let mut result = rolling.write("cpu", &p.cpu).map(|_| ());
                if let (Ok(()), Some(off)) = (&result, &p.off_cpu) {
                    result = rolling.write("off-cpu", off).map(|_| ());
                }
                (rolling, result)
            })
            .await
            .expect("file export task panicked");
            rolling = r;
            if let Err(e) = &result {
                log::warn!("writing the interval's profile files failed: {e}");
            }
            telemetry.record_export(&metrics, result.is_ok(), started.elapsed());
        }
    });
    (tx, task)
}

/// Bounded retry policy from an exporter's buffer settings.
fn policy(max_bytes: u64, max_age: std::time::Duration) -> RetryPolicy {
    RetryPolicy {
        max_bytes,
        max_age,
        initial_backoff: std::time::Duration::from_secs(1),
        max_backoff: std::time::Duration::from_secs(30),
    }
}

/// Encodes each interval with `encode` (into none, one or several payloads,
/// each delivered and retried on its own) and hands the payloads to a
/// retrying delivery task that calls `send`.
fn spawn_network<T, I, E, S, Fut>(
    name: &'static str,
    telemetry: Arc<Telemetry>,
    retry: RetryPolicy,
    encode: E,
    send: S,
) -> (mpsc::Sender<Arc<IntervalProfiles>>, JoinHandle<()>)
where
    T: Send + Sync + 'static,
    I: IntoIterator<Item = (T, u64)>,
    I::IntoIter: Send,
    E: Fn(&IntervalProfiles) -> I + Send + 'static,
    S: Fn(Arc<T>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Attempt> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Arc<IntervalProfiles>>(QUEUE);
    let (payload_tx, payload_rx) = mpsc::channel::<(T, u64)>(QUEUE);
    let metrics = telemetry.exporter(name);
    let delivery = tokio::spawn(retry::deliver(payload_rx, retry, metrics, telemetry, send));
    let task = tokio::spawn(async move {
        'intervals: while let Some(p) = rx.recv().await {
            for payload in encode(&p) {
                if payload_tx.send(payload).await.is_err() {
                    break 'intervals;
                }
            }
        }
        drop(payload_tx);
        let _ = delivery.await;
    });
    (tx, task)
}

/// Builds every network exporter's client once and drops it: a bad URL or
/// header, or an unreadable CA, certificate or key file is reported before
/// any program is loaded. Nothing connects.
pub fn check(config: &config::Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Some(cfg) = &config.export.otlp {
        otlp::OtlpProfilesClient::new(client_config(cfg))
            .with_context(|| format!("invalid OTLP exporter settings for {}", cfg.endpoint))?;
    }
    Ok(())
}

/// The OTLP profiles exporter.
pub fn spawn_otlp(
    cfg: &config::Otlp,
    resource: otlp::Resource,
    telemetry: Arc<Telemetry>,
) -> Result<(mpsc::Sender<Arc<IntervalProfiles>>, JoinHandle<()>), otlp::OtlpError> {
    let client = Arc::new(otlp::OtlpProfilesClient::new(client_config(cfg))?);
    let encode = move |p: &IntervalProfiles| {
        let mut profiles = vec![&p.cpu];
        profiles.extend(p.off_cpu.as_ref());
        // Requests over gRPC's default 4 MiB limit go as several, by process.
        let reqs = otlp::encode_split(&profiles, &resource, otlp::MAX_REQUEST_BYTES);
        reqs.into_iter().filter(|req| !req.resource_profiles.is_empty()).map(|req| {
            let bytes = prost::Message::encoded_len(&req) as u64;
            (req, bytes)
        })
    };
    let send = move |req: Arc<otlp::ExportProfilesServiceRequest>| {
        let client = client.clone();
        async move {
            match client.export((*req).clone()).await {
                Ok(outcome) => {
                    if outcome.rejected_profiles > 0 {
                        log::warn!(
                            "the OTLP receiver rejected {} profiles: {}",
                            outcome.rejected_profiles,
                            outcome.message.unwrap_or_default()
                        );
                    }
                    Attempt::Delivered
                }
                Err(e) if e.retryable() => Attempt::Retry(e.to_string()),
                Err(e) => Attempt::Reject(e.to_string()),
            }
        }
    };
    Ok(spawn_network("otlp", telemetry, policy(cfg.buffer_bytes.0, cfg.buffer_max_age.0), encode, send))
}

/// The OTLP metrics exporter: same receiver, protocol, headers, timeouts and
/// buffer bounds as the profiles; its own queue, retry buffer and telemetry
/// (`exporter="otlp_metrics"`), so neither signal holds up the other.
///
/// A receiver that answers that it has no metrics service at all (gRPC
/// `Unimplemented`, HTTP 404: a profiles-only backend such as Pyroscope's
/// OTLP ingest) turns metrics export off until restart, with one warning:
/// otherwise every interval would be rejected and logged, and `/readyz`
/// would stay unready for a signal the backend will never take.
pub fn spawn_otlp_metrics(
    cfg: &config::Otlp,
    resource: otlp::Resource,
    telemetry: Arc<Telemetry>,
) -> Result<(mpsc::Sender<Arc<IntervalProfiles>>, JoinHandle<()>), otlp::OtlpError> {
    let client = Arc::new(otlp_metrics::OtlpMetricsClient::new(client_config(cfg))?);
    // The health counters are cumulative from (about) here.
    let health_start = std::time::SystemTime::now();
    let health = telemetry.clone();
    let unsupported = Arc::new(AtomicBool::new(false));
    let off = unsupported.clone();
    let exporter = telemetry.exporter("otlp_metrics");
    let encode = move |p: &IntervalProfiles| {
        if off.load(Ordering::Relaxed) {
            // Off on purpose, not failing: the rejections that switched it
            // off are counted in failures and drops.
            exporter.healthy.store(true, Ordering::Relaxed);
            return None;
        }
        let interval = otlp_metrics::IntervalMetrics {
            start: p.cpu.start,
            end: p.cpu.start + std::time::Duration::from_nanos(p.cpu.duration_ns),
            cpu: &p.cpu,
            off_cpu: p.off_cpu.as_ref(),
            latency: &p.latency,
        };
        let series = otlp_metrics::health::parse(&health.render());
        let req = otlp_metrics::encode(&interval, &series, &resource, health_start, std::time::SystemTime::now());
        let bytes = prost::Message::encoded_len(&req) as u64;
        Some((req, bytes))
    };
    let send = move |req: Arc<otlp_metrics::ExportMetricsServiceRequest>| {
        let (client, unsupported) = (client.clone(), unsupported.clone());
        async move {
            match client.export((*req).clone()).await {
                Err(
                    e @ (otlp::OtlpError::Status { code: tonic::Code::Unimplemented, .. }
                    | otlp::OtlpError::Http { status: 404, .. }),
                ) => {
                    if !unsupported.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "the OTLP receiver does not accept metrics ({e}); exporting profiles only until restart"
                        );
                    }
                    Attempt::Reject(format!("OTLP metrics: {e}"))
                }
                Ok(outcome) => {
                    if outcome.rejected_data_points > 0 {
                        log::warn!(
                            "the OTLP receiver rejected {} metric data points: {}",
                            outcome.rejected_data_points,
                            outcome.message.unwrap_or_default()
                        );
                    }
                    Attempt::Delivered
                }
                Err(e) if e.retryable() => Attempt::Retry(format!("OTLP metrics: {e}")),
                Err(e) => Attempt::Reject(format!("OTLP metrics: {e}")),
            }
        }
    };
    Ok(spawn_network("otlp_metrics", telemetry, policy(cfg.buffer_bytes.0, cfg.buffer_max_age.0), encode, send))
}

fn client_config(cfg: &config::Otlp) -> otlp::ClientConfig {
    otlp::ClientConfig {
        endpoint: cfg.endpoint.clone(),
        protocol: match cfg.protocol {
            config::OtlpProtocol::Grpc => otlp::Protocol::Grpc,
            config::OtlpProtocol::HttpProtobuf => otlp::Protocol::HttpProtobuf,
        },
        headers: cfg.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        connect_timeout: cfg.connect_timeout.0,
        request_timeout: cfg.timeout.0,
        tls: otlp::TlsConfig {
            insecure: cfg.insecure,
            ca_file: cfg.ca_file.clone(),
            client_cert_file: cfg.client_cert_file.clone(),
            client_key_file: cfg.client_key_file.clone(),
        },
    }
}

/// The Pyroscope push exporter.
pub fn spawn_pyroscope(
    cfg: &config::Pyroscope,
    labels: pyroscope::PushLabels,
    telemetry: Arc<Telemetry>,
) -> Result<(mpsc::Sender<Arc<IntervalProfiles>>, JoinHandle<()>), pyroscope::client::PyroscopeError> {
    let client = Arc::new(pyroscope::client::PyroscopeClient::new(&pyroscope::client::PyroscopeConfig {
        base_url: cfg.url.clone(),
        tenant_id: None,
        basic_auth: None,
        headers: cfg.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        connect_timeout: cfg.connect_timeout.0,
        request_timeout: cfg.timeout.0,
    })?);
    let encode = move |p: &IntervalProfiles| {
        let mut profiles = vec![&p.cpu];
        profiles.extend(p.off_cpu.as_ref());
        match pyroscope::encode(&profiles, &labels) {
            Ok(req) if !req.series.is_empty() => {
                let bytes = prost::Message::encoded_len(&req) as u64;
                Some((req, bytes))
            }
            Ok(_) => None,
            Err(e) => {
                log::warn!("encoding the Pyroscope push failed: {e}");
                None
            }
        }
    };
    let send = move |req: Arc<pyroscope::proto::PushRequest>| {
        let client = client.clone();
        async move {
            match client.push(&req).await {
                Ok(()) => Attempt::Delivered,
                Err(e) if e.retryable() => Attempt::Retry(e.to_string()),
                Err(e) => Attempt::Reject(e.to_string()),
            }
        }
    };
    Ok(spawn_network("pyroscope", telemetry, policy(cfg.buffer_bytes.0, cfg.buffer_max_age.0), encode, send))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_server::{
        ProfilesService, ProfilesServiceServer,
    };
    use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tonic::transport::server::TcpIncoming;

    use super::*;
    use crate::profile::{Profile, ValueType};

    fn interval() -> Arc<IntervalProfiles> {
        let cpu = Profile::new(ValueType::new("samples", "count"), None, 1, SystemTime::now());
        Arc::new(IntervalProfiles { cpu, off_cpu: None, latency: Vec::new() })
    }

    /// An OTLP/HTTP receiver without a metrics route: 404 to every request.
    async fn profiles_only_receiver(requests: Arc<std::sync::atomic::AtomicU64>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                requests.fetch_add(1, Ordering::Relaxed);
                let mut buf = vec![0u8; 64 * 1024];
                let _ = conn.read(&mut buf).await;
                let _ =
                    conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
            }
        });
        addr
    }

    /// A gRPC profiles receiver with tonic's default 4 MiB message limit,
    /// keeping every request it accepts.
    #[derive(Default)]
    struct Keep(std::sync::Mutex<Vec<otlp::ExportProfilesServiceRequest>>);

    #[tonic::async_trait]
    impl ProfilesService for Keep {
        async fn export(
            &self,
            request: tonic::Request<otlp::ExportProfilesServiceRequest>,
        ) -> Result<tonic::Response<ExportProfilesServiceResponse>, tonic::Status> {
            self.0.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportProfilesServiceResponse::default()))
        }
    }

    #[tokio::test]
    async fn an_interval_over_the_grpc_limit_arrives_whole_in_parts() {
        use crate::export::otlp::split::tests::{many_processes, values};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let keep = Arc::new(Keep::default());
        let service =
            ProfilesServiceServer::from_arc(keep.clone()).accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(service, TcpIncoming::from(listener)));

        // 1500 processes with long (1.5 KB) names: over 4 MiB like ~10k
        // typical processes, at a fraction of the test's time.
        let cpu = many_processes(1500, 2, 1500);
        let whole = otlp::encode(&[&cpu], &otlp::Resource::default());
        assert!(prost::Message::encoded_len(&whole) > 4 << 20, "the fixture must pass gRPC's 4 MiB limit");
        // Generous: gzip of several MiB is slow in unoptimized test builds.
        let cfg = config::Otlp {
            endpoint: format!("http://{addr}"),
            timeout: crate::config::HumanDuration(Duration::from_secs(60)),
            ..Default::default()
        };
        // As one request, the receiver refuses it.
        let client = otlp::OtlpProfilesClient::new(client_config(&cfg)).unwrap();
        let refused = client.export(whole.clone()).await.expect_err("over the receiver's limit");
        assert!(
            matches!(
                refused,
                otlp::OtlpError::Status { code: tonic::Code::OutOfRange | tonic::Code::ResourceExhausted, .. }
            ),
            "{refused:?}"
        );

        let telemetry = Arc::new(Telemetry::default());
        let (tx, task) = spawn_otlp(&cfg, otlp::Resource::default(), telemetry.clone()).unwrap();
        tx.send(Arc::new(IntervalProfiles { cpu, off_cpu: None, latency: Vec::new() })).await.unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(60), task).await.unwrap().unwrap();
        let received = keep.0.lock().unwrap();
        assert!(received.len() >= 2, "split into {} requests", received.len());
        assert_eq!(received.iter().map(|r| r.resource_profiles.len()).sum::<usize>(), 1500);
        assert_eq!(values(&received), values(&[whole]), "every sample arrives, once");
        let metrics = telemetry.exporter("otlp");
        assert_eq!(metrics.failures.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_receiver_with_an_untrusted_certificate_counts_failures() {
        use crate::export::otlp::tls_tests::{tls_grpc_receiver, Pki};
        let (server, other) = (Pki::new(), Pki::new());
        let (addr, received) = tls_grpc_receiver(&server, false).await;
        let cfg = config::Otlp {
            endpoint: format!("https://{addr}"),
            ca_file: Some(other.client_tls(false).ca_file.unwrap()),
            ..Default::default()
        };
        let telemetry = Arc::new(Telemetry::default());
        let (tx, task) = spawn_otlp(&cfg, otlp::Resource::default(), telemetry.clone()).unwrap();
        let metrics = telemetry.exporter("otlp");
        let (p, _) = crate::export::testutil::on_cpu_profile();
        tx.send(Arc::new(IntervalProfiles { cpu: p, off_cpu: None, latency: Vec::new() })).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metrics.failures.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(metrics.failures.load(Ordering::Relaxed) >= 1, "the failed handshake is counted");
        assert!(telemetry.render().contains("profiler_export_failures_total{exporter=\"otlp\"}"));
        assert_eq!(*received.0.lock().unwrap(), 0);
        drop(tx);
        task.abort();
    }

    #[tokio::test]
    async fn metrics_export_turns_itself_off_for_a_receiver_without_metrics() {
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let addr = profiles_only_receiver(requests.clone()).await;
        let cfg = config::Otlp {
            endpoint: format!("http://{addr}"),
            protocol: config::OtlpProtocol::HttpProtobuf,
            ..Default::default()
        };
        let telemetry = Arc::new(Telemetry::default());
        let (tx, task) = spawn_otlp_metrics(&cfg, otlp::Resource::default(), telemetry.clone()).unwrap();
        let metrics = telemetry.exporter("otlp_metrics");
        tx.send(interval()).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // The rejection itself is a failure (and a drop).
        while (metrics.failures.load(Ordering::Relaxed) == 0 || metrics.healthy.load(Ordering::Relaxed))
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.failures.load(Ordering::Relaxed), 1);
        for _ in 0..3 {
            tx.send(interval()).await.unwrap();
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        assert_eq!(requests.load(Ordering::Relaxed), 1, "nothing more is sent once the receiver said no");
        assert_eq!(metrics.attempts.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.dropped.load(Ordering::Relaxed), 1);
        assert!(metrics.healthy.load(Ordering::Relaxed), "off on purpose is not unready");
    }
}
