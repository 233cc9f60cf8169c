//! `cargo xtask run -- ARGS`: build the release agent and replace this process
//! with it, so Ctrl-C and SIGTERM reach the agent directly and its exit status
//! is ours.

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result};

use crate::{build, is_root, step};

pub fn run(args: &[String]) -> Result<()> {
    if !is_root() {
        eprintln!(
            "warning: profiler-agent needs root, or CAP_BPF + CAP_PERFMON to load and attach its BPF \
             programs (plus CAP_SYS_PTRACE to symbolize other users' processes and CAP_SYSLOG for \
             kernel symbols); running it anyway, it says what is missing. \
             To run it as root: `sudo -E cargo xtask run -- ...`"
        );
    }
    let bin = build::run(true)?;
    step(format!("run: {} {}", bin.display(), args.join(" ")));
    let err = std::process::Command::new(&bin).args(args).exec();
    Err(err).with_context(|| format!("cannot execute {}", bin.display()))
}
