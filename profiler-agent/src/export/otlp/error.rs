//! Why an OTLP export failed, shared by the profiles and metrics clients.

use std::error::Error as StdError;
use std::time::Duration;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The configuration cannot work (bad URL or header); fix it, don't retry.
    #[error("invalid OTLP exporter configuration: {0}")]
    Config(String),

    /// The receiver could not be reached.
    #[error("cannot connect to OTLP receiver {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: BoxError,
    },

    /// No complete answer within the configured timeouts.
    #[error("OTLP receiver {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },

    /// The TLS handshake failed: the receiver's certificate is not trusted
    /// (wrong CA, expired, another name) or it refused our client
    /// certificate. `message` is rustls's reason.
    #[error("TLS handshake with OTLP receiver {endpoint} failed: {message} (check export.otlp.ca_file / OTEL_EXPORTER_OTLP_CERTIFICATE and the client certificate)")]
    Tls { endpoint: String, message: String },

    /// The gRPC receiver answered with an error status.
    #[error("OTLP receiver {endpoint} answered gRPC status {code:?}: {message}")]
    Status { endpoint: String, code: tonic::Code, message: String },

    /// The HTTP receiver answered with a non-2xx status.
    #[error("OTLP receiver {endpoint} answered HTTP {status}: {body}")]
    Http { endpoint: String, status: u16, body: String },

    /// The connection broke mid-request (reset, protocol error).
    #[error("OTLP request to {endpoint} failed")]
    Transport {
        endpoint: String,
        #[source]
        source: BoxError,
    },

    /// Compressing the request failed.
    #[error("failed to encode the OTLP request")]
    Encode(#[source] std::io::Error),
}

impl OtlpError {
    /// Whether sending the same request again later may succeed, following
    /// the OTLP spec's lists: unavailable, timeouts, throttling and server
    /// errors yes; malformed or refused requests no.
    pub fn retryable(&self) -> bool {
        use tonic::Code;
        match self {
            // A certificate rotated on the receiver's side fixes a failed
            // handshake without restarting the agent, so it is retried (from
            // the bounded buffer, every failure counted).
            Self::Connect { .. } | Self::Timeout { .. } | Self::Transport { .. } | Self::Tls { .. } => true,
            Self::Status { code, .. } => matches!(
                code,
                Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::OutOfRange
                    | Code::Unavailable
                    | Code::DataLoss
            ),
            Self::Http { status, .. } => *status == 429 || (500..600).contains(status),
            Self::Config(_) | Self::Encode(_) => false,
        }
    }
}
