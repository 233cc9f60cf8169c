//! Recording without `--duration` until SIGINT (Ctrl-C) or SIGTERM: the agent
//! must exit 0 and write what it collected.

use std::time::Duration;

use profiler_integration_tests::workload::{BUSY_C, C_FP_FLAGS};
use profiler_integration_tests::{require_root, spawn_record, Workload};

/// How long the agent records before the signal.
const RECORD_FOR: Duration = Duration::from_secs(2);
/// Time allowed from the signal to exit (symbolization + writing files).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn stop_with(signal: i32, name: &str) {
    require_root();
    let mut w = Workload::c(name, BUSY_C, C_FP_FLAGS);
    w.warm_up();
    let mut agent = spawn_record(&["--pid", &w.pid_arg()]);
    std::thread::sleep(RECORD_FOR);
    assert!(agent.is_running(), "agent exited before the signal\n{}", agent.wait(STOP_TIMEOUT).context());
    agent.signal(signal);
    let out = agent.wait(STOP_TIMEOUT);
    assert!(out.status.success(), "agent stopped by signal {signal} should exit 0\n{}", out.context());
    let folded = out.folded();
    let p = folded.process(name);
    assert!(p.total() > 0, "cpu.folded has no samples for {name}:\n{}\n{}", folded.top(10), out.context());
    assert!(p.count_with_subsequence(&["main", "busy_loop"]) > 0, "no {name} stack has main;busy_loop:\n{}", p.top(10));
    eprintln!("{name}: {} samples in ~{RECORD_FOR:?}", p.total());
}

#[test]
fn sigint_writes_collected_profile() {
    stop_with(libc::SIGINT, "sigint_target");
}

#[test]
fn sigterm_writes_collected_profile() {
    stop_with(libc::SIGTERM, "sigterm_target");
}
