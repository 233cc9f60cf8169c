//! A `profiler-agent run` daemon under test: started with a 2 s export
//! interval and an ephemeral HTTP port, stopped with SIGTERM, killed on Drop.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::agent_bin;

/// Export interval of daemons under test: short, so a test sees several.
pub const INTERVAL: &str = "2s";

/// A running daemon.
pub struct Daemon(Child);

impl Daemon {
    /// Starts `profiler-agent run ARGS --export-interval 2s --http-listen 127.0.0.1:0`.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon(
            Command::new(agent_bin())
                .arg("run")
                .args(args)
                .args(["--export-interval", INTERVAL, "--http-listen", "127.0.0.1:0"])
                .env("PROFILER_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .expect("start profiler-agent run"),
        )
    }

    /// A daemon started some other way (its own arguments, environment or
    /// stderr), stopped and killed like the others.
    pub fn adopt(child: Child) -> Daemon {
        Daemon(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then the exit status within 20 s.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resident set size in kB (0 if it cannot be read).
    pub fn rss_kb(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
            })
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
