//! Helpers of the off-CPU tests (tests/tests/offcpu*.rs): building C
//! workloads on [`COUNTERS_C`], the agent's arguments and summary.

use std::time::Duration;

use crate::sched::{parse_sched_summary, SchedSummary, COUNTERS_C};
use crate::workload::C_FP_FLAGS;
use crate::{RecordOutput, Workload};

/// Length of each recording.
pub const DURATION: Duration = Duration::from_secs(5);

/// Allowed relative error of recorded blocked time against the blocked time
/// the workload measured itself. The agent measures switch-out -> switch-in
/// with the kernel clock, the workload syscall entry -> return: they differ
/// by the syscall entry/exit (microseconds per 10 ms block, < 0.1%) plus the
/// window edges (< 0.4%, see the module comment). 10% leaves room for a
/// loaded VM while still catching lost or double-counted blocks.
pub const BLOCKED_TOLERANCE: f64 = 0.10;

/// gcc flags of the workloads: frame pointers, threads.
pub fn c_flags() -> Vec<&'static str> {
    let mut flags = C_FP_FLAGS.to_vec();
    flags.push("-pthread");
    flags
}

/// Compiles `body` after [`COUNTERS_C`] and starts it.
pub fn start(name: &str, body: &str) -> Workload {
    Workload::c(name, &format!("{COUNTERS_C}{body}"), &c_flags())
}

/// `--off-cpu --pid PID` of `w`.
pub fn pid_args(w: &Workload) -> Vec<String> {
    vec!["--off-cpu".into(), "--pid".into(), w.pid_arg()]
}

/// Borrows owned arguments.
pub fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The scheduler summary of a recording; panics with its output if absent.
pub fn summary(out: &RecordOutput) -> SchedSummary {
    parse_sched_summary(&out.stderr).unwrap_or_else(|| panic!("no scheduler summary in stderr\n{}", out.context()))
}

/// (got - want) / want.
pub fn relative_error(got: f64, want: f64) -> f64 {
    (got - want) / want
}

/// Nanoseconds as milliseconds, for messages.
pub fn ms(ns: f64) -> String {
    format!("{:.1} ms", ns / 1e6)
}

/// The threads of `pid` other than its main thread.
pub fn secondary_threads(pid: u32) -> Vec<u32> {
    crate::sched::thread_ids(pid).into_iter().filter(|&t| t != pid).collect()
}
