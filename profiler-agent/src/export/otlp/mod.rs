//! OTLP profiles export: the model as OpenTelemetry `profiles/v1development`
//! (proto 1.9-1.11 wire format), sent over gRPC or OTLP/HTTP.
//!
//! - [`profiles`]: [`encode`] turns the on-CPU / off-CPU [`crate::profile::Profile`]s
//!   of one window into one `ExportProfilesServiceRequest`.
//! - [`client`]: [`OtlpProfilesClient`] sends it to a Collector, Pyroscope or
//!   any other OTLP profiles receiver, through [`transport`] (gRPC or HTTP,
//!   TLS), which it shares with the metrics client.
//! - [`config`] and [`error`]: what both clients and the transport read and
//!   return; they import nothing else of this module, so the dependencies
//!   run one way: client -> transport -> config/error.
//!
//! Split this way so the encoding is testable without a network and the
//! client without profiles.

pub mod client;
pub mod config;
mod dictionary;
pub mod error;
pub mod profiles;
pub mod split;
pub(crate) mod transport;

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod tls_tests;

pub use client::{ExportOutcome, OtlpProfilesClient};
pub use config::{ClientConfig, Protocol, TlsConfig};
pub use error::OtlpError;
pub use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
pub use profiles::{encode, Resource};
pub use split::{encode_split, MAX_REQUEST_BYTES};
