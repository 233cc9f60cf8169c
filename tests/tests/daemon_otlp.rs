//! `profiler-agent run` against a real OTLP profiles receiver: the official
//! protos from PyPI `opentelemetry-proto` decode what the daemon sends
//! (tests/receivers/otlp_profiles_receiver.py), over gRPC and OTLP/HTTP, and
//! the daemon survives a receiver that is down at start or hangs.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use profiler_integration_tests::{
    daemon::Daemon,
    require_root,
    workload::{C_FP_FLAGS, FP_RATIO_C},
    workspace_dir, Workload,
};

/// FP_RATIO_C's 3:1 spinning main thread, plus a thread that sleeps in
/// `nap` so the off-CPU profile has something to show.
fn workload(name: &str) -> Workload {
    let source = FP_RATIO_C.replace("int main(void) {", NAPPER_C);
    let mut flags = C_FP_FLAGS.to_vec();
    flags.push("-pthread");
    let mut w = Workload::c(name, &source, &flags);
    w.warm_up();
    w
}

const NAPPER_C: &str = r#"
#include <pthread.h>
#include <time.h>
__attribute__((noinline)) void nap(void) {
    volatile int pad = 0;
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, 0);
    (void)pad;
}
static void *napper(void *arg) {
    (void)arg;
    for (;;) nap();
    return 0;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, napper, 0);
"#;

/// leaf_alpha : leaf_beta CPU of the FP_RATIO_C workload, with the on-CPU
/// tests' tolerance.
const RATIO: f64 = 3.0;
const RATIO_TOLERANCE: f64 = 0.15;

/// Sampling rate of the tests that check the ratio. Each sample lands in
/// leaf_beta with probability 1/4, so the share is binomial. At 99 Hz the late
/// receiver's ~600 samples give it a standard deviation of 0.018, and the 15 %
/// band on the ratio (a beta share of 0.225 to 0.282) is only 1.4-1.8 sigma
/// wide: CI saw 482:132 = 3.65. At 999 Hz, ~6000 samples put the band at 4.5-5.7
/// sigma, so a failure means the profile is wrong, not unlucky.
const RATIO_FREQUENCY: &str = "999";

struct Receiver {
    child: Child,
    out: PathBuf,
    grpc: u16,
    http: u16,
}

impl Receiver {
    fn start(dir: &Path, grpc_port: u16) -> Receiver {
        let out = dir.join(format!("received-{grpc_port}.jsonl"));
        let script = workspace_dir().join("tests/receivers/otlp_profiles_receiver.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--out")
            .arg(&out)
            .args(["--grpc-port", &grpc_port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ports: Vec<u16> =
            line.trim().strip_prefix("READY ").unwrap_or("").split(['=', ' ']).filter_map(|w| w.parse().ok()).collect();
        assert_eq!(
            ports.len(),
            2,
            "the OTLP receiver did not start ({line:?}); run `python3 -m pip install -r tests/receivers/requirements.txt`"
        );
        Receiver { child, out, grpc: ports[0], http: ports[1] }
    }

    /// Decoded requests so far.
    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("receiver writes JSON lines"))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of sample values per leaf function name, for one sample type.
fn leaf_values(requests: &[serde_json::Value], sample_type: &str) -> std::collections::BTreeMap<String, i64> {
    let mut out = std::collections::BTreeMap::new();
    for r in requests {
        for res in r["resources"].as_array().into_iter().flatten() {
            for scope in res["scopes"].as_array().into_iter().flatten() {
                for p in scope["profiles"].as_array().into_iter().flatten() {
                    if p["sample_type"][0] != sample_type {
                        continue;
                    }
                    for s in p["samples"].as_array().into_iter().flatten() {
                        let leaf = s["frames"][0]["lines"][0]["function"].as_str().unwrap_or("").to_owned();
                        let v: i64 = s["values"].as_array().into_iter().flatten().filter_map(|v| v.as_i64()).sum();
                        *out.entry(leaf).or_insert(0) += v;
                    }
                }
            }
        }
    }
    out
}

fn check_requests(requests: &[serde_json::Value], pid: u32, ctx: &str) {
    assert!(!requests.is_empty(), "nothing arrived\n{ctx}");
    for r in requests {
        assert_eq!(r["problems"].as_array().map(Vec::len), Some(0), "dictionary problems: {}\n{ctx}", r["problems"]);
        for res in r["resources"].as_array().into_iter().flatten() {
            let a = &res["attributes"];
            assert_eq!(a["process.pid"].as_i64(), Some(i64::from(pid)), "{a}");
            for key in ["process.executable.name", "process.executable.path", "service.name", "host.name"] {
                assert!(a[key].is_string(), "resource lacks {key}: {a}");
            }
            for scope in res["scopes"].as_array().into_iter().flatten() {
                for p in scope["profiles"].as_array().into_iter().flatten() {
                    let on_cpu = p["sample_type"][0] == "samples";
                    for s in p["samples"].as_array().into_iter().flatten() {
                        let a = &s["attributes"];
                        assert!(a["thread.name"].is_string() && a["thread.id"].is_i64(), "{s}");
                        assert_eq!(
                            a["cpu.logical_number"].is_i64(),
                            on_cpu,
                            "cpu.logical_number is on on-CPU samples only: {s}"
                        );
                    }
                }
            }
        }
    }
    let types: std::collections::BTreeSet<String> = requests
        .iter()
        .flat_map(|r| r["resources"].as_array().cloned().unwrap_or_default())
        .flat_map(|res| res["scopes"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["profiles"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            format!("{}/{}", p["sample_type"][0].as_str().unwrap_or(""), p["sample_type"][1].as_str().unwrap_or(""))
        })
        .collect();
    assert!(types.contains("samples/count") && types.contains("off_cpu/nanoseconds"), "sample types {types:?}\n{ctx}");
    let leaves = leaf_values(requests, "samples");
    let (alpha, beta) = (leaves.get("leaf_alpha").copied().unwrap_or(0), leaves.get("leaf_beta").copied().unwrap_or(0));
    assert!(alpha > 0 && beta > 0, "leaves {leaves:?}\n{ctx}");
    let ratio = alpha as f64 / beta as f64;
    eprintln!("{ctx}: leaf_alpha:leaf_beta = {alpha}:{beta} = {ratio:.3}");
    assert!(
        (ratio - RATIO).abs() <= RATIO * RATIO_TOLERANCE,
        "leaf_alpha:leaf_beta = {alpha}:{beta} = {ratio:.2}\n{ctx}"
    );
}

fn run_against(protocol: &str) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let w = workload("otlp_ratio");
    let endpoint = match protocol {
        "grpc" => format!("http://127.0.0.1:{}", receiver.grpc),
        _ => format!("http://127.0.0.1:{}", receiver.http),
    };
    let daemon = Daemon::start(&[
        "--pid",
        &w.pid_arg(),
        "-F",
        RATIO_FREQUENCY,
        "--off-cpu",
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        protocol,
    ]);
    std::thread::sleep(Duration::from_secs(9));
    let before = receiver.requests().len();
    assert!(daemon.stop().success());
    let requests = receiver.requests();
    let ctx = format!("{} requests over {protocol}", requests.len());
    assert!(requests.len() > before, "SIGTERM exported the last interval\n{ctx}");
    check_requests(&requests, w.pid(), &ctx);
}

#[test]
fn daemon_exports_otlp_profiles_over_grpc() {
    run_against("grpc");
}

#[test]
fn daemon_exports_otlp_profiles_over_http() {
    run_against("http/protobuf");
}

/// Nothing listens at first; the receiver comes up on the same port after a
/// few intervals. Everything buffered arrives, in order, nothing dropped.
#[test]
fn receiver_down_at_start_then_up_gets_the_buffered_intervals() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let w = workload("otlp_late");
    let endpoint = format!("http://127.0.0.1:{port}");
    let daemon =
        Daemon::start(&["--pid", &w.pid_arg(), "-F", RATIO_FREQUENCY, "--off-cpu", "--otlp-endpoint", &endpoint]);
    std::thread::sleep(Duration::from_secs(5));
    let receiver = Receiver::start(dir.path(), port);
    // Backoff is at most 30 s; the first retries come within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.requests().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.stop().success());
    let requests = receiver.requests();
    assert!(requests.len() >= 3, "{} requests after the receiver came up", requests.len());
    // In order: each request's profiles start no earlier than the previous one's.
    let starts: Vec<i64> = requests
        .iter()
        .filter_map(|r| r["resources"][0]["scopes"][0]["profiles"][0]["time_unix_nano"].as_i64())
        .collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "out of order: {starts:?}");
    check_requests(&requests, w.pid(), "late receiver");
}

/// A receiver that accepts connections and never answers: request timeouts
/// fire, the daemon's memory stays bounded, and SIGTERM still exits cleanly.
#[test]
fn hanging_receiver_times_out_and_memory_stays_bounded() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _hold = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in listener.incoming().take(200) {
            conns.push(c);
        }
    });
    let w = workload("otlp_hang");
    let endpoint = format!("http://127.0.0.1:{port}");
    let daemon = Daemon::start(&[
        "--pid",
        &w.pid_arg(),
        "-F",
        "99",
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        "http/protobuf",
    ]);
    let mut peak = 0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(daemon.rss_kb());
    }
    // Well under the 50 MB the agent aims for in record mode plus the
    // default 16 MiB buffer.
    assert!(peak > 0 && peak < 100 * 1024, "peak RSS {peak} kB");
    let status = daemon.stop();
    assert!(status.success(), "{status}");
}
