//! `profiler-agent run` exporting OTLP over gRPC with TLS to a real receiver
//! (tests/receivers/otlp_metrics_receiver.py: grpcio's TLS server, the
//! official protos), with certificates the test makes with `openssl`:
//! mutual TLS configured through the OTEL_EXPORTER_OTLP_* variables, the
//! same from the config file with `metrics = false`, and a CA the server's
//! certificate does not chain to.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use profiler_integration_tests::{
    agent_bin, daemon::Daemon, require_root, workload::C_FP_FLAGS, workspace_dir, Workload,
};
use serde_json::Value;

/// The client certificate's common name, which the receiver reports back.
const CLIENT_CN: &str = "profiler-agent-test";

const BUSY_C: &str = r#"
#include <stdint.h>
__attribute__((noinline)) void tls_spin(void) {
    volatile uint64_t acc = 0;
    for (uint64_t i = 0; i < 1000000UL; i++) acc += i;
}
int main(void) { for (;;) tls_spin(); }
"#;

/// A CA and the certificates it signed, as PEM files in a temporary dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA named `ca`, a server certificate for 127.0.0.1 and localhost,
    /// and a client certificate for CLIENT_CN.
    fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().unwrap() };
        pki.ca("ca");
        pki.leaf("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth");
        pki.leaf("client", CLIENT_CN, "extendedKeyUsage=clientAuth");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self, name: &str) {
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    fn leaf(&self, name: &str, cn: &str, extensions: &str) {
        let ext = self.path(&format!("{name}.ext"));
        std::fs::write(&ext, format!("basicConstraints=CA:FALSE\n{extensions}\n")).unwrap();
        openssl(
            self.dir.path(),
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.crt"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs (Debian: openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The receiver, serving gRPC over TLS with the server certificate; with
/// `mutual`, also requiring a client certificate from the same CA.
struct Receiver {
    child: Child,
    out: PathBuf,
    grpc: u16,
}

impl Receiver {
    fn start(pki: &Pki, mutual: bool) -> Receiver {
        let out = pki.path("received.jsonl");
        let script = workspace_dir().join("tests/receivers/otlp_metrics_receiver.py");
        let mut cmd = Command::new("python3");
        // grpcio logs every refused handshake at info level; the test's own
        // message says what matters.
        cmd.arg(&script).arg("--out").arg(&out).env("GRPC_VERBOSITY", "ERROR");
        cmd.arg("--tls-cert").arg(pki.path("server.crt")).arg("--tls-key").arg(pki.path("server.key"));
        if mutual {
            cmd.arg("--tls-client-ca").arg(pki.path("ca.crt"));
        }
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let grpc = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!("the receiver did not start ({line:?}); run `python3 -m pip install -r tests/receivers/requirements.txt`")
            });
        Receiver { child, out, grpc }
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON lines"))
            .collect()
    }

    /// Waits until `enough` holds for the lines, or `within` passes.
    fn wait(&self, within: Duration, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.lines();
            if enough(&lines) || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal<'a>(lines: &'a [Value], signal: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["signal"] == signal).collect()
}

/// `profiler-agent run` with its stderr kept in a file, its health endpoint
/// on a free port, a 1 s export interval, killed on drop.
struct Agent {
    daemon: Daemon,
    port: u16,
    log: PathBuf,
}

impl Agent {
    fn start(args: &[&str], env: &[(&str, &Path)], log: PathBuf) -> Agent {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(agent_bin())
            .arg("run")
            .args(args)
            .args(["--export-interval", "1s", "--http-listen", &format!("127.0.0.1:{port}")])
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .env("PROFILER_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start profiler-agent run");
        Agent { daemon: Daemon::adopt(child), port, log }
    }

    /// The value of a /metrics series, e.g. `profiler_export_failures_total{exporter="otlp"}`.
    fn metric(&self, series: &str) -> Option<f64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    fn stop(self) -> (std::process::ExitStatus, String) {
        let status = self.daemon.stop();
        (status, std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

fn busy() -> Workload {
    let mut w = Workload::c("tls_busy", BUSY_C, C_FP_FLAGS);
    w.warm_up();
    w
}

/// Mutual TLS from the environment alone: an https:// endpoint, the CA, the
/// client certificate and key in OTEL_EXPORTER_OTLP_*. Profiles and metrics
/// both arrive over TLS, and every request carried the client certificate.
#[test]
fn daemon_exports_over_mutual_tls_configured_by_the_otel_variables() {
    require_root();
    let pki = Pki::new();
    let receiver = Receiver::start(&pki, true);
    let w = busy();
    let endpoint = format!("https://127.0.0.1:{}", receiver.grpc);
    let (ca, cert, key) = (pki.path("ca.crt"), pki.path("client.crt"), pki.path("client.key"));
    let agent = Agent::start(
        &["--pid", &w.pid_arg(), "-F", "99", "--off-cpu", "--otlp-endpoint", &endpoint],
        &[
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key),
        ],
        pki.path("agent.log"),
    );
    let lines = receiver
        .wait(Duration::from_secs(20), |l| signal(l, "profiles").len() >= 3 && !signal(l, "metrics").is_empty());
    let failures = agent.metric("profiler_export_failures_total{exporter=\"otlp\"}");
    let (status, log) = agent.stop();
    assert!(status.success(), "{status}\n{log}");
    let (profiles, metrics) = (signal(&lines, "profiles"), signal(&lines, "metrics"));
    assert!(
        profiles.len() >= 3 && !metrics.is_empty(),
        "{} profile and {} metric requests\n{log}",
        profiles.len(),
        metrics.len()
    );
    for l in profiles.iter().chain(&metrics) {
        assert_eq!(l["transport"], "grpc");
        assert_eq!(l["tls_client"], CLIENT_CN, "request without the client certificate: {l}");
    }
    assert!(profiles.iter().any(|l| l["resources"].as_u64() > Some(0)), "profiles without resources: {profiles:?}");
    assert_eq!(failures, Some(0.0), "export failures over TLS\n{log}");
}

/// The same through the config file's keys, with `metrics = false`: the
/// profiles arrive and not one metrics request does.
#[test]
fn config_file_tls_keys_and_metrics_off() {
    require_root();
    let pki = Pki::new();
    let receiver = Receiver::start(&pki, true);
    let w = busy();
    let config = pki.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "[export.otlp]\nendpoint = \"https://127.0.0.1:{}\"\nmetrics = false\nca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\n",
            receiver.grpc,
            pki.path("ca.crt"),
            pki.path("client.crt"),
            pki.path("client.key")
        ),
    )
    .unwrap();
    let agent = Agent::start(
        &["--config", config.to_str().unwrap(), "--pid", &w.pid_arg(), "-F", "99", "--off-cpu"],
        &[],
        pki.path("agent.log"),
    );
    // Metrics would go with each interval's profiles: five intervals of
    // profiles leave no room for one to be late.
    let lines = receiver.wait(Duration::from_secs(20), |l| signal(l, "profiles").len() >= 5);
    let (status, log) = agent.stop();
    assert!(status.success(), "{status}\n{log}");
    let (profiles, metrics) = (signal(&lines, "profiles"), signal(&lines, "metrics"));
    assert!(profiles.len() >= 5, "{} profile requests\n{log}", profiles.len());
    assert!(profiles.iter().all(|l| l["tls_client"] == CLIENT_CN), "{profiles:?}");
    assert!(metrics.is_empty(), "metrics = false, yet {} metrics requests arrived", metrics.len());
}

/// A CA that did not sign the server's certificate: nothing is sent, the
/// failures are counted on /metrics and the intervals wait in the buffer,
/// the log says why, and the daemon keeps running and exits cleanly.
#[test]
fn a_ca_that_did_not_sign_the_server_fails_clearly_and_is_counted() {
    require_root();
    let pki = Pki::new();
    pki.ca("other-ca");
    let receiver = Receiver::start(&pki, false);
    let w = busy();
    let endpoint = format!("https://127.0.0.1:{}", receiver.grpc);
    let other = pki.path("other-ca.crt");
    let agent = Agent::start(
        &["--pid", &w.pid_arg(), "-F", "99", "--otlp-endpoint", &endpoint],
        &[("OTEL_EXPORTER_OTLP_CERTIFICATE", &other)],
        pki.path("agent.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failures = 0.0;
    while failures < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        failures = agent.metric("profiler_export_failures_total{exporter=\"otlp\"}").unwrap_or(0.0);
    }
    let buffered = agent.metric("profiler_export_buffered_bytes{exporter=\"otlp\"}");
    let (status, log) = agent.stop();
    assert!(status.success(), "{status}\n{log}");
    assert!(failures >= 2.0, "{failures} export failures counted\n{log}");
    assert!(buffered > Some(0.0), "nothing waits in the buffer ({buffered:?})\n{log}");
    assert!(receiver.lines().is_empty(), "the receiver took requests: {:?}", receiver.lines());
    let lower = log.to_lowercase();
    assert!(
        lower.contains("certificate") && (lower.contains("unknownissuer") || lower.contains("unknown issuer")),
        "the log does not say the certificate's issuer is unknown:\n{log}"
    );
}
