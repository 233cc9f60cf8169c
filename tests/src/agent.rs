//! Locating and running the real `profiler-agent` binary.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::folded::{parse_folded, Folded};

/// Upper bound for one `record` run (recording + symbolization + writing).
/// Tests record for at most a few seconds; this only catches hangs.
pub const RECORD_TIMEOUT: Duration = Duration::from_secs(120);

/// The agent binary: `$PROFILER_AGENT_BIN`, else `<workspace>/target/release/profiler-agent`.
pub fn agent_bin() -> PathBuf {
    let path = match std::env::var_os("PROFILER_AGENT_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => crate::workspace_dir().join("target/release/profiler-agent"),
    };
    assert!(
        path.is_file(),
        "profiler-agent binary not found at {}: run `cargo xtask test` \
         (it builds the agent and sets PROFILER_AGENT_BIN)",
        path.display()
    );
    path
}

/// Result of a finished agent (or any) command.
#[derive(Debug)]
pub struct AgentRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl AgentRun {
    /// Status, time and output, for assertion messages.
    pub fn context(&self) -> String {
        format!(
            "exit status: {}, elapsed: {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Output of `profiler-agent record`.
#[derive(Debug)]
pub struct RecordOutput {
    /// The `--output-dir` passed to the agent (`<tempdir>/out`).
    pub dir: PathBuf,
    pub stderr: String,
    pub stdout: String,
    pub status: ExitStatus,
    pub elapsed: Duration,
    _tmp: TempDir,
}

impl RecordOutput {
    pub fn context(&self) -> String {
        format!(
            "exit status: {}, elapsed: {:.2?}, output dir: {}\n--- stderr ---\n{}",
            self.status,
            self.elapsed,
            self.dir.display(),
            self.stderr
        )
    }

    /// Panics (with the agent's stderr) unless the agent exited with 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "profiler-agent record failed\n{}", self.context());
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads an output file, panicking with context if it is missing.
    pub fn read(&self, name: &str) -> Vec<u8> {
        let path = self.path(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}\n{}", path.display(), self.context()))
    }

    /// Parses `cpu.folded`.
    pub fn folded(&self) -> Folded {
        let bytes = self.read("cpu.folded");
        let text =
            String::from_utf8(bytes).unwrap_or_else(|e| panic!("cpu.folded is not UTF-8: {e}\n{}", self.context()));
        parse_folded(&text)
    }
}

/// A `record` run in progress (for the signal tests).
pub struct RunningAgent {
    child: Option<Child>,
    out: PathBuf,
    stdout: File,
    stderr: File,
    start: Instant,
    tmp: Option<TempDir>,
}

impl RunningAgent {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent still owned").id()
    }

    /// True while the agent has not exited.
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("agent still owned");
        child.try_wait().expect("try_wait agent").is_none()
    }

    /// Waits until the agent holds a perf_event or bpf_link file descriptor,
    /// i.e. sampling has been set up; returns when that was seen, or None if
    /// the agent exited or `timeout` passed first.
    pub fn wait_attached(&mut self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.is_running() {
            if sampling_fds(self.pid()) > 0 {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Sends `sig` (e.g. `libc::SIGINT`) to the agent.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed: {}", std::io::Error::last_os_error());
    }

    /// Waits for the agent to exit (killing it and panicking after `timeout`).
    pub fn wait(mut self, timeout: Duration) -> RecordOutput {
        let mut child = self.child.take().expect("agent still owned");
        let status = wait_timeout(&mut child, timeout, self.start, &mut self.stderr);
        RecordOutput {
            dir: self.out.clone(),
            stdout: read_all(&mut self.stdout),
            stderr: read_all(&mut self.stderr),
            status,
            elapsed: self.start.elapsed(),
            _tmp: self.tmp.take().expect("tempdir still owned"),
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `profiler-agent record <args> --output-dir <fresh tempdir>/out`.
pub fn spawn_record(args: &[&str]) -> RunningAgent {
    let tmp = tempfile::Builder::new().prefix("profiler-it-").tempdir().expect("create tempdir");
    let out = tmp.path().join("out");
    let mut cmd = Command::new(agent_bin());
    cmd.arg("record").args(args).arg("--output-dir").arg(&out);
    cmd.current_dir(tmp.path());
    let (stdout, stderr) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    cmd.stdin(Stdio::null()).stdout(stdout.try_clone().unwrap()).stderr(stderr.try_clone().unwrap());
    let start = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    RunningAgent { child: Some(child), out, stdout, stderr, start, tmp: Some(tmp) }
}

/// Runs `profiler-agent record <args> --output-dir <fresh tempdir>/out` to completion.
pub fn record(args: &[&str]) -> RecordOutput {
    spawn_record(args).wait(RECORD_TIMEOUT)
}

/// Runs the agent with exactly `args` (no subcommand or output dir added).
pub fn run_agent(args: &[&str], timeout: Duration) -> AgentRun {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args);
    run_command(cmd, timeout)
}

/// Runs any command with stdin closed, capturing stdout and stderr.
pub fn run_command(mut cmd: Command, timeout: Duration) -> AgentRun {
    let (mut stdout, mut stderr) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    cmd.stdin(Stdio::null()).stdout(stdout.try_clone().unwrap()).stderr(stderr.try_clone().unwrap());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let status = wait_timeout(&mut child, timeout, start, &mut stderr);
    AgentRun { status, stdout: read_all(&mut stdout), stderr: read_all(&mut stderr), elapsed: start.elapsed() }
}

fn wait_timeout(child: &mut Child, timeout: Duration, start: Instant, stderr: &mut File) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command (pid {}) did not exit within {timeout:?}; killed it\n--- stderr ---\n{}",
                child.id(),
                read_all(stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_all(file: &mut File) -> String {
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0)).expect("seek captured output");
    file.read_to_end(&mut buf).expect("read captured output");
    String::from_utf8_lossy(&buf).into_owned()
}

/// How many perf_event or bpf_link file descriptors process `pid` has open.
/// A BPF program attached to perf events shows as one or the other (aya keeps
/// only the bpf_link fd when the kernel supports perf links).
pub fn sampling_fds(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.as_os_str() == "anon_inode:[perf_event]" || t.as_os_str() == "anon_inode:bpf_link")
        .count()
}

/// A pid that no process uses right now (highest free one below `pid_max`).
pub fn unused_pid() -> u32 {
    let max: u32 =
        std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(32768);
    (2..max).rev().find(|pid| !Path::new(&format!("/proc/{pid}")).exists()).expect("some pid is free")
}
