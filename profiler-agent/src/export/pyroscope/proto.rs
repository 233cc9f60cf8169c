//! The messages of Grafana Pyroscope's push API, written out by hand:
//! `api/push/v1/push.proto` (package `push.v1`) and the one message it uses
//! from `api/types/v1/types.proto` (package `types.v1`).
//!
//! Hand-written rather than generated so the build needs neither `protoc`
//! nor a build script, like [`crate::export::pprof::proto`]. Only field
//! numbers and types reach the wire, so those must match upstream exactly;
//! `tests/receivers/proto/` holds the upstream files the loopback receiver
//! decodes our bytes with, which is what checks that they do.
//!
//! `RawProfileSeries.annotations` (field 3) is left out: upstream documents
//! that the distributor drops annotations sent through the push API.

/// `push.v1.PushRequest`: the body of `POST /push.v1.PusherService/Push`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    /// One entry per label set; Pyroscope ingests each sample separately.
    #[prost(message, repeated, tag = "1")]
    pub series: Vec<RawProfileSeries>,
}

/// `push.v1.PushResponse`: empty; success is the HTTP status.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushResponse {}

/// `push.v1.RawProfileSeries`: profiles that share one label set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawProfileSeries {
    /// Identify the series. Pyroscope requires `service_name` and `__name__`
    /// and expects names sorted and unique.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<RawSample>,
}

/// `push.v1.RawSample`: one pprof profile.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawSample {
    /// pprof `Profile` bytes; gzip-compressed is accepted (and what we send).
    #[prost(bytes = "vec", tag = "1")]
    pub raw_profile: Vec<u8>,
    /// Upstream field `ID`: a unique id (UUID) of the profile, which
    /// Pyroscope only logs.
    #[prost(string, tag = "2")]
    pub id: String,
}

/// `types.v1.LabelPair`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

impl LabelPair {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self { name: name.into(), value: value.into() }
    }
}
