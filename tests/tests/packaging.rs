//! The deployment artefacts under packaging/, checked by
//! tests/packaging/check_packaging.py with the real tools: the Helm chart
//! rendered by Helm's own engine (PyPI helm-python-sdk) and every object
//! validated strictly against the Kubernetes 1.33 schemas (PyPI
//! kubernetes-validate), the plain manifests likewise, the Dockerfile linted
//! by hadolint and compared with xtask's build, and the Grafana dashboards
//! (panels and template variables) against the metrics a real daemon serves
//! and sends.
//!
//! Only the Grafana test needs root (it runs the daemon); the others need
//! python3 with tests/receivers/requirements.txt.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use profiler_integration_tests::{agent_bin, require_root, workload::C_FP_FLAGS, workspace_dir, Workload};

/// Two spinners sharing one CPU (each waits on the run queue while the other
/// runs) and a main thread napping 5 ms at a time (off-CPU): every latency
/// series the dashboards show gets points.
const LATENCY_C: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <time.h>

static void *spin(void *arg) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    for (volatile unsigned long i = 0;; i++) {}
    return arg;
}

int main(void) {
    pthread_t a, b;
    pthread_create(&a, 0, spin, 0);
    pthread_create(&b, 0, spin, 0);
    struct timespec nap = {0, 5 * 1000 * 1000};
    for (;;) nanosleep(&nap, 0);
}
"#;

const INSTALL_HINT: &str = "python3 -m pip install -r tests/receivers/requirements.txt";

/// Runs `check_packaging.py ARGS`; panics with its output unless every check passed.
fn check_packaging(args: &[&str]) -> String {
    let script = workspace_dir().join("tests/packaging/check_packaging.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .current_dir(workspace_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); install Python 3 and run `{INSTALL_HINT}`"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        Some(0) => text,
        Some(3) => panic!("{text}\nthe packaging checks need Python packages: `{INSTALL_HINT}`"),
        _ => panic!("check_packaging.py {} failed:\n{text}", args.join(" ")),
    }
}

#[test]
fn helm_chart_renders_and_every_object_is_valid_kubernetes() {
    let out = check_packaging(&["chart"]);
    assert!(out.contains("chart: all checks passed"), "{out}");
}

#[test]
fn plain_manifests_are_valid_and_match_the_chart() {
    let out = check_packaging(&["manifests"]);
    assert!(out.contains("manifests: all checks passed"), "{out}");
}

#[test]
fn dockerfile_lints_clean_and_builds_like_xtask() {
    let out = check_packaging(&["dockerfile"]);
    assert!(out.contains("dockerfile: all checks passed"), "{out}");
}

/// tests/receivers/otlp_metrics_receiver.py on ephemeral ports.
struct Receiver {
    child: Child,
    grpc: u16,
}

impl Receiver {
    fn start(out: &Path) -> Receiver {
        let script = workspace_dir().join("tests/receivers/otlp_metrics_receiver.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--out")
            .arg(out)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ports: Vec<u16> =
            line.trim().strip_prefix("READY ").unwrap_or("").split(['=', ' ']).filter_map(|w| w.parse().ok()).collect();
        assert_eq!(ports.len(), 2, "the OTLP receiver did not start ({line:?}); run `{INSTALL_HINT}`");
        Receiver { child, grpc: ports[0] }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then(|| out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()))?
}

/// Every metric and label the dashboards query, in their panels and their
/// template variables, exists, and every panel is on a datasource the
/// checker knows: the truth is a real daemon profiling a workload with
/// --off-cpu, its /metrics text and the OTLP metrics it sent (translated to
/// Prometheus names by the checker).
#[test]
fn grafana_dashboards_query_only_metrics_the_daemon_exports() {
    require_root();
    let mut flags = C_FP_FLAGS.to_vec();
    flags.push("-pthread");
    let mut w = Workload::c("grafana_latency", LATENCY_C, &flags);
    w.warm_up();
    let dir = tempfile::tempdir().unwrap();
    let otlp_out = dir.path().join("otlp.jsonl");
    let receiver = Receiver::start(&otlp_out);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut daemon = Command::new(agent_bin())
        .args([
            "run",
            "--pid",
            &w.pid_arg(),
            "--off-cpu",
            "--export-interval",
            "2s",
            "--http-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--otlp-endpoint", &format!("http://127.0.0.1:{}", receiver.grpc)])
        .env("PROFILER_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start profiler-agent run");
    let started = Instant::now();
    while http_get(port, "/readyz").is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "the daemon was not ready within 30 s");
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Two whole intervals: latency histograms, sample counters and health series.
    std::thread::sleep(Duration::from_secs(5));
    let metrics = http_get(port, "/metrics").expect("/metrics answers");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the daemon did not stop within 20 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(receiver);
    let metrics_file = dir.path().join("metrics.txt");
    std::fs::write(&metrics_file, &metrics).unwrap();
    let out = check_packaging(&[
        "grafana",
        "--metrics",
        metrics_file.to_str().unwrap(),
        "--otlp",
        otlp_out.to_str().unwrap(),
    ]);
    eprintln!("{out}");
    assert!(out.contains("grafana: all checks passed"), "{out}");
}
