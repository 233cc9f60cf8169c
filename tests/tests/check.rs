//! `profiler-agent check`: as root it probes every BPF feature for real and
//! exits 0; as a user without capabilities it exits 1 naming CAP_BPF and
//! CAP_PERFMON; exporters are tried with timeouts; a bad config fails.

use std::{process::Command, time::Duration};

use profiler_integration_tests::{
    agent::run_command, agent_bin, privilege::as_nobody_with_caps, require_root, AgentRun,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn check(cmd: Command) -> (AgentRun, serde_json::Value) {
    let run = run_command(cmd, TIMEOUT);
    let json = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e})\n{}", run.context()));
    (run, json)
}

fn args(cmd: &mut Command, extra: &[&str]) {
    // Port 0: another agent may hold the default 9464.
    cmd.args(["check", "--output", "json", "--http-listen", "127.0.0.1:0"]).args(extra);
}

fn finding<'a>(json: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    json["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["check"] == check))
        .unwrap_or_else(|| panic!("no finding {check} in {json:#}"))
}

#[test]
fn check_as_root_probes_every_feature_and_passes() {
    require_root();
    let mut cmd = Command::new(agent_bin());
    args(&mut cmd, &[]);
    let (run, json) = check(cmd);
    assert!(run.status.success(), "{}", run.context());
    assert_eq!(json["ok"], true);
    for probe in [
        "bpf.maps",
        "bpf.perf_event",
        "bpf.perf_event_open",
        "bpf.tp_btf",
        "bpf.raw_tracepoint",
        "bpf.ring_buffer",
        "bpf.bpf_loop",
        "bpf.mmapable_array",
        "bpf.sampler",
        "kernel.version",
        "kernel.btf",
        "capability.CAP_BPF",
        "capability.CAP_PERFMON",
        "cgroup.layout",
        "limits.memlock",
        "kernel.perf_event_paranoid",
        "kernel.kptr_restrict",
    ] {
        assert_eq!(finding(&json, probe)["status"], "ok", "{probe}: {json:#}");
    }
    // This machine's layout (v1 controllers, v2 at /sys/fs/cgroup/unified) or any other, named.
    let layout = finding(&json, "cgroup.layout")["detail"].as_str().unwrap().to_owned();
    let unified = std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists();
    assert_eq!(layout.starts_with("hybrid"), unified, "{layout}");

    // The same report for people: one line per check and a verdict.
    let mut cmd = Command::new(agent_bin());
    cmd.args(["check", "--http-listen", "127.0.0.1:0"]);
    let text = run_command(cmd, TIMEOUT);
    assert!(text.status.success() && text.stdout.contains("This host can run profiler-agent"), "{}", text.context());
    assert!(text.stdout.lines().any(|l| l.starts_with("ok    bpf.bpf_loop")), "{}", text.stdout);
}

#[test]
fn check_without_capabilities_fails_naming_them() {
    require_root();
    let mut cmd = as_nobody_with_caps(&[], &agent_bin());
    args(&mut cmd, &[]);
    let (run, json) = check(cmd);
    assert_eq!(run.status.code(), Some(1), "{}", run.context());
    assert_eq!(json["ok"], false);
    for cap in ["CAP_BPF", "CAP_PERFMON"] {
        let f = finding(&json, &format!("capability.{cap}"));
        assert_eq!(f["status"], "fail", "{f:#}");
        assert!(f["remedy"].as_str().unwrap().contains(cap), "{f:#}");
    }
    assert_eq!(finding(&json, "bpf")["status"], "skip");
    assert!(run.stderr.contains("cannot run profiler-agent"), "{}", run.context());

    // The text form names them too, with what to do.
    let mut cmd = as_nobody_with_caps(&[], &agent_bin());
    cmd.args(["check", "--http-listen", "127.0.0.1:0"]);
    let text = run_command(cmd, TIMEOUT);
    assert_eq!(text.status.code(), Some(1));
    for needle in ["FAIL  capability.CAP_BPF", "FAIL  capability.CAP_PERFMON", "-> run as root", "cannot run"] {
        assert!(text.stdout.contains(needle), "no {needle:?} in:\n{}", text.stdout);
    }
}

#[test]
fn check_tries_exporters_with_timeouts() {
    require_root();
    let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let otlp = format!("http://127.0.0.1:{}", open.local_addr().unwrap().port());
    let pyroscope = format!("http://127.0.0.1:{closed}");
    let mut cmd = Command::new(agent_bin());
    args(&mut cmd, &["--otlp-endpoint", &otlp, "--pyroscope-url", &pyroscope]);
    let (run, json) = check(cmd);
    // An unreachable exporter degrades the agent (it buffers, then drops) but does not stop it.
    assert!(run.status.success(), "{}", run.context());
    assert_eq!(finding(&json, "export.otlp")["status"], "ok", "{json:#}");
    let p = finding(&json, "export.pyroscope");
    assert_eq!(p["status"], "warn", "{p:#}");
    assert_eq!(p["problem"], "exporter-unreachable");
    assert!(p["detail"].as_str().unwrap().contains(&closed.to_string()), "{p:#}");
    assert!(run.elapsed < Duration::from_secs(20), "took {:?}", run.elapsed);
}

#[test]
fn check_fails_on_a_bad_config() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[sampling]\nfrequncy = 19\n").unwrap();
    let mut cmd = Command::new(agent_bin());
    args(&mut cmd, &["--config", config.to_str().unwrap()]);
    let (run, json) = check(cmd);
    assert_eq!(run.status.code(), Some(1), "{}", run.context());
    let f = finding(&json, "config");
    assert_eq!(f["status"], "fail");
    assert_eq!(f["problem"], "config-invalid");
    assert!(f["detail"].as_str().unwrap().contains("frequncy"), "{f:#}");
}
