//! Whether the configured destinations work: exporter endpoints accept a
//! TCP connection (DNS and connect under one timeout), the local profile
//! directory can be written, the HTTP address can be bound.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

/// Resolves `url`'s host and connects to it, all within `timeout`; `Ok`
/// describes the connection.
pub async fn tcp_reachable(url: &str, timeout: Duration) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let host = parsed.host_str().ok_or_else(|| format!("`{url}` has no host"))?.to_owned();
    let port = parsed.port_or_known_default().ok_or_else(|| format!("`{url}` has no port"))?;
    let start = Instant::now();
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        let mut last = format!("{host} resolved to no address");
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => return Ok(addr),
                Err(e) => last = format!("cannot connect to {addr}: {e}"),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(addr)) => Ok(format!("{url}: TCP connect to {addr} in {} ms", start.elapsed().as_millis())),
        Ok(Err(e)) => Err(format!("{url}: {e}")),
        Err(_) => Err(format!("{url}: no connection within {} ms", timeout.as_millis())),
    }
}

/// Whether the effective user can write `dir`, or create it (its nearest
/// existing ancestor is writable). Nothing is created: an operator running
/// `check` as root must not leave a root-owned directory behind.
pub fn dir_writable(dir: &Path) -> Result<String, String> {
    let mut probe = dir;
    loop {
        if probe.exists() {
            break;
        }
        probe = probe.parent().ok_or_else(|| format!("{} has no existing parent", dir.display()))?;
    }
    if !probe.is_dir() {
        return Err(format!("{} is not a directory", probe.display()));
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; faccessat only reads it.
    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK | libc::X_OK, libc::AT_EACCESS) };
    if rc != 0 {
        return Err(format!("{} is not writable: {}", probe.display(), std::io::Error::last_os_error()));
    }
    if probe == dir {
        Ok(format!("{} is writable", dir.display()))
    } else {
        Ok(format!("{} can be created (in {})", dir.display(), probe.display()))
    }
}

/// How binding the HTTP address went.
#[derive(Debug, PartialEq, Eq)]
pub enum Bind {
    Ok,
    InUse(String),
    Failed(String),
}

pub fn try_bind(addr: SocketAddr) -> Bind {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Bind::Ok,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Bind::InUse(e.to_string()),
        Err(e) => Bind::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_and_closed_ports() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ok = tcp_reachable(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2)).await.unwrap();
        assert!(ok.contains(&format!("127.0.0.1:{port}")), "{ok}");
        drop(listener);
        let err = tcp_reachable(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2)).await.unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
        let err = tcp_reachable("not a url", Duration::from_secs(1)).await.unwrap_err();
        assert!(err.contains("not a URL"), "{err}");
    }

    #[test]
    fn binding() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(matches!(try_bind(addr), Bind::InUse(_)));
        drop(listener);
        assert_eq!(try_bind(addr), Bind::Ok);
    }

    #[test]
    fn writable_dirs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(dir_writable(dir.path()).unwrap().contains("is writable"));
        let sub = dir.path().join("a/b");
        assert!(dir_writable(&sub).unwrap().contains("can be created"));
        assert!(!sub.exists(), "nothing is created");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(dir_writable(&file.join("sub")).unwrap_err().contains("not a directory"));
    }
}
