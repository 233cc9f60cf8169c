//! How to reach an OTLP receiver: the part of the configuration the profiles
//! and metrics clients and their shared transport all read. At the bottom of
//! the module so that `transport` and the clients depend on it, never on
//! each other's files.

use std::path::PathBuf;
use std::time::Duration;

/// Which OTLP transport to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC, by convention on port 4317.
    Grpc,
    /// OTLP/HTTP with binary protobuf bodies, by convention on port 4318.
    HttpProtobuf,
}

/// How to reach the receiver.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:4317` (gRPC) or `http://host:4318` (HTTP; the signal path
    /// is appended unless already there); `https://` for TLS.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Extra request headers (gRPC metadata), e.g. authentication.
    pub headers: Vec<(String, String)>,
    /// Budget for establishing the TCP connection.
    pub connect_timeout: Duration,
    /// Budget for one request once connected, answer included.
    pub request_timeout: Duration,
    pub tls: TlsConfig,
}

/// TLS towards the receiver (rustls). An `https://` endpoint is verified
/// against the system's CA certificates, or against `ca_file` alone when it
/// is set; `http://` is plaintext.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// Plaintext even for an `https://` endpoint (OTEL_EXPORTER_OTLP_INSECURE).
    pub insecure: bool,
    /// PEM CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and its private key, for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl ClientConfig {
    /// Whether requests go over TLS: `https://` and not `insecure`.
    pub fn uses_tls(&self) -> bool {
        self.endpoint.starts_with("https://") && !self.tls.insecure
    }
}
