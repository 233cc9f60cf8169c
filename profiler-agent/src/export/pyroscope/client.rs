//! Sends a [`PushRequest`] to Pyroscope: a Connect-protocol unary call
//! over plain HTTP/1.1, so no gRPC stack (or HTTP/2) is involved.
//!
//! The call is `POST {base}/push.v1.PusherService/Push` with the protobuf
//! message as the body (`Content-Type: application/proto`,
//! `Connect-Protocol-Version: 1`). The body is not compressed again: the
//! pprof profiles inside are gzipped already. On failure Connect answers
//! with a non-2xx status and a JSON body `{"code": ..., "message": ...}`,
//! which [`PyroscopeError::Status`] carries so the log says why.

#[cfg(test)]
mod tests;

use std::time::Duration;

use prost::Message as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};

use super::PushRequest;

/// Path of the push method under the base URL.
pub const PUSH_PATH: &str = "/push.v1.PusherService/Push";

/// Where and how to push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyroscopeConfig {
    /// e.g. `http://pyroscope:4040`, or a Grafana Cloud profiles URL; any
    /// path prefix (a reverse proxy's) is kept.
    pub base_url: String,
    /// Sent as `X-Scope-OrgID`, the tenant header of multi-tenant Pyroscope.
    pub tenant_id: Option<String>,
    /// HTTP basic auth (user, password), as Grafana Cloud expects.
    pub basic_auth: Option<(String, String)>,
    /// Any other headers, e.g. a bearer token behind a proxy.
    pub headers: Vec<(String, String)>,
    /// Limit for establishing the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Limit for the whole request, response included.
    pub request_timeout: Duration,
}

impl Default for PyroscopeConfig {
    fn default() -> Self {
        Self {
            base_url: "http://localhost:4040".to_owned(),
            tenant_id: None,
            basic_auth: None,
            headers: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a push failed. [`PyroscopeError::retryable`] tells whether sending
/// the same request again later may succeed.
#[derive(Debug, thiserror::Error)]
pub enum PyroscopeError {
    #[error("invalid Pyroscope URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error("invalid HTTP header {name:?} for Pyroscope")]
    InvalidHeader { name: String },

    #[error("failed to set up the HTTP client for Pyroscope")]
    Client(#[source] reqwest::Error),

    #[error("push to {url} timed out")]
    Timeout {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("cannot connect to Pyroscope at {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    /// The request or response broke off after connecting.
    #[error("push to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    /// Pyroscope (or a proxy in front) answered with a non-2xx status.
    /// `code` is the Connect error code (`invalid_argument`, ...), derived
    /// from the status when the body is not a Connect error.
    #[error("Pyroscope at {url} rejected the push: HTTP {status} {code}: {message}")]
    Status { url: String, status: u16, code: String, message: String },
}

impl PyroscopeError {
    /// Whether the same push may succeed later: network trouble, timeouts,
    /// overload (429) and server errors (5xx) pass; a request Pyroscope
    /// refused (other 4xx: bad labels, auth, size limits) fails again.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Connect { .. } | Self::Transport { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::InvalidUrl { .. } | Self::InvalidHeader { .. } | Self::Client(_) => false,
        }
    }
}

/// Pushes profiles to one Pyroscope endpoint; cheap to clone and share.
#[derive(Clone, Debug)]
pub struct PyroscopeClient {
    url: String,
    basic_auth: Option<(String, String)>,
    http: reqwest::Client,
}

impl PyroscopeClient {
    /// Checks the configuration and prepares the connection pool; connects
    /// lazily on the first push.
    ///
    /// # Errors
    ///
    /// A URL that is not http(s), a header that is not valid HTTP, or a
    /// TLS setup failure.
    pub fn new(config: &PyroscopeConfig) -> Result<Self, PyroscopeError> {
        let invalid = |reason: &str| PyroscopeError::InvalidUrl { url: config.base_url.clone(), reason: reason.into() };
        let base = reqwest::Url::parse(&config.base_url).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("scheme must be http or https"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("must not have a query or fragment"));
        }
        let url = format!("{}{PUSH_PATH}", base.as_str().trim_end_matches('/'));

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/proto"));
        headers.insert("connect-protocol-version", HeaderValue::from_static("1"));
        headers.insert(USER_AGENT, HeaderValue::from_static(concat!("profiler-agent/", env!("CARGO_PKG_VERSION"))));
        let tenant = config.tenant_id.as_ref().map(|t| ("X-Scope-OrgID".to_owned(), t.clone()));
        for (name, value) in config.headers.iter().cloned().chain(tenant) {
            let bad = || PyroscopeError::InvalidHeader { name: name.clone() };
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let mut v = HeaderValue::from_str(&value).map_err(|_| bad())?;
            v.set_sensitive(true); // may be a credential; keep it out of Debug output
            headers.insert(n, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .build()
            .map_err(PyroscopeError::Client)?;
        Ok(Self { url, basic_auth: config.basic_auth.clone(), http })
    }

    /// The full URL pushes go to.
    pub fn push_url(&self) -> &str {
        &self.url
    }

    /// Sends `req` and waits for Pyroscope to accept it.
    ///
    /// # Errors
    ///
    /// See [`PyroscopeError`]; use [`PyroscopeError::retryable`] to decide
    /// whether to try again.
    pub async fn push(&self, req: &PushRequest) -> Result<(), PyroscopeError> {
        let mut request = self.http.post(&self.url).body(req.encode_to_vec());
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        // Read the body either way: it holds the error, and reading it to
        // the end lets the connection be reused.
        let body = response.bytes().await.map_err(|e| self.transport_error(e))?;
        if status.is_success() {
            return Ok(());
        }
        let (code, message) = parse_connect_error(&body).unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_owned();
            (code_for_status(status.as_u16()).to_owned(), text)
        });
        Err(PyroscopeError::Status { url: self.url.clone(), status: status.as_u16(), code, message })
    }

    fn transport_error(&self, source: reqwest::Error) -> PyroscopeError {
        let url = self.url.clone();
        // A connect timeout is both; it is reported as the timeout it is.
        if source.is_timeout() {
            PyroscopeError::Timeout { url, source }
        } else if source.is_connect() {
            PyroscopeError::Connect { url, source }
        } else {
            PyroscopeError::Transport { url, source }
        }
    }
}

/// The Connect code a client infers from the HTTP status when the body is
/// not a Connect error (e.g. a proxy's HTML page), per the Connect spec.
pub fn code_for_status(status: u16) -> &'static str {
    match status {
        400 => "internal",
        401 => "unauthenticated",
        403 => "permission_denied",
        404 => "unimplemented",
        429 | 502..=504 => "unavailable",
        _ => "unknown",
    }
}

/// `(code, message)` of a Connect JSON error body; `None` unless it is a
/// JSON object with a string `code`.
///
/// A hand-rolled reader of just that shape, so the crate needs no JSON
/// dependency for one error path: other members (`details`) are skipped.
pub fn parse_connect_error(body: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let mut r = JsonReader { chars: text.trim().chars().peekable() };
    let (mut code, mut message) = (None, String::new());
    r.expect('{')?;
    if r.peek() == Some('}') {
        return None;
    }
    loop {
        let key = r.string()?;
        r.expect(':')?;
        match (key.as_str(), r.peek()) {
            ("code", Some('"')) => code = Some(r.string()?),
            ("message", Some('"')) => message = r.string()?,
            _ => r.skip_value()?,
        }
        match r.next()? {
            ',' => {}
            '}' => break,
            _ => return None,
        }
    }
    Some((code?, message))
}

struct JsonReader<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl JsonReader<'_> {
    fn peek(&mut self) -> Option<char> {
        while self.chars.next_if(char::is_ascii_whitespace).is_some() {}
        self.chars.peek().copied()
    }

    fn next(&mut self) -> Option<char> {
        self.peek()?;
        self.chars.next()
    }

    fn expect(&mut self, c: char) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn string(&mut self) -> Option<String> {
        self.expect('"')?;
        let mut out = String::new();
        let mut utf16 = Vec::new(); // \u escapes, joined so surrogate pairs decode
        loop {
            let c = self.chars.next()?;
            if c == '\\' && self.chars.peek() == Some(&'u') {
                self.chars.next();
                let hex: String = (0..4).filter_map(|_| self.chars.next()).collect();
                utf16.push(u16::from_str_radix(&hex, 16).ok()?);
                continue;
            }
            out.extend(char::decode_utf16(utf16.drain(..)).map(|r| r.unwrap_or('\u{fffd}')));
            match c {
                '"' => return Some(out),
                '\\' => out.push(match self.chars.next()? {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    other => other, // `"`, `\`, `/`
                }),
                c => out.push(c),
            }
        }
    }

    /// Skips one value of any type; nesting only has to be balanced.
    fn skip_value(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            match (self.peek()?, depth) {
                ('"', _) => {
                    self.string()?;
                }
                ('{' | '[', _) => {
                    self.chars.next();
                    depth += 1;
                }
                ('}' | ']', 1..) => {
                    self.chars.next();
                    depth -= 1;
                }
                // A delimiter where a value should start: not JSON.
                (',' | '}' | ']', 0) => return None,
                _ => {
                    self.chars.next();
                }
            }
            if depth == 0 && matches!(self.peek(), Some(',' | '}')) {
                return Some(());
            }
        }
    }
}
