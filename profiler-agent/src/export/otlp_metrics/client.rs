//! Sending an `ExportMetricsServiceRequest` to an OTLP receiver: gRPC
//! `MetricsService/Export` through tonic, or OTLP/HTTP `POST /v1/metrics`
//! through reqwest, both gzipped. Same configuration and error type as the
//! profiles client ([`crate::export::otlp::client`]); like it, this client
//! never retries and says through [`OtlpError::retryable`] whether the
//! caller should.

use std::error::Error as StdError;
use std::io::Write as _;
use std::str::FromStr as _;
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use flate2::Compression;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use tonic::codec::CompressionEncoding;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::export::otlp::{ClientConfig, OtlpError, Protocol};

/// The OTLP/HTTP path of the metrics signal.
pub const HTTP_PATH: &str = "/v1/metrics";
/// The profiles signal path, stripped should the shared endpoint carry it.
const PROFILES_PATH: &str = "/v1development/profiles";

/// What the receiver said about an accepted request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsOutcome {
    /// Data points the receiver dropped (partial success); 0 if all were taken.
    pub rejected_data_points: i64,
    pub message: Option<String>,
}

impl MetricsOutcome {
    fn from_partial(p: Option<ExportMetricsPartialSuccess>) -> Self {
        let p = p.unwrap_or_default();
        Self { rejected_data_points: p.rejected_data_points, message: Some(p.error_message).filter(|m| !m.is_empty()) }
    }
}

/// A client for one OTLP metrics receiver.
pub struct OtlpMetricsClient {
    config: ClientConfig,
    transport: Transport,
}

enum Transport {
    Grpc {
        endpoint: Box<Endpoint>,
        /// Created on first use, inside the runtime (see the profiles client).
        channel: OnceLock<Channel>,
        metadata: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: HeaderMap,
    },
}

impl OtlpMetricsClient {
    /// Validates `config` and prepares the transport; nothing connects yet.
    ///
    /// # Errors
    ///
    /// [`OtlpError::Config`] for an unusable endpoint or header.
    pub fn new(config: ClientConfig) -> Result<Self, OtlpError> {
        if !(config.endpoint.starts_with("http://") || config.endpoint.starts_with("https://")) {
            return Err(OtlpError::Config(format!(
                "endpoint {:?} must start with http:// or https://",
                config.endpoint
            )));
        }
        let transport = match config.protocol {
            Protocol::Grpc => grpc_transport(&config)?,
            Protocol::HttpProtobuf => http_transport(&config)?,
        };
        Ok(Self { config, transport })
    }

    /// The URL requests go to (HTTP), or the gRPC endpoint.
    pub fn target(&self) -> &str {
        match &self.transport {
            Transport::Http { url, .. } => url,
            Transport::Grpc { .. } => &self.config.endpoint,
        }
    }

    /// Sends `req` once, within `connect_timeout + request_timeout`.
    ///
    /// # Errors
    ///
    /// See [`OtlpError`]; [`OtlpError::retryable`] says whether to try again.
    pub async fn export(&self, req: ExportMetricsServiceRequest) -> Result<MetricsOutcome, OtlpError> {
        let budget = self.config.connect_timeout.saturating_add(self.config.request_timeout);
        let call = async {
            match &self.transport {
                Transport::Grpc { endpoint, channel, metadata } => {
                    let channel = channel.get_or_init(|| endpoint.connect_lazy()).clone();
                    self.export_grpc(channel, metadata, req).await
                }
                Transport::Http { client, url, headers } => self.export_http(client, url, headers, req).await,
            }
        };
        tokio::time::timeout(budget, call).await.unwrap_or_else(|_| Err(self.timeout()))
    }

    async fn export_grpc(
        &self,
        channel: Channel,
        metadata: &[(AsciiMetadataKey, AsciiMetadataValue)],
        req: ExportMetricsServiceRequest,
    ) -> Result<MetricsOutcome, OtlpError> {
        let mut client = MetricsServiceClient::new(channel)
            .send_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Gzip);
        let mut request = tonic::Request::new(req);
        request.set_timeout(self.config.request_timeout);
        for (k, v) in metadata {
            request.metadata_mut().insert(k.clone(), v.clone());
        }
        match client.export(request).await {
            Ok(resp) => Ok(MetricsOutcome::from_partial(resp.into_inner().partial_success)),
            Err(status) => Err(self.classify_status(status)),
        }
    }

    /// tonic reports its own timeout as `Cancelled` and a failed connect as
    /// `Unavailable`, with the cause in the source chain.
    fn classify_status(&self, status: tonic::Status) -> OtlpError {
        let mut cause: Option<&(dyn StdError + 'static)> = StdError::source(&status);
        let (mut timed_out, mut connect) = (status.code() == tonic::Code::DeadlineExceeded, false);
        while let Some(err) = cause {
            timed_out |= err.is::<tonic::TimeoutExpired>();
            connect |= err.is::<tonic::ConnectError>();
            cause = err.source();
        }
        if timed_out {
            self.timeout()
        } else if connect {
            OtlpError::Connect { endpoint: self.config.endpoint.clone(), source: Box::new(status) }
        } else {
            OtlpError::Status {
                endpoint: self.config.endpoint.clone(),
                code: status.code(),
                message: status.message().to_owned(),
            }
        }
    }

    async fn export_http(
        &self,
        client: &reqwest::Client,
        url: &str,
        headers: &HeaderMap,
        req: ExportMetricsServiceRequest,
    ) -> Result<MetricsOutcome, OtlpError> {
        let body = gzip(&req.encode_to_vec())?;
        let sent = client.post(url).headers(headers.clone()).body(body).send().await;
        let resp = sent.map_err(|e| self.classify_reqwest(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.classify_reqwest(e))?;
        if status.is_success() {
            let partial = ExportMetricsServiceResponse::decode(bytes.as_ref()).ok().and_then(|r| r.partial_success);
            return Ok(MetricsOutcome::from_partial(partial));
        }
        let text = String::from_utf8_lossy(&bytes);
        let body: String = text.trim().chars().take(512).collect();
        Err(OtlpError::Http { endpoint: url.to_owned(), status: status.as_u16(), body })
    }

    fn classify_reqwest(&self, e: reqwest::Error) -> OtlpError {
        let endpoint = self.config.endpoint.clone();
        if e.is_timeout() {
            self.timeout()
        } else if e.is_connect() {
            OtlpError::Connect { endpoint, source: Box::new(e) }
        } else {
            OtlpError::Transport { endpoint, source: Box::new(e) }
        }
    }

    fn timeout(&self) -> OtlpError {
        OtlpError::Timeout { endpoint: self.config.endpoint.clone(), timeout: self.config.request_timeout }
    }
}

fn grpc_transport(config: &ClientConfig) -> Result<Transport, OtlpError> {
    if config.endpoint.starts_with("https://") {
        return Err(OtlpError::Config(format!(
            "{}: gRPC over TLS is not built in; use http:// or the HTTP protocol",
            config.endpoint
        )));
    }
    let endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| OtlpError::Config(format!("endpoint {:?}: {e}", config.endpoint)))?
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout);
    let mut metadata = Vec::with_capacity(config.headers.len());
    for (k, v) in &config.headers {
        let key = AsciiMetadataKey::from_str(k).map_err(|e| OtlpError::Config(format!("header {k:?}: {e}")))?;
        let value = AsciiMetadataValue::from_str(v).map_err(|e| OtlpError::Config(format!("header {k:?}: {e}")))?;
        metadata.push((key, value));
    }
    Ok(Transport::Grpc { endpoint: Box::new(endpoint), channel: OnceLock::new(), metadata })
}

/// The metrics URL for the shared OTLP endpoint: the base plus `/v1/metrics`,
/// as for `OTEL_EXPORTER_OTLP_ENDPOINT`; an endpoint that already names the
/// metrics path is used as is, one naming the profiles path is cut back to
/// its base.
pub fn http_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with(HTTP_PATH) {
        return base.to_owned();
    }
    let base = base.strip_suffix(PROFILES_PATH).unwrap_or(base);
    format!("{base}{HTTP_PATH}")
}

fn http_transport(config: &ClientConfig) -> Result<Transport, OtlpError> {
    let url = http_url(&config.endpoint);
    reqwest::Url::parse(&url).map_err(|e| OtlpError::Config(format!("endpoint {url:?}: {e}")))?;
    let mut headers = HeaderMap::new();
    for (k, v) in &config.headers {
        let key = HeaderName::from_str(k).map_err(|e| OtlpError::Config(format!("header {k:?}: {e}")))?;
        let value = HeaderValue::from_str(v).map_err(|e| OtlpError::Config(format!("header {k:?}: {e}")))?;
        headers.insert(key, value);
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
    headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    let client = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .build()
        .map_err(|e| OtlpError::Config(format!("HTTP client: {e}")))?;
    Ok(Transport::Http { client, url, headers })
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, OtlpError> {
    let mut gz = GzEncoder::new(Vec::with_capacity(bytes.len() / 4), Compression::default());
    gz.write_all(bytes).map_err(OtlpError::Encode)?;
    gz.finish().map_err(OtlpError::Encode)
}
