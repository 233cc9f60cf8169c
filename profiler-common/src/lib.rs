//! Types shared by the kernel programs (`profiler-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and has its size
//! pinned by a compile-time assert: the kernel side and the user side are built
//! by different compilers for different targets, so a silent layout change would
//! corrupt every sample. Integers are used instead of `bool` for the same reason.
#![no_std]

pub mod offcpu;
pub mod process;
pub mod python;
pub mod sample;
pub mod stats;
pub mod unwind;

pub use sample::{
    Sample, MAX_STACK_DEPTH, SAMPLE_FLAG_KERNEL_TRUNCATED, SAMPLE_FLAG_UNKNOWN_MAPPING, SAMPLE_FLAG_USER_PARTIAL,
    SAMPLE_FLAG_USER_TRUNCATED,
};
pub use stats::{Stat, STAT_COUNT};

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Maximum number of processes the in-kernel `--pid` filter can hold.
pub const MAX_FILTER_PIDS: u32 = 1024;

/// Maximum number of cgroups the in-kernel target filter can hold
/// (`--cgroup`, and the cgroups of selected containers and pods).
pub const MAX_FILTER_CGROUPS: u32 = 256;
