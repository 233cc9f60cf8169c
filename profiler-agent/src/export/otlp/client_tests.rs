//! Client tests against in-process receivers on 127.0.0.1: a tonic
//! `ProfilesService`, a minimal HTTP/1.1 responder, and a listener that
//! accepts and never answers (the hung-receiver case the timeouts exist for).

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flate2::read::GzDecoder;
use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_server::{
    ProfilesService, ProfilesServiceServer,
};
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesPartialSuccess, ExportProfilesServiceResponse,
};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;

use super::*;
use crate::export::testutil::on_cpu_profile;

const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
/// Generous, so a loaded CI machine does not turn a pass into a flake.
const SLACK: Duration = Duration::from_millis(1500);

fn config(protocol: Protocol, addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        endpoint: format!("http://{addr}"),
        protocol,
        headers: vec![("x-tenant".into(), "team-a".into())],
        connect_timeout: Duration::from_secs(1),
        request_timeout: REQUEST_TIMEOUT,
        tls: Default::default(),
    }
}

fn request() -> ExportProfilesServiceRequest {
    let (p, _) = on_cpu_profile();
    encode(&[&p], &Resource::default())
}

/// Accepts connections and holds them open without ever reading or writing.
async fn silent_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    addr
}

async fn assert_times_out(protocol: Protocol) {
    let client = OtlpProfilesClient::new(config(protocol, silent_listener().await)).expect("client");
    let started = Instant::now();
    let err = client.export(request()).await.expect_err("nobody answers");
    let took = started.elapsed();
    assert!(matches!(err, OtlpError::Timeout { .. }), "{protocol:?}: {err:?}");
    assert!(err.retryable());
    assert!(took >= REQUEST_TIMEOUT && took < REQUEST_TIMEOUT + SLACK, "{protocol:?} took {took:?}");
}

#[tokio::test]
async fn grpc_silent_receiver_times_out() {
    assert_times_out(Protocol::Grpc).await;
}

#[tokio::test]
async fn http_silent_receiver_times_out() {
    assert_times_out(Protocol::HttpProtobuf).await;
}

#[tokio::test]
async fn refused_connection_is_a_retryable_connect_error() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let client = OtlpProfilesClient::new(config(protocol, addr)).expect("client");
        let err = client.export(request()).await.expect_err("port is closed");
        assert!(matches!(err, OtlpError::Connect { .. }), "{protocol:?}: {err:?}");
        assert!(err.retryable());
    }
}

/// What the gRPC test receiver saw, and what it answers.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(tonic::metadata::MetadataMap, ExportProfilesServiceRequest)>>,
    fail_with: Option<tonic::Code>,
}

#[tonic::async_trait]
impl ProfilesService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportProfilesServiceRequest>,
    ) -> Result<tonic::Response<ExportProfilesServiceResponse>, tonic::Status> {
        if let Some(code) = self.fail_with {
            return Err(tonic::Status::new(code, "refused by test"));
        }
        let metadata = request.metadata().clone();
        self.seen.lock().expect("lock").push((metadata, request.into_inner()));
        let partial = ExportProfilesPartialSuccess { rejected_profiles: 1, error_message: "one too old".into() };
        Ok(tonic::Response::new(ExportProfilesServiceResponse { partial_success: Some(partial) }))
    }
}

async fn grpc_receiver(recorder: Arc<Recorder>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = ProfilesServiceServer::from_arc(recorder).accept_compressed(CompressionEncoding::Gzip);
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(service, TcpIncoming::from(listener)));
    addr
}

#[tokio::test]
async fn grpc_export_sends_gzip_headers_and_reports_partial_success() {
    let recorder = Arc::new(Recorder::default());
    let client =
        OtlpProfilesClient::new(config(Protocol::Grpc, grpc_receiver(recorder.clone()).await)).expect("client");
    let outcome = client.export(request()).await.expect("export");
    assert_eq!(outcome, ExportOutcome { rejected_profiles: 1, message: Some("one too old".into()) });

    let seen = recorder.seen.lock().expect("lock");
    let (metadata, received) = &seen[0];
    assert_eq!(received, &request());
    let header = |k: &str| metadata.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(header("grpc-encoding").as_deref(), Some("gzip"));
    assert_eq!(header("x-tenant").as_deref(), Some("team-a"));
    assert_eq!(header("otlp-profiles-development-version").as_deref(), Some("1"));
    assert!(header("grpc-timeout").is_some(), "the deadline is announced");
}

#[tokio::test]
async fn grpc_error_status_is_classified() {
    for (code, retryable) in [(tonic::Code::InvalidArgument, false), (tonic::Code::Unavailable, true)] {
        let recorder = Arc::new(Recorder { fail_with: Some(code), ..Default::default() });
        let client = OtlpProfilesClient::new(config(Protocol::Grpc, grpc_receiver(recorder).await)).expect("client");
        match client.export(request()).await {
            Err(e @ OtlpError::Status { code: got, .. }) => {
                assert_eq!(got, code);
                assert_eq!(e.retryable(), retryable, "{code:?}");
            }
            other => panic!("{code:?}: {other:?}"),
        }
    }
}

/// One HTTP/1.1 exchange: returns the request head and (gunzipped) body.
async fn http_exchange(listener: TcpListener, status: &str, content_type: &str, body: Vec<u8>) -> (String, Vec<u8>) {
    let (mut conn, _) = listener.accept().await.expect("accept");
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.expect("read");
        assert!(n > 0, "client closed early");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("ascii head").to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("length"))
        .expect("content-length");
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.expect("read body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut raw = Vec::new();
    GzDecoder::new(&buf[head_end..]).read_to_end(&mut raw).expect("gzip body");
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(reply.as_bytes()).await.expect("write");
    conn.write_all(&body).await.expect("write body");
    (head, raw)
}

async fn http_case(
    status: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (String, Vec<u8>, Result<ExportOutcome, OtlpError>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client =
        OtlpProfilesClient::new(config(Protocol::HttpProtobuf, listener.local_addr().expect("addr"))).expect("client");
    let server = tokio::spawn({
        let (status, content_type) = (status.to_owned(), content_type.to_owned());
        async move { http_exchange(listener, &status, &content_type, body).await }
    });
    let result = client.export(request()).await;
    let (head, raw) = server.await.expect("server task");
    (head, raw, result)
}

#[tokio::test]
async fn http_export_posts_gzip_protobuf_and_reports_partial_success() {
    let partial = ExportProfilesPartialSuccess { rejected_profiles: 2, error_message: "late".into() };
    let answer = ExportProfilesServiceResponse { partial_success: Some(partial) }.encode_to_vec();
    let (head, raw, result) = http_case("200 OK", "application/x-protobuf", answer).await;
    assert!(head.starts_with("post /v1development/profiles http/1.1\r\n"), "{head}");
    for line in ["content-type: application/x-protobuf", "content-encoding: gzip", "x-tenant: team-a"] {
        assert!(head.contains(line), "{line} missing in {head}");
    }
    assert!(head.contains("otlp-profiles-development-version: 1"), "{head}");
    assert_eq!(ExportProfilesServiceRequest::decode(raw.as_slice()).expect("decode"), request());
    assert_eq!(result.expect("export"), ExportOutcome { rejected_profiles: 2, message: Some("late".into()) });
}

#[tokio::test]
async fn http_error_statuses_are_classified() {
    // google.rpc.Status { code: 3, message: "bad dictionary" }.
    let status = [&[0x08, 0x03, 0x12, 14][..], b"bad dictionary"].concat();
    let (_, _, result) = http_case("400 Bad Request", "application/x-protobuf", status).await;
    match result {
        Err(e @ OtlpError::Http { status: 400, .. }) => {
            assert!(!e.retryable());
            assert!(e.to_string().ends_with("HTTP 400: bad dictionary"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    for (status, retryable) in
        [("503 Service Unavailable", true), ("429 Too Many Requests", true), ("404 Not Found", false)]
    {
        let (_, _, result) = http_case(status, "text/plain", b"nope".to_vec()).await;
        let err = result.expect_err(status);
        assert!(matches!(err, OtlpError::Http { ref body, .. } if body == "nope"), "{err:?}");
        assert_eq!(err.retryable(), retryable, "{status}");
    }
}

#[test]
fn invalid_configuration_is_rejected_up_front() {
    let base = config(Protocol::Grpc, "127.0.0.1:4317".parse().expect("addr"));
    let missing_ca = ClientConfig {
        endpoint: "https://collector:4317".into(),
        tls: TlsConfig { ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() },
        ..base.clone()
    };
    let err = OtlpProfilesClient::new(missing_ca).err().expect("a missing CA file is an error");
    assert!(matches!(err, OtlpError::Config(ref m) if m.contains("/nonexistent/ca.pem")), "{err}");
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let bad_header = ClientConfig { protocol, headers: vec![("bad header".into(), "x".into())], ..base.clone() };
        assert!(matches!(OtlpProfilesClient::new(bad_header), Err(OtlpError::Config(_))), "{protocol:?}");
    }
    let no_scheme = ClientConfig { protocol: Protocol::HttpProtobuf, endpoint: "collector:4318".into(), ..base };
    assert!(OtlpProfilesClient::new(no_scheme).is_err());
}
