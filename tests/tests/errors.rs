//! Bad invocations: each must fail fast, with a non-zero status and a message
//! on stderr naming what is wrong, before anything is attached or written.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use profiler_integration_tests::agent::{run_command, unused_pid};
use profiler_integration_tests::{agent_bin, require_root, run_agent, AgentRun};

/// Every failing run passes `--duration 30`: an agent that only noticed the
/// problem after recording would take 30 s, so "before attaching anything" is
/// checked as "exits within EARLY_EXIT". Loading eBPF takes well under a second
/// here; 10 s leaves room for a loaded machine.
const EARLY_EXIT: Duration = Duration::from_secs(10);
/// Kill the agent (and fail) if it is still running after this.
const TIMEOUT: Duration = Duration::from_secs(60);

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("profiler-err-").tempdir().expect("tempdir")
}

fn expect_failure(run: &AgentRun, what: &str) {
    assert!(!run.status.success(), "{what}: agent exited successfully\n{}", run.context());
    assert!(
        run.elapsed < EARLY_EXIT,
        "{what}: agent took {:.1?} to fail (limit {EARLY_EXIT:?}): it did not fail before recording\n{}",
        run.elapsed,
        run.context()
    );
}

fn assert_stderr_has(run: &AgentRun, what: &str, needles: &[&str]) {
    let lower = run.stderr.to_lowercase();
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "{what}: stderr does not mention {needle:?}\n{}",
            run.context()
        );
    }
}

fn assert_no_profile(dir: &Path) {
    for name in ["cpu.folded", "cpu.pb.gz", "cpu.svg"] {
        assert!(!dir.join(name).exists(), "{} was written", dir.join(name).display());
    }
}

#[test]
fn nonexistent_pid_is_rejected() {
    require_root();
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let pid = unused_pid().to_string();
    let run = run_agent(&["record", "--pid", &pid, "--duration", "30", "--output-dir", out.to_str().unwrap()], TIMEOUT);
    expect_failure(&run, "nonexistent pid");
    assert_stderr_has(&run, "nonexistent pid", &[&pid]);
    assert_no_profile(&out);
}

#[test]
fn output_dir_below_regular_file_is_rejected() {
    require_root();
    let tmp = tempdir();
    let file = tmp.path().join("regular-file");
    std::fs::write(&file, b"not a directory\n").unwrap();
    let out = file.join("profile");
    let out_str = out.to_str().unwrap();
    let run = run_agent(&["record", "--duration", "30", "--output-dir", out_str], TIMEOUT);
    expect_failure(&run, "output dir below a regular file");
    assert_stderr_has(&run, "output dir below a regular file", &[out_str]);
    assert!(file.is_file(), "{} is no longer a regular file", file.display());
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory\n", "file was modified");
    let entries: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec!["regular-file"], "agent created files next to it");
}

#[test]
fn output_dir_in_proc_is_rejected() {
    require_root();
    let out = "/proc/profiler-test-dir";
    let run = run_agent(&["record", "--duration", "30", "--output-dir", out], TIMEOUT);
    expect_failure(&run, "output dir in /proc");
    assert_stderr_has(&run, "output dir in /proc", &[out]);
    assert!(!Path::new(out).exists(), "{out} exists");
}

#[test]
fn unknown_format_is_rejected() {
    require_root();
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let run = run_agent(
        &["record", "--format", "folded,bogus", "--duration", "30", "--output-dir", out.to_str().unwrap()],
        TIMEOUT,
    );
    expect_failure(&run, "unknown format");
    assert_stderr_has(&run, "unknown format", &["bogus", "folded", "pprof", "svg"]);
    assert_no_profile(&out);
}

#[test]
fn bad_duration_is_rejected() {
    require_root();
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let run = run_agent(&["record", "--duration", "abc", "--output-dir", out.to_str().unwrap()], TIMEOUT);
    expect_failure(&run, "bad duration");
    assert_stderr_has(&run, "bad duration", &["abc", "duration"]);
    assert_no_profile(&out);
}

/// How to run a command as `nobody` with no capabilities, if possible.
fn as_nobody() -> Option<Command> {
    let exists = |p: &str| Path::new(p).is_file();
    for setpriv in ["/usr/bin/setpriv", "/bin/setpriv"] {
        if exists(setpriv) {
            let mut cmd = Command::new(setpriv);
            cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]);
            return Some(cmd);
        }
    }
    for runuser in ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"] {
        if exists(runuser) {
            let mut cmd = Command::new(runuser);
            cmd.args(["-u", "nobody", "--"]);
            return Some(cmd);
        }
    }
    None
}

#[test]
fn unprivileged_user_is_told_which_capabilities() {
    require_root();
    let Some(mut cmd) = as_nobody() else {
        eprintln!("SKIPPED: neither setpriv nor runuser is installed; cannot drop to nobody");
        return;
    };
    // A copy of the agent and an output location that nobody can reach.
    let tmp = tempdir();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = tmp.path().join("profiler-agent");
    std::fs::copy(agent_bin(), &bin).expect("copy agent");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let writable = tmp.path().join("writable");
    std::fs::create_dir(&writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = writable.join("out");

    cmd.arg(&bin).args(["record", "--duration", "30", "--output-dir"]).arg(&out).current_dir(&writable);
    let run = run_command(cmd, TIMEOUT);
    expect_failure(&run, "unprivileged");
    assert_stderr_has(&run, "unprivileged", &["CAP_BPF", "CAP_PERFMON"]);
    assert_no_profile(&out);
}
