//! `profiler-agent run`: the daemon profiles continuously, writes one set of
//! files per interval, serves its health endpoints, and on SIGTERM exports
//! the last partial interval and exits 0.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use profiler_integration_tests::{
    agent_bin, parse_folded, require_root,
    workload::{BUSY_C, C_FP_FLAGS},
    Workload,
};

/// Interval of the daemon under test; short so the test is quick.
const INTERVAL_SECS: u64 = 2;
/// How long the daemon runs: three whole intervals and a partial fourth.
const RUN_FOR: Duration = Duration::from_millis(7_000);
/// A port unlikely to be taken on a test machine.
const PORT: u16 = 19_464;

fn http_get(path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", PORT)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
}

fn files(dir: &Path, prefix: &str, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) && n.ends_with(suffix))
        .collect();
    v.sort();
    v
}

#[test]
fn daemon_exports_every_interval_serves_health_and_flushes_on_sigterm() {
    require_root();
    let mut w = Workload::c("daemon_busy", BUSY_C, C_FP_FLAGS);
    w.warm_up();
    let out = tempfile::tempdir().unwrap();
    let mut agent = Command::new(agent_bin())
        .args(["run", "--pid", &w.pid_arg(), "-F", "99", "--off-cpu"])
        .args(["--export-interval", &format!("{INTERVAL_SECS}s"), "--http-listen", &format!("127.0.0.1:{PORT}")])
        .arg("--output-dir")
        .arg(out.path())
        .env("PROFILER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start profiler-agent run");
    let started = Instant::now();

    // Ready once the programs are attached.
    let mut ready = None;
    // Loading and verifying the programs with --off-cpu takes several seconds
    // on a busy 2-CPU VM.
    while started.elapsed() < Duration::from_secs(30) {
        if let Some((200, _)) = http_get("/readyz") {
            ready = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready = ready.expect("/readyz never answered 200 within 30 s");
    assert_eq!(http_get("/healthz").map(|r| r.0), Some(200));
    // Intervals start when the programs are attached: count from readiness,
    // not from the process start (loading and verifying the programs).
    // Processes come and go outside --pid meanwhile.
    for _ in 0..20 {
        let status = Command::new("/bin/true").status().expect("run /bin/true");
        assert!(status.success());
    }
    std::thread::sleep(RUN_FOR.saturating_sub(started.elapsed() - ready));
    let (status, metrics) = http_get("/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(metrics.contains("profiler_export_attempts_total{exporter=\"files\"}"), "{metrics}");
    assert!(metrics.contains("profiler_kernel_events_total{kind=\"samples_sent\"}"), "{metrics}");
    // CFI unwinding is on by default: the --pid process's tables (its
    // executable, libc, ld.so, the vDSO) are in the kernel and its stacks
    // unwind to the end.
    let gauge = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics\n{metrics}"))
    };
    assert!(gauge("profiler_unwind_tables") >= 3, "{metrics}");
    assert!(gauge("profiler_unwind_table_bytes") > 0, "{metrics}");
    // The --pid process only: execs elsewhere on the host are counted but
    // not given tables.
    assert_eq!(gauge("profiler_unwind_processes"), 1, "{metrics}");
    assert!(gauge("profiler_kernel_events_total{kind=\"unwind_complete\"}") > 100, "{metrics}");

    let before_stop = files(out.path(), "cpu-", ".pb.gz").len();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit within 15 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    agent.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "exit status {status}\n{stderr}");

    let cpu = files(out.path(), "cpu-", ".folded");
    let pprof = files(out.path(), "cpu-", ".pb.gz");
    let off = files(out.path(), "off-cpu-", ".pb.gz");
    // 7 s at a 2 s interval: 3 whole intervals, plus the partial one that
    // SIGTERM flushed.
    assert!(cpu.len() >= 3 && cpu.len() == pprof.len() && off.len() == pprof.len(), "{cpu:?} {pprof:?} {off:?}");
    assert_eq!(pprof.len(), before_stop + 1, "SIGTERM wrote exactly the last partial interval\n{stderr}");
    let mut total = 0;
    for name in &cpu {
        let f = parse_folded(&std::fs::read_to_string(out.path().join(name)).unwrap());
        assert!(f.processes().iter().all(|p| p == "daemon_busy"), "{name}: only the --pid process");
        total += f.count_with_leaf("busy_loop");
    }
    // 99 Hz for ~7 s of a single busy thread, less start-up: well over 300.
    assert!(total > 300, "only {total} busy_loop samples across {cpu:?}\n{stderr}");
}

#[test]
fn bad_config_is_rejected_at_start_with_key_and_line() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[export]\nintervall = \"5s\"\n", &["intervall", "line 2"][..]),
        ("[sampling]\nfrequency = \"fast\"\n", &["frequency", "line 2"][..]),
        ("[export.files]\nmax_age = \"forever\"\n", &["forever", "line 2"][..]),
    ];
    for (i, (text, wanted)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(agent_bin()).arg("run").arg("--config").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} was accepted");
        for w in wanted {
            assert!(stderr.contains(w), "{text:?}: stderr lacks {w:?}:\n{stderr}");
        }
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    }
    let out = Command::new(agent_bin()).args(["run", "--config", "/nonexistent/profiler.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/profiler.toml"));
}
