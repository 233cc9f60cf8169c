//! What the OTLP profiles and metrics clients share: building the gRPC or
//! HTTP transport from a [`ClientConfig`], the overall time budget of one
//! call, gzip, and turning transport errors into [`OtlpError`]s. Only the
//! generated service client and the response type differ per signal.

use std::error::Error as StdError;
use std::future::Future;
use std::io::Write as _;
use std::str::FromStr as _;
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use flate2::Compression;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::client::{ClientConfig, OtlpError, Protocol};

/// A prepared connection to one receiver for one signal.
pub(crate) enum Transport {
    Grpc {
        /// Boxed: it is most of the client's size, and there is one per client.
        endpoint: Box<Endpoint>,
        /// Created on first use: tonic channels need a Tokio runtime, and
        /// this way building a client does not.
        channel: OnceLock<Channel>,
        metadata: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: HeaderMap,
    },
}

impl Transport {
    /// Validates `config` and prepares the transport; nothing connects yet.
    /// `http_url` is where OTLP/HTTP requests of this signal go; `headers`
    /// are sent with every request (gRPC metadata or HTTP headers).
    pub(crate) fn new<'a>(
        config: &ClientConfig,
        http_url: String,
        headers: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, OtlpError> {
        // `host:4317` would parse as a URL with scheme `host`; say what is
        // wrong instead of failing on every export.
        if !(config.endpoint.starts_with("http://") || config.endpoint.starts_with("https://")) {
            return Err(OtlpError::Config(format!(
                "endpoint {:?} must start with http:// or https://",
                config.endpoint
            )));
        }
        match config.protocol {
            Protocol::Grpc => grpc(config, headers),
            Protocol::HttpProtobuf => http(config, http_url, headers),
        }
    }
}

fn grpc<'a>(config: &ClientConfig, headers: impl Iterator<Item = (&'a str, &'a str)>) -> Result<Transport, OtlpError> {
    if config.endpoint.starts_with("https://") {
        // tonic is built without a TLS feature; failing here beats an opaque
        // handshake error on every export.
        return Err(OtlpError::Config(format!(
            "{}: gRPC over TLS is not built in; use http:// or the HTTP protocol",
            config.endpoint
        )));
    }
    let endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| OtlpError::Config(format!("endpoint {:?}: {e}", config.endpoint)))?
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout);
    let mut metadata = Vec::with_capacity(config.headers.len() + 1);
    for (k, v) in headers {
        let key = AsciiMetadataKey::from_str(k).map_err(|e| OtlpError::Config(format!("header {k:?}: {e}")))?;
        let value = AsciiMetadataValue::from_str(v).map_err(|e| OtlpError::Config(format!("header {k:?}: {e}")))?;
        metadata.push((key, value));
    }
    Ok(Transport::Grpc { endpoint: Box::new(endpoint), channel: OnceLock::new(), metadata })
}

fn http<'a>(
    config: &ClientConfig,
    url: String,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<Transport, OtlpError> {
    reqwest::Url::parse(&url).map_err(|e| OtlpError::Config(format!("endpoint {url:?}: {e}")))?;
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let key = HeaderName::from_str(k).map_err(|e| OtlpError::Config(format!("header {k:?}: {e}")))?;
        let value = HeaderValue::from_str(v).map_err(|e| OtlpError::Config(format!("header {k:?}: {e}")))?;
        map.insert(key, value);
    }
    // Inserted last so a configured header cannot mislabel the body.
    map.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
    map.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    let client = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .build()
        .map_err(|e| OtlpError::Config(format!("HTTP client: {e}")))?;
    Ok(Transport::Http { client, url, headers: map })
}

/// Runs one export within `connect_timeout + request_timeout`: belt and
/// braces over the transports' own timeouts, so whatever phase hangs
/// (handshake, a half-sent body), the call ends.
pub(crate) async fn within_budget<T>(
    config: &ClientConfig,
    call: impl Future<Output = Result<T, OtlpError>>,
) -> Result<T, OtlpError> {
    let budget = config.connect_timeout.saturating_add(config.request_timeout);
    tokio::time::timeout(budget, call).await.unwrap_or_else(|_| Err(timeout(config)))
}

/// Turns a client-side `Status` back into what happened: tonic reports its
/// own timeout as `Cancelled` and a failed connect as `Unavailable`, keeping
/// the cause in the source chain.
pub(crate) fn classify_status(config: &ClientConfig, status: tonic::Status) -> OtlpError {
    let mut cause: Option<&(dyn StdError + 'static)> = StdError::source(&status);
    let (mut timed_out, mut connect) = (status.code() == tonic::Code::DeadlineExceeded, false);
    while let Some(err) = cause {
        timed_out |= err.is::<tonic::TimeoutExpired>();
        connect |= err.is::<tonic::ConnectError>();
        cause = err.source();
    }
    if timed_out {
        timeout(config)
    } else if connect {
        OtlpError::Connect { endpoint: config.endpoint.clone(), source: Box::new(status) }
    } else {
        OtlpError::Status {
            endpoint: config.endpoint.clone(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

pub(crate) fn classify_reqwest(config: &ClientConfig, e: reqwest::Error) -> OtlpError {
    let endpoint = config.endpoint.clone();
    if e.is_timeout() {
        timeout(config)
    } else if e.is_connect() {
        OtlpError::Connect { endpoint, source: Box::new(e) }
    } else {
        OtlpError::Transport { endpoint, source: Box::new(e) }
    }
}

pub(crate) fn timeout(config: &ClientConfig) -> OtlpError {
    OtlpError::Timeout { endpoint: config.endpoint.clone(), timeout: config.request_timeout }
}

pub(crate) fn gzip(bytes: &[u8]) -> Result<Vec<u8>, OtlpError> {
    // OTLP payloads compress well; a quarter of the raw size avoids most regrowth.
    let mut gz = GzEncoder::new(Vec::with_capacity(bytes.len() / 4), Compression::default());
    gz.write_all(bytes).map_err(OtlpError::Encode)?;
    gz.finish().map_err(OtlpError::Encode)
}
