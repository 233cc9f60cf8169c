//! A tiny OTLP/HTTP receiver on loopback: answers `POST /v1development/profiles`
//! with `200 OK` and an empty body, and records how big each request body
//! was as sent and after gunzip.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use flate2::read::GzDecoder;

const PATH: &str = "/v1development/profiles";
const METRICS_PATH: &str = "/v1/metrics";
/// Largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// One request the receiver accepted.
#[derive(Clone, Debug)]
pub struct Request {
    pub at: Instant,
    /// Body bytes as sent (gzip if `gzip`).
    pub sent: usize,
    pub gzip: bool,
    /// Body bytes after gunzip: the encoded ExportProfilesServiceRequest.
    pub raw: usize,
    /// `resource_profiles` in the request: one per process.
    pub resources: usize,
    /// Bytes of its `dictionary` (shared by all processes of the request).
    pub dictionary: usize,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Request>>,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// The receiver; stops accepting on drop.
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn start() -> Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot listen on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let accept = {
            let state = state.clone();
            thread::Builder::new().name("otlp-receiver".into()).spawn(move || {
                for conn in listener.incoming() {
                    if state.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    // Connections end when the agent closes them or goes quiet.
                    let _ = thread::Builder::new().name("otlp-conn".into()).spawn(move || {
                        if let Err(e) = serve(conn, &state) {
                            state.errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                        }
                    });
                }
            })?
        };
        Ok(Receiver { addr, state, accept: Some(accept) })
    }

    /// The `--otlp-endpoint` to give the agent.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests so far, in the order they arrived.
    pub fn requests(&self) -> Vec<Request> {
        let mut r = self.state.requests.lock().unwrap_or_else(|p| p.into_inner()).clone();
        r.sort_by_key(|r| r.at);
        r
    }

    /// What went wrong with requests that were not recorded.
    pub fn errors(&self) -> Vec<String> {
        self.state.errors.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Serves the HTTP/1.1 requests of one connection until the peer closes it.
fn serve(mut conn: TcpStream, state: &State) -> Result<(), String> {
    conn.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(format!("request head larger than {MAX_HEAD} bytes"));
            }
            if read_some(&mut conn, &mut buf)? == 0 {
                return if buf.is_empty() { Ok(()) } else { Err("connection closed inside a request head".into()) };
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let request_line = head.lines().next().unwrap_or_default().to_owned();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) else {
            let _ = conn.write_all(b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return Err(format!(
                "{request_line}: no Content-Length (transfer-encoding {:?})",
                header("transfer-encoding")
            ));
        };
        while buf.len() < head_end + length {
            if read_some(&mut conn, &mut buf)? == 0 {
                return Err(format!("{request_line}: connection closed inside the body"));
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
        let at = Instant::now();
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        if method == "POST" && path == METRICS_PATH {
            // The daemon also sends OTLP metrics to the same endpoint; they
            // are not what this benchmark measures.
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        if method != "POST" || path != PATH {
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            state.errors.lock().unwrap_or_else(|p| p.into_inner()).push(format!("unexpected {request_line}"));
            continue;
        }
        let gzip = header("content-encoding").is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
        let raw = if gzip {
            let mut raw = Vec::new();
            if let Err(e) = GzDecoder::new(body.as_slice()).read_to_end(&mut raw) {
                let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
                return Err(format!("{request_line}: the gzip body does not decode: {e}"));
            }
            raw
        } else {
            body.clone()
        };
        let (resources, dictionary) = request_layout(&raw).unwrap_or((0, 0));
        state.requests.lock().unwrap_or_else(|p| p.into_inner()).push(Request {
            at,
            sent: body.len(),
            gzip,
            raw: raw.len(),
            resources,
            dictionary,
        });
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").map_err(|e| e.to_string())?;
    }
}

fn read_some(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let _ = conn.shutdown(Shutdown::Both);
                return if buf.is_empty() { Ok(0) } else { Err("the agent went quiet inside a request".into()) };
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Top level of an encoded ExportProfilesServiceRequest: the number of
/// `resource_profiles` (field 1) and the length of `dictionary` (field 2).
/// `None` if it is not well-formed protobuf.
fn request_layout(mut b: &[u8]) -> Option<(usize, usize)> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let (mut resources, mut dictionary) = (0, 0);
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut b)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut b)?).ok()?,
            5 => 4,
            _ => return None,
        };
        match (key >> 3, key & 7) {
            (1, 2) => resources += 1,
            (2, 2) => dictionary += skip,
            _ => {}
        }
        b = b.get(skip..)?;
    }
    Some((resources, dictionary))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use flate2::{write::GzEncoder, Compression};

    use super::*;

    /// resource_profiles x2 (3 and 1 bytes), dictionary (2 bytes), an unknown varint field.
    const REQUEST: &[u8] = &[0x0a, 3, 1, 2, 3, 0x0a, 1, 9, 0x12, 2, 7, 7, 0x18, 0x96, 0x01];

    #[test]
    fn reads_the_request_layout() {
        assert_eq!(request_layout(REQUEST), Some((2, 2)));
        assert_eq!(request_layout(&[]), Some((0, 0)));
        assert_eq!(request_layout(&[0x0a, 5, 1]), None);
    }

    #[test]
    fn records_gzip_requests_on_a_kept_alive_connection() {
        let receiver = Receiver::start().unwrap();
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(REQUEST).unwrap();
        let body = gz.finish().unwrap();
        let mut conn = TcpStream::connect(receiver.addr).unwrap();
        for _ in 0..2 {
            let head = format!(
                "POST {PATH} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\n\
                 content-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(&body).unwrap();
            let mut reply = [0u8; 38];
            conn.read_exact(&mut reply).unwrap();
            assert_eq!(&reply[..], b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
        drop(conn);
        let requests = receiver.requests();
        assert_eq!(requests.len(), 2);
        let r = &requests[0];
        assert_eq!((r.sent, r.gzip, r.raw, r.resources, r.dictionary), (body.len(), true, REQUEST.len(), 2, 2));
        assert!(receiver.errors().is_empty(), "{:?}", receiver.errors());
    }
}
