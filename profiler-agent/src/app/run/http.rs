//! The agent's own HTTP endpoint: `/healthz` (the process is alive),
//! `/readyz` (programs attached and exports succeeding), and `/metrics`
//! (Prometheus text). Deliberately minimal: GET only, one request per
//! connection, bounded reads with a timeout, so a misbehaving scraper can
//! neither hold memory nor a task forever.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::telemetry::Telemetry;

/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the listener (so a taken port is reported at start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, telemetry: Arc<Telemetry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, handle(stream, &telemetry)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, telemetry: &Telemetry) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_ascii_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = respond(method, path, telemetry);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// (status line, content type, body) for a request.
pub fn respond(method: &str, path: &str, telemetry: &Telemetry) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "only GET is supported\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" if telemetry.ready() => ("200 OK", TEXT, "ready\n".into()),
        "/readyz" => ("503 Service Unavailable", TEXT, "not ready: programs not attached or exports failing\n".into()),
        "/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", telemetry.render()),
        _ => ("404 Not Found", TEXT, "endpoints: /healthz /readyz /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn routes() {
        let t = Telemetry::default();
        assert_eq!(respond("GET", "/healthz", &t).0, "200 OK");
        assert_eq!(respond("GET", "/readyz", &t).0, "503 Service Unavailable");
        t.attached.store(true, Ordering::Relaxed);
        assert_eq!(respond("GET", "/readyz", &t).0, "200 OK");
        assert!(respond("GET", "/metrics?x=1", &t).2.contains("profiler_ready 1"));
        assert_eq!(respond("POST", "/metrics", &t).0, "405 Method Not Allowed");
        assert_eq!(respond("GET", "/", &t).0, "404 Not Found");
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Telemetry::default())));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK") && out.ends_with("ok\n"), "{out}");
        server.abort();
    }
}
