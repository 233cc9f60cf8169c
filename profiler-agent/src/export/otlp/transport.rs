//! What the OTLP profiles and metrics clients share: building the gRPC or
//! HTTP transport from a [`ClientConfig`] (TLS through rustls included), the
//! overall time budget of one call, gzip, and turning transport errors into
//! [`OtlpError`]s. Only the generated service client and the response type
//! differ per signal.

use std::error::Error as StdError;
use std::future::Future;
use std::io::Write as _;
use std::str::FromStr as _;
use std::sync::OnceLock;

use flate2::write::GzEncoder;
use flate2::Compression;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::config::{ClientConfig, Protocol, TlsConfig};
use super::error::OtlpError;

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
    let tls = config.uses_tls().then(|| Pem::load(&config.tls)).transpose()?;
    // tonic refuses an https:// URI without TLS; `insecure` means plaintext.
    let uri = match config.endpoint.strip_prefix("https://") {
        Some(rest) if tls.is_none() => format!("http://{rest}"),
        _ => config.endpoint.clone(),
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| OtlpError::Config(format!("endpoint {:?}: {e}", config.endpoint)))?
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout);
    if let Some(pem) = tls {
        let mut tls = ClientTlsConfig::new();
        tls = match pem.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = pem.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint =
            endpoint.tls_config(tls).map_err(|e| OtlpError::Config(format!("TLS for {}: {e}", config.endpoint)))?;
    }
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
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .use_rustls_tls();
    let mut url = url;
    if config.uses_tls() {
        let pem = Pem::load(&config.tls)?;
        if let Some(ca) = pem.ca {
            let bad = |e: reqwest::Error| OtlpError::Config(format!("CA file: {e}"));
            builder = builder.tls_built_in_root_certs(false);
            for cert in reqwest::Certificate::from_pem_bundle(&ca).map_err(bad)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some((cert, key)) = pem.identity {
            let both = [cert, b"\n".to_vec(), key].concat();
            let identity = reqwest::Identity::from_pem(&both)
                .map_err(|e| OtlpError::Config(format!("client certificate: {e}")))?;
            builder = builder.identity(identity);
        }
    } else {
        // Plaintext: skip loading and parsing the system's CA bundle.
        builder = builder.tls_built_in_root_certs(false);
        if let Some(rest) = url.strip_prefix("https://") {
            url = format!("http://{rest}");
        }
    }
    let client = builder.build().map_err(|e| OtlpError::Config(format!("HTTP client: {e}")))?;
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
    if let Some(message) = tls_failure(&status) {
        OtlpError::Tls { endpoint: config.endpoint.clone(), message }
    } else if timed_out {
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
    if let Some(message) = tls_failure(&e) {
        OtlpError::Tls { endpoint, message }
    } else if e.is_timeout() {
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

/// rustls's reason when a TLS handshake is somewhere in `err`'s source chain.
/// tokio-rustls hands it over inside an `io::Error`, whose `source()` skips
/// the wrapped error, so io errors are looked into explicitly.
fn tls_failure(err: &(dyn StdError + 'static)) -> Option<String> {
    fn dig(e: &(dyn StdError + 'static)) -> Option<String> {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|inner| dig(inner))
    }
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(reason) = dig(e) {
            return Some(reason);
        }
        cause = e.source();
    }
    None
}

/// The PEM files of a [`TlsConfig`], read and checked when the client is
/// built, so a missing or malformed file stops the agent at start with its
/// name rather than failing every handshake later.
struct Pem {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Pem {
    fn load(tls: &TlsConfig) -> Result<Self, OtlpError> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};

        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| OtlpError::Config(format!("cannot read the {what} {}: {e}", path.display())))
        };
        let certs = |pem: &[u8], path: &std::path::Path, what: &str| {
            let n = CertificateDer::pem_slice_iter(pem).filter(Result::is_ok).count();
            if n == 0 {
                return Err(OtlpError::Config(format!("the {what} {} holds no PEM certificate", path.display())));
            }
            Ok(())
        };
        let ca = match &tls.ca_file {
            Some(path) => {
                let pem = read(path, "CA file")?;
                certs(&pem, path, "CA file")?;
                Some(pem)
            }
            None => None,
        };
        let identity = match (&tls.client_cert_file, &tls.client_key_file) {
            (None, None) => None,
            (Some(cert_path), Some(key_path)) => {
                let cert = read(cert_path, "client certificate")?;
                certs(&cert, cert_path, "client certificate")?;
                let key = read(key_path, "client key")?;
                PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                    OtlpError::Config(format!("the client key {} holds no PEM private key: {e}", key_path.display()))
                })?;
                Some((cert, key))
            }
            _ => {
                return Err(OtlpError::Config(
                    "a client certificate needs its key and a key its certificate (client_cert_file, client_key_file)"
                        .into(),
                ))
            }
        };
        Ok(Self { ca, identity })
    }
}
