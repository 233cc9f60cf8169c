//! Sending an `ExportMetricsServiceRequest` to an OTLP receiver: gRPC
//! `MetricsService/Export` through tonic, or OTLP/HTTP `POST /v1/metrics`
//! through reqwest, both gzipped. Same configuration and error type as the
//! profiles client ([`crate::export::otlp::client`]); like it, this client
//! never retries and says through [`OtlpError::retryable`] whether the
//! caller should.

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message as _;
use reqwest::header::HeaderMap;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::Channel;

use crate::export::otlp::transport::{self, Transport};
use crate::export::otlp::{ClientConfig, OtlpError};

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

impl OtlpMetricsClient {
    /// Validates `config` and prepares the transport; nothing connects yet.
    ///
    /// # Errors
    ///
    /// [`OtlpError::Config`] for an unusable endpoint or header.
    pub fn new(config: ClientConfig) -> Result<Self, OtlpError> {
        let headers = config.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let transport = Transport::new(&config, http_url(&config.endpoint), headers)?;
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
        let call = async {
            match &self.transport {
                Transport::Grpc { endpoint, channel, metadata } => {
                    let channel = channel.get_or_init(|| endpoint.connect_lazy()).clone();
                    self.export_grpc(channel, metadata, req).await
                }
                Transport::Http { client, url, headers } => self.export_http(client, url, headers, req).await,
            }
        };
        transport::within_budget(&self.config, call).await
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
            Err(status) => Err(transport::classify_status(&self.config, status)),
        }
    }

    async fn export_http(
        &self,
        client: &reqwest::Client,
        url: &str,
        headers: &HeaderMap,
        req: ExportMetricsServiceRequest,
    ) -> Result<MetricsOutcome, OtlpError> {
        let body = transport::gzip(&req.encode_to_vec())?;
        let sent = client.post(url).headers(headers.clone()).body(body).send().await;
        let resp = sent.map_err(|e| transport::classify_reqwest(&self.config, e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport::classify_reqwest(&self.config, e))?;
        if status.is_success() {
            let partial = ExportMetricsServiceResponse::decode(bytes.as_ref()).ok().and_then(|r| r.partial_success);
            return Ok(MetricsOutcome::from_partial(partial));
        }
        let text = String::from_utf8_lossy(&bytes);
        let body: String = text.trim().chars().take(512).collect();
        Err(OtlpError::Http { endpoint: url.to_owned(), status: status.as_u16(), body })
    }
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
