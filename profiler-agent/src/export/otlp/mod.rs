//! OTLP profiles export: the model as OpenTelemetry `profiles/v1development`
//! (proto 1.9-1.11 wire format), sent over gRPC or OTLP/HTTP.
//!
//! - [`profiles`]: [`encode`] turns the on-CPU / off-CPU [`crate::profile::Profile`]s
//!   of one window into one `ExportProfilesServiceRequest`.
//! - [`client`]: [`OtlpProfilesClient`] sends it to a Collector, Pyroscope or
//!   any other OTLP profiles receiver.
//!
//! Split this way so the encoding is testable without a network and the
//! client without profiles.

pub mod client;
mod dictionary;
pub mod profiles;
pub(crate) mod transport;

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod tests;

pub use client::{ClientConfig, ExportOutcome, OtlpError, OtlpProfilesClient, Protocol};
pub use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
pub use profiles::{encode, Resource};
