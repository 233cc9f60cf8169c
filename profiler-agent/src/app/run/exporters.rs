//! Exporter tasks. Each owns a bounded queue of interval profiles; the
//! symbolizing thread never waits for them.

use std::{sync::Arc, time::Instant};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    pipeline::IntervalProfiles,
    retry::{self, Attempt, RetryPolicy},
};
use crate::{
    config,
    export::{otlp, pyroscope, rolling::RollingDir},
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

/// Encodes each interval with `encode` and hands it to a retrying delivery
/// task that calls `send`.
fn spawn_network<T, E, S, Fut>(
    name: &'static str,
    telemetry: Arc<Telemetry>,
    retry: RetryPolicy,
    encode: E,
    send: S,
) -> (mpsc::Sender<Arc<IntervalProfiles>>, JoinHandle<()>)
where
    T: Send + Sync + 'static,
    E: Fn(&IntervalProfiles) -> Option<(T, u64)> + Send + 'static,
    S: Fn(Arc<T>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Attempt> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Arc<IntervalProfiles>>(QUEUE);
    let (payload_tx, payload_rx) = mpsc::channel::<(T, u64)>(QUEUE);
    let metrics = telemetry.exporter(name);
    let delivery = tokio::spawn(retry::deliver(payload_rx, retry, metrics, telemetry, send));
    let task = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            if let Some(payload) = encode(&p) {
                if payload_tx.send(payload).await.is_err() {
                    break;
                }
            }
        }
        drop(payload_tx);
        let _ = delivery.await;
    });
    (tx, task)
}

/// The OTLP profiles exporter.
pub fn spawn_otlp(
    cfg: &config::Otlp,
    resource: otlp::Resource,
    telemetry: Arc<Telemetry>,
) -> Result<(mpsc::Sender<Arc<IntervalProfiles>>, JoinHandle<()>), otlp::OtlpError> {
    let client = Arc::new(otlp::OtlpProfilesClient::new(otlp::ClientConfig {
        endpoint: cfg.endpoint.clone(),
        protocol: match cfg.protocol {
            config::OtlpProtocol::Grpc => otlp::Protocol::Grpc,
            config::OtlpProtocol::HttpProtobuf => otlp::Protocol::HttpProtobuf,
        },
        headers: cfg.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        connect_timeout: cfg.connect_timeout.0,
        request_timeout: cfg.timeout.0,
    })?);
    let encode = move |p: &IntervalProfiles| {
        let mut profiles = vec![&p.cpu];
        profiles.extend(p.off_cpu.as_ref());
        let req = otlp::encode(&profiles, &resource);
        let bytes = prost::Message::encoded_len(&req) as u64;
        (!req.resource_profiles.is_empty()).then_some((req, bytes))
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
