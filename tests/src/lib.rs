//! Helpers for the integration tests.
//!
//! The tests run the real `profiler-agent` binary (as root) against small
//! workloads that they compile themselves, then check the files it writes.
//!
//! - [`agent`]: where the binary is, and running `record` with a timeout.
//! - [`workload`]: compile a C or Rust program, run it, kill it on drop.
//! - [`folded`]: parse `cpu.folded` and query the stacks.
//! - [`sched`]: off-CPU outputs, scheduler counters, recording windows.
//! - [`unwind`]: the unwind-table summary line, no-frame-pointer checks.
//! - [`cgroup`]: real cgroups (v2 and v1) that look like pods' and services'.

pub mod agent;
pub mod cgroup;
pub mod daemon;
pub mod folded;
pub mod offcpu;
pub mod pprof;
pub mod privilege;
pub mod sched;
pub mod unwind;
pub mod workload;

pub use agent::{agent_bin, record, run_agent, spawn_record, AgentRun, RecordOutput, RunningAgent};
pub use folded::{parse_folded, Folded, Stack};
pub use workload::Workload;

/// Fails (never skips) the calling test when not running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "integration tests need root: run `sudo -E cargo xtask test` (euid is {euid})");
}

/// The workspace root (the parent of this package).
pub fn workspace_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory").to_path_buf()
}
