//! `profiler-agent run` exporting OTLP metrics next to the profiles: the
//! official protos from PyPI `opentelemetry-proto` decode what the daemon
//! sends (tests/receivers/otlp_metrics_receiver.py, which also takes the
//! profiles on the same port), over gRPC and OTLP/HTTP.
//!
//! The workload has two CPU-bound threads pinned to one CPU, so each waits on
//! the run queue for about a scheduler slice whenever the other runs, and a
//! main thread that sleeps 20 ms at a time on another CPU. The test checks
//! what a backend would derive from the metrics: the run-queue p50, the
//! off-CPU p50, the off-CPU seconds against the sleeper's real blocked time,
//! on-CPU samples, and the agent's own health series.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use profiler_integration_tests::{daemon::Daemon, require_root, workload::C_FP_FLAGS, workspace_dir, Workload};
use serde_json::Value;

/// How long the daemon runs before SIGTERM.
const RUN: Duration = Duration::from_secs(9);
const NAP_NS: f64 = 20e6;

/// Two spinners pinned to the first allowed CPU; main naps 20 ms at a time,
/// pinned to the last allowed CPU when there is more than one.
const WORKLOAD_C: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

static int first_cpu = 0, last_cpu = 0;

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

__attribute__((noinline)) void spin(void) {
    volatile uint64_t acc = 0;
    for (uint64_t i = 0; i < 1000000UL; i++) acc += i;
}

static void *spinner(void *arg) {
    (void)arg;
    pin(first_cpu);
    for (;;) spin();
    return 0;
}

__attribute__((noinline)) void nap(void) {
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, 0);
}

int main(void) {
    cpu_set_t allowed;
    sched_getaffinity(0, sizeof allowed, &allowed);
    first_cpu = -1;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (CPU_ISSET(c, &allowed)) {
            if (first_cpu < 0) first_cpu = c;
            last_cpu = c;
        }
    }
    pthread_t a, b;
    pthread_create(&a, 0, spinner, 0);
    pthread_create(&b, 0, spinner, 0);
    if (last_cpu != first_cpu) pin(last_cpu);
    for (;;) nap();
}
"#;

struct Receiver {
    child: Child,
    out: PathBuf,
    grpc: u16,
    http: u16,
}

impl Receiver {
    fn start(dir: &Path) -> Receiver {
        let out = dir.join("received.jsonl");
        let script = workspace_dir().join("tests/receivers/otlp_metrics_receiver.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--out")
            .arg(&out)
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

    fn lines(&self) -> Vec<Value> {
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

/// (on-CPU ns, run-queue wait ns) of one thread, from schedstat.
fn schedstat(pid: u32, tid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).expect("schedstat");
    let v: Vec<u64> = s.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (v[0], v[1])
}

/// Every metric named `name` in every metrics request, in arrival order.
fn metrics<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["signal"] == "metrics")
        .flat_map(|l| l["resources"].as_array().into_iter().flatten())
        .flat_map(|r| r["scopes"].as_array().into_iter().flatten())
        .flat_map(|s| s["metrics"].as_array().into_iter().flatten())
        .filter(|m| m["name"] == name)
        .collect()
}

/// The data points of `name` for process `pid`.
fn points<'a>(lines: &'a [Value], name: &str, pid: u32) -> Vec<&'a Value> {
    metrics(lines, name)
        .into_iter()
        .flat_map(|m| m["points"].as_array().into_iter().flatten())
        .filter(|p| p["attributes"]["process.pid"].as_i64() == Some(i64::from(pid)))
        .collect()
}

/// Exponential histogram points merged: (zero_count, counts by bucket index).
fn merge(points: &[&Value]) -> (u64, BTreeMap<i64, u64>) {
    let mut zero = 0;
    let mut buckets = BTreeMap::new();
    for p in points {
        assert_eq!(p["scale"], 0, "{p}");
        zero += p["zero_count"].as_u64().unwrap();
        let offset = p["positive"]["offset"].as_i64().unwrap();
        for (i, n) in p["positive"]["bucket_counts"].as_array().unwrap().iter().enumerate() {
            *buckets.entry(offset + i as i64).or_insert(0) += n.as_u64().unwrap();
        }
    }
    (zero, buckets)
}

/// A quantile as a backend derives it from scale-0 buckets: bucket `i` is
/// `(2^i, 2^(i+1)]`, linear inside.
fn quantile(zero: u64, buckets: &BTreeMap<i64, u64>, q: f64) -> f64 {
    let total = zero + buckets.values().sum::<u64>();
    let rank = q * total as f64;
    let mut seen = zero as f64;
    if rank <= seen {
        return 0.0;
    }
    for (&i, &n) in buckets {
        if n > 0 && seen + n as f64 >= rank {
            let lo = 2f64.powi(i as i32);
            return lo + (rank - seen) / n as f64 * lo;
        }
        seen += n as f64;
    }
    f64::NAN
}

fn run_against(protocol: &str) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path());
    let mut flags = C_FP_FLAGS.to_vec();
    flags.push("-pthread");
    let mut w = Workload::c("metrics_wl", WORKLOAD_C, &flags);
    w.warm_up();
    let pid = w.pid();
    let port = if protocol == "grpc" { receiver.grpc } else { receiver.http };
    let endpoint = format!("http://127.0.0.1:{port}");
    let sleeper_before = schedstat(pid, pid);
    let wall_before = Instant::now();
    let daemon = Daemon::start(&[
        "--pid",
        &w.pid_arg(),
        "-F",
        "99",
        "--off-cpu",
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        protocol,
    ]);
    std::thread::sleep(RUN);
    assert!(daemon.stop().success());
    let sleeper_after = schedstat(pid, pid);
    let wall = wall_before.elapsed().as_nanos() as f64;
    w.assert_running();
    drop(w);

    let lines = receiver.lines();
    let ctx = format!("{} requests over {protocol} in {}", lines.len(), receiver.out.display());
    let metric_lines: Vec<&Value> = lines.iter().filter(|l| l["signal"] == "metrics").collect();
    assert!(metric_lines.len() >= 3, "metrics every interval and at SIGTERM\n{ctx}");
    assert!(lines.iter().any(|l| l["signal"] == "profiles"), "profiles reach the same endpoint\n{ctx}");
    let transport = if protocol == "grpc" { "grpc" } else { "http" };
    for l in &metric_lines {
        assert_eq!(l["problems"].as_array().map(Vec::len), Some(0), "receiver problems: {}\n{ctx}", l["problems"]);
        assert_eq!(l["transport"], transport);
        let res = &l["resources"][0]["attributes"];
        assert!(res["service.name"].is_string() && res["host.name"].is_string(), "{res}");
    }

    // A metric keeps its type (and int or double points) from request to request.
    let mut types: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for l in &metric_lines {
        for m in l["resources"][0]["scopes"][0]["metrics"].as_array().unwrap() {
            for p in m["points"].as_array().unwrap() {
                let t = format!("{}/{}", m["type"].as_str().unwrap_or(""), p["value_type"].as_str().unwrap_or("-"));
                types.entry(m["name"].as_str().unwrap().to_owned()).or_default().insert(t);
            }
        }
    }
    assert!(types.values().all(|t| t.len() == 1), "metric types change between requests: {types:?}");
    assert_eq!(types["profiler.export.latency"].iter().next().map(String::as_str), Some("sum/double"));

    // Run-queue latency of the pinned spinners.
    let runq = points(&lines, "profiler.runqueue.latency", pid);
    assert!(!runq.is_empty(), "no run-queue histogram for {pid}\n{ctx}");
    for m in metrics(&lines, "profiler.runqueue.latency") {
        assert_eq!(
            (m["type"].as_str(), m["temporality"].as_str(), m["unit"].as_str()),
            (Some("exponential_histogram"), Some("delta"), Some("ns"))
        );
    }
    for p in &runq {
        assert!(p["count"].as_u64() > Some(0), "{p}");
        assert!(p["attributes"]["process.executable.name"] == "metrics_wl", "{p}");
        assert!(p["start_time_unix_nano"].as_u64() < p["time_unix_nano"].as_u64(), "{p}");
    }
    let (zero, buckets) = merge(&runq);
    let p50 = quantile(zero, &buckets, 0.5);
    eprintln!(
        "{protocol}: run-queue p50 {:.3} ms, p99 {:.3} ms over {} waits",
        p50 / 1e6,
        quantile(zero, &buckets, 0.99) / 1e6,
        zero + buckets.values().sum::<u64>()
    );
    assert!((100e3..=50e6).contains(&p50), "run-queue p50 {p50} ns, buckets {buckets:?}\n{ctx}");

    // Off-CPU durations of the 20 ms naps.
    let off = points(&lines, "profiler.offcpu.duration", pid);
    let (zero, buckets) = merge(&off);
    let p50 = quantile(zero, &buckets, 0.5);
    eprintln!("{protocol}: off-CPU p50 {:.3} ms", p50 / 1e6);
    assert!((NAP_NS / 2.0..=NAP_NS * 2.0).contains(&p50), "off-CPU p50 {p50} ns, buckets {buckets:?}\n{ctx}");
    assert!(off.iter().all(|p| p["max"].as_f64() >= Some(NAP_NS)), "the max is exported: {off:?}");

    // Off-CPU seconds against the sleeper's real blocked time: the spinners
    // never block, so the process's off-CPU time is the sleeper's, over the
    // intervals the points cover (blocks that ended in them).
    let secs = points(&lines, "profiler.offcpu.time", pid);
    assert!(!secs.is_empty(), "no off-CPU seconds\n{ctx}");
    let total: f64 = secs.iter().map(|p| p["value"].as_f64().unwrap()).sum();
    let first = secs.iter().filter_map(|p| p["start_time_unix_nano"].as_u64()).min().unwrap();
    let last = secs.iter().filter_map(|p| p["time_unix_nano"].as_u64()).max().unwrap();
    let covered = (last - first) as f64;
    // The kernel counts a block from switch-out to back on a CPU, so the
    // sleeper's share of blocked time is what it did not spend on a CPU
    // (schedstat, over the whole run: a superset of the covered time).
    let busy = (sleeper_after.0 - sleeper_before.0) as f64;
    let expected = covered * (1.0 - busy / wall) / 1e9;
    eprintln!("{protocol}: off-CPU {total:.3} s exported, {expected:.3} s expected over {:.3} s", covered / 1e9);
    assert!((total - expected).abs() <= 0.15 * expected, "off-CPU {total} s vs {expected} s\n{ctx}");

    // On-CPU samples.
    let samples: i64 = points(&lines, "profiler.oncpu.samples", pid).iter().map(|p| p["value"].as_i64().unwrap()).sum();
    assert!(samples > 0, "no on-CPU samples\n{ctx}");

    // Health: the profiles exporter's attempts, cumulative, in the last request.
    let attempts = metrics(&lines, "profiler.export.attempts");
    let last_attempts = attempts.last().unwrap_or_else(|| panic!("no profiler.export.attempts\n{ctx}"));
    assert_eq!(
        (last_attempts["type"].as_str(), last_attempts["temporality"].as_str()),
        (Some("sum"), Some("cumulative"))
    );
    let by_exporter = |name: &str| {
        last_attempts["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["attributes"]["exporter"] == name)
            .and_then(|p| p["value"].as_i64())
    };
    assert!(by_exporter("otlp") > Some(0), "{last_attempts}");
    assert!(by_exporter("otlp_metrics") > Some(0), "{last_attempts}");
    for name in [
        "profiler.kernel.events",
        "profiler.export.failures",
        "profiler.export.dropped",
        "profiler.export.latency",
        "profiler.export.buffered",
        "profiler.symbol_cache.hits",
        "profiler.symbol_cache.misses",
        "profiler.frames.unsymbolized",
        "profiler.resident_memory",
    ] {
        assert!(!metrics(&lines, name).is_empty(), "no {name}\n{ctx}");
    }
    let kinds: Vec<&str> = metrics(&lines, "profiler.kernel.events").last().unwrap()["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["attributes"]["kind"].as_str())
        .collect();
    assert!(kinds.len() > 3, "kernel event kinds {kinds:?}");
}

#[test]
fn daemon_exports_otlp_metrics_over_grpc() {
    run_against("grpc");
}

#[test]
fn daemon_exports_otlp_metrics_over_http() {
    run_against("http/protobuf");
}
