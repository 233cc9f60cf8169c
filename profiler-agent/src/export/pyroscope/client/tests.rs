//! The client against canned HTTP servers on loopback: what it sends, and
//! how each kind of failure is classified.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::export::pyroscope::{LabelPair, RawProfileSeries, RawSample};

/// What the canned server received.
struct Received {
    request_line: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn read_request(stream: &TcpStream) -> Received {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("request line");
    let request_line = line.trim_end().to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header");
        let Some((n, v)) = line.trim_end().split_once(':') else { break };
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len = headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().expect("length"));
    let mut body = vec![0; len];
    reader.read_exact(&mut body).expect("body");
    Received { request_line, headers, body }
}

/// Serves one request with `status`, `content_type` and `body`; the
/// receiver yields what was sent.
fn serve_once(
    status: &'static str,
    content_type: &'static str,
    body: &'static str,
) -> (String, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let received = read_request(&stream);
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes())).expect("respond");
        let _ = tx.send(received);
    });
    (base, rx)
}

fn config(base: &str) -> PyroscopeConfig {
    PyroscopeConfig {
        base_url: base.to_owned(),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn request() -> PushRequest {
    PushRequest {
        series: vec![RawProfileSeries {
            labels: vec![LabelPair::new("__name__", "process_cpu"), LabelPair::new("service_name", "app")],
            samples: vec![RawSample { raw_profile: vec![0x1f, 0x8b, 1, 2, 3], id: "id-1".into() }],
        }],
    }
}

async fn push_to(base: &str) -> Result<(), PyroscopeError> {
    PyroscopeClient::new(&config(base)).expect("client").push(&request()).await
}

#[tokio::test]
async fn sends_a_connect_unary_request() {
    let (base, rx) = serve_once("200 OK", "application/proto", "");
    let cfg = PyroscopeConfig {
        base_url: format!("{base}/prefix/"),
        tenant_id: Some("team-a".into()),
        basic_auth: Some(("user".into(), "secret".into())),
        headers: vec![("X-Extra".into(), "1".into())],
        ..config(&base)
    };
    let client = PyroscopeClient::new(&cfg).expect("client");
    assert_eq!(client.push_url(), format!("{base}/prefix/push.v1.PusherService/Push"));
    client.push(&request()).await.expect("push");

    let got = rx.recv_timeout(Duration::from_secs(5)).expect("request");
    assert_eq!(got.request_line, "POST /prefix/push.v1.PusherService/Push HTTP/1.1");
    assert_eq!(got.header("content-type"), Some("application/proto"));
    assert_eq!(got.header("connect-protocol-version"), Some("1"));
    assert_eq!(got.header("x-scope-orgid"), Some("team-a"));
    assert_eq!(got.header("x-extra"), Some("1"));
    // base64("user:secret")
    assert_eq!(got.header("authorization"), Some("Basic dXNlcjpzZWNyZXQ="));
    assert_eq!(got.header("content-encoding"), None, "the pprof inside is gzipped already");
    assert_eq!(PushRequest::decode(got.body.as_slice()).expect("protobuf body"), request());
}

#[tokio::test]
async fn connect_error_is_surfaced_and_not_retried() {
    let body = r#"{"code":"invalid_argument","message":"invalid labels '{}' with error: service name is not provided","details":[{"type":"x","value":"eyJ9"}]}"#;
    let (base, _rx) = serve_once("400 Bad Request", "application/json", body);
    let err = push_to(&base).await.expect_err("400");
    let PyroscopeError::Status { status, code, message, .. } = &err else { panic!("{err:?}") };
    assert_eq!((*status, code.as_str()), (400, "invalid_argument"));
    assert!(message.contains("service name is not provided"), "{message}");
    assert!(!err.retryable());
    assert!(err.to_string().contains("invalid_argument"), "{err}");
}

#[tokio::test]
async fn overload_and_server_errors_are_retryable() {
    for (status, code) in [("429 Too Many Requests", "unavailable"), ("503 Service Unavailable", "unavailable")] {
        // A proxy's plain-text page, not a Connect error: the code comes
        // from the status.
        let (base, _rx) = serve_once(status, "text/plain", "upstream busy");
        let err = push_to(&base).await.expect_err(status);
        let PyroscopeError::Status { code: got, message, .. } = &err else { panic!("{err:?}") };
        assert_eq!((got.as_str(), message.as_str()), (code, "upstream busy"));
        assert!(err.retryable(), "{status}");
    }
    let (base, _rx) = serve_once("500 Internal Server Error", "application/json", r#"{"code":"internal"}"#);
    let err = push_to(&base).await.expect_err("500");
    assert!(matches!(&err, PyroscopeError::Status { code, .. } if code == "internal"), "{err:?}");
    assert!(err.retryable());
}

#[tokio::test]
async fn times_out_on_a_server_that_never_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    // Accept and hold the connection open without a word.
    let held = thread::spawn(move || listener.accept().map(|(s, _)| s));
    let cfg = PyroscopeConfig { request_timeout: Duration::from_millis(300), ..config(&base) };
    let started = Instant::now();
    let err = PyroscopeClient::new(&cfg).expect("client").push(&request()).await.expect_err("timeout");
    assert!(matches!(err, PyroscopeError::Timeout { .. }), "{err:?}");
    assert!(err.retryable());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    drop(held.join());
}

#[tokio::test]
async fn refused_connection_is_retryable() {
    // Bind then drop, so nothing listens on the port.
    let base = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let err = push_to(&base).await.expect_err("refused");
    assert!(matches!(err, PyroscopeError::Connect { .. }), "{err:?}");
    assert!(err.retryable());
}

#[test]
fn rejects_bad_configuration() {
    for url in ["ftp://host", "not a url", "http://host/?q=1"] {
        let err = PyroscopeClient::new(&config(url)).expect_err(url);
        assert!(matches!(err, PyroscopeError::InvalidUrl { .. }) && !err.retryable(), "{url}: {err:?}");
    }
    let cfg = PyroscopeConfig { headers: vec![("bad header".into(), "v".into())], ..config("http://h") };
    assert!(matches!(PyroscopeClient::new(&cfg), Err(PyroscopeError::InvalidHeader { .. })));
    let cfg = PyroscopeConfig { tenant_id: Some("line\nbreak".into()), ..config("http://h") };
    assert!(matches!(PyroscopeClient::new(&cfg), Err(PyroscopeError::InvalidHeader { .. })));
}

#[test]
fn parses_connect_error_bodies() {
    let parse = |s: &str| parse_connect_error(s.as_bytes());
    assert_eq!(
        parse(r#" { "message" : "a\"b\u00e9\ud83d\ude00\n", "code":"not_found" } "#).unwrap(),
        ("not_found".into(), "a\"bé😀\n".into())
    );
    assert_eq!(
        parse(r#"{"details":[{"a":[1,{"b":"}"}]}],"n":-1.5e3,"t":true,"code":"x"}"#).unwrap(),
        ("x".into(), String::new())
    );
    for bad in [
        "",
        "{}",
        "[]",
        r#"{"message":"no code"}"#,
        r#"{"code":1}"#,
        "<html>",
        r#"{"code":"x""#,
        r#"{"a":,"code":"x"}"#,
    ] {
        assert_eq!(parse(bad), None, "{bad}");
    }
    assert_eq!(parse_connect_error(&[0xff, 0xfe]), None);
}

#[test]
fn status_codes_map_like_connect_clients() {
    let got: Vec<&str> = [400, 401, 403, 404, 429, 502, 503, 504, 500, 418].map(code_for_status).to_vec();
    let want = ["internal", "unauthenticated", "permission_denied", "unimplemented", "unavailable", "unavailable"];
    assert_eq!(&got[..6], want);
    assert_eq!(&got[6..], ["unavailable", "unavailable", "unknown", "unknown"]);
}
