//! Sending an `ExportProfilesServiceRequest` to an OTLP receiver.
//!
//! `opentelemetry-otlp` has no profiles exporter, so this is a thin client
//! over the generated types: gRPC `ProfilesService/Export` through tonic, or
//! OTLP/HTTP `POST /v1development/profiles` through reqwest; both gzip the
//! request. The client never retries: [`OtlpError::retryable`] tells the
//! caller whether a retry can help, since only the caller knows how long a
//! profile is still worth sending.

use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_client::ProfilesServiceClient;
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesPartialSuccess, ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use prost::Message as _;
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use tonic::codec::CompressionEncoding;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::Channel;

use super::config::ClientConfig;
use super::error::OtlpError;
use super::transport::{self, Transport};

/// Proposed (opentelemetry-proto PR #857) marker of the development wire
/// format; receivers read a missing header as version 1, which is what
/// proto 1.9-1.11 are, so sending it changes nothing today and keeps us
/// unambiguous once a version 2 exists.
const VERSION_HEADER: &str = "otlp-profiles-development-version";
const WIRE_VERSION: &str = "1";
/// The OTLP/HTTP path of the profiles signal.
const HTTP_PATH: &str = "/v1development/profiles";

/// What the receiver said about an accepted request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOutcome {
    /// Profiles the receiver dropped (partial success); 0 if all were taken.
    pub rejected_profiles: i64,
    /// The receiver's explanation or warning, if it gave one.
    pub message: Option<String>,
}

impl ExportOutcome {
    fn from_partial(p: Option<ExportProfilesPartialSuccess>) -> Self {
        let p = p.unwrap_or_default();
        Self { rejected_profiles: p.rejected_profiles, message: Some(p.error_message).filter(|m| !m.is_empty()) }
    }
}

/// A client for one OTLP profiles receiver.
pub struct OtlpProfilesClient {
    config: ClientConfig,
    transport: Transport,
}

impl OtlpProfilesClient {
    /// Validates `config` and prepares the transport. Nothing is connected
    /// yet: the receiver may come up later, connections are made on export.
    ///
    /// # Errors
    ///
    /// [`OtlpError::Config`] for an unusable endpoint or header.
    pub fn new(config: ClientConfig) -> Result<Self, OtlpError> {
        let base = config.endpoint.trim_end_matches('/');
        let url = if base.ends_with(HTTP_PATH) { base.to_owned() } else { format!("{base}{HTTP_PATH}") };
        let transport = Transport::new(&config, url, header_pairs(&config))?;
        Ok(Self { config, transport })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Sends `req` once. Bounded by `connect_timeout + request_timeout`.
    ///
    /// # Errors
    ///
    /// See [`OtlpError`]; [`OtlpError::retryable`] says whether to try again.
    pub async fn export(&self, req: ExportProfilesServiceRequest) -> Result<ExportOutcome, OtlpError> {
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
        req: ExportProfilesServiceRequest,
    ) -> Result<ExportOutcome, OtlpError> {
        let mut client = ProfilesServiceClient::new(channel)
            .send_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Gzip);
        let mut request = tonic::Request::new(req);
        // Tells the receiver our deadline (grpc-timeout), so it stops working
        // on a request we no longer wait for.
        request.set_timeout(self.config.request_timeout);
        for (k, v) in metadata {
            request.metadata_mut().insert(k.clone(), v.clone());
        }
        match client.export(request).await {
            Ok(resp) => Ok(ExportOutcome::from_partial(resp.into_inner().partial_success)),
            Err(status) => Err(transport::classify_status(&self.config, status)),
        }
    }

    async fn export_http(
        &self,
        client: &reqwest::Client,
        url: &str,
        headers: &HeaderMap,
        req: ExportProfilesServiceRequest,
    ) -> Result<ExportOutcome, OtlpError> {
        let body = transport::gzip(&req.encode_to_vec())?;
        let sent = client.post(url).headers(headers.clone()).body(body).send().await;
        let resp = sent.map_err(|e| transport::classify_reqwest(&self.config, e))?;
        let status = resp.status();
        let protobuf = resp.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().ends_with(b"protobuf"));
        let bytes = resp.bytes().await.map_err(|e| transport::classify_reqwest(&self.config, e))?;
        if status.is_success() {
            // A receiver that accepted the data but sent an unexpected body
            // (empty, JSON) still accepted it; only the details are lost.
            let partial = ExportProfilesServiceResponse::decode(bytes.as_ref())
                .inspect_err(|e| log::debug!("undecodable OTLP/HTTP success body from {url}: {e}"))
                .ok()
                .and_then(|r| r.partial_success);
            return Ok(ExportOutcome::from_partial(partial));
        }
        Err(OtlpError::Http { endpoint: url.to_owned(), status: status.as_u16(), body: error_body(&bytes, protobuf) })
    }
}

/// Configured headers, then the version marker unless configured already.
fn header_pairs(config: &ClientConfig) -> impl Iterator<Item = (&str, &str)> {
    let configured = config.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let has_version = config.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(VERSION_HEADER));
    configured.chain((!has_version).then_some((VERSION_HEADER, WIRE_VERSION)))
}

/// `google.rpc.Status`, the body OTLP/HTTP receivers send with an error.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// The receiver's error message: the `Status` message of a protobuf body,
/// else the body as text, cut short so a log line stays a line.
fn error_body(bytes: &[u8], protobuf: bool) -> String {
    const MAX: usize = 512;
    if protobuf {
        if let Some(status) = RpcStatus::decode(bytes).ok().filter(|s| !s.message.is_empty()) {
            return status.message;
        }
    }
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}
