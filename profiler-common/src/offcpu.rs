//! Off-CPU and scheduler-latency types. The kernel aggregates blocked time
//! per (thread, kernel stack, user stack) and keeps log2 latency histograms
//! per process; the agent reads and clears them.

use crate::{COMM_LEN, MAX_STACK_DEPTH};

/// Number of log2 buckets: bucket `i` holds values in `[2^(i-1), 2^i)` ns
/// (bucket 0 holds 0), which covers every u64.
pub const HIST_BUCKETS: usize = 64;

/// Histogram of run-queue latency: wakeup or preemption -> on CPU.
pub const HIST_RUNQ: u32 = 0;
/// Histogram of off-CPU (blocked) durations: blocked switch-out -> on CPU.
pub const HIST_OFFCPU: u32 = 1;

/// A captured stack, stored once per distinct content in the `STACKS` map
/// under its 64-bit hash. Entries are innermost first.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackTrace {
    pub len: u32,
    pub _pad: u32,
    pub ips: [u64; MAX_STACK_DEPTH],
}

const _: () = assert!(core::mem::size_of::<StackTrace>() == 8 + 8 * MAX_STACK_DEPTH);

impl StackTrace {
    /// The valid frames.
    pub fn frames(&self) -> &[u64] {
        &self.ips[..(self.len as usize).min(MAX_STACK_DEPTH)]
    }
}

/// Key of the off-CPU aggregate. A stack id of 0 means "no stack"
/// (capture failed, or kernel-only task).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OffCpuKey {
    pub tgid: u32,
    pub tid: u32,
    pub kernel_stack: u64,
    pub user_stack: u64,
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(core::mem::size_of::<OffCpuKey>() == 40);

/// Blocked time of one key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuValue {
    pub total_ns: u64,
    pub count: u64,
}

const _: () = assert!(core::mem::size_of::<OffCpuValue>() == 16);

/// What the scheduler programs know about one thread, in the `THREADS`
/// map from its first scheduling event until it exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadState {
    /// When it started waiting on a run queue; 0 when it is not waiting.
    pub runq_start_ns: u64,
    /// When it blocked; 0 when it is not blocked.
    pub block_start_ns: u64,
    /// Stack ids of its last capture.
    pub kernel_stack: u64,
    pub user_stack: u64,
    /// Fingerprint of the user registers and return addresses at that
    /// capture; a block with the same fingerprint reuses its stacks.
    pub fingerprint: u64,
    /// Blocks served from the last capture since it was taken.
    pub reused: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(core::mem::size_of::<ThreadState>() == 64);

/// Key of the per-process histograms.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HistKey {
    pub tgid: u32,
    /// [`HIST_RUNQ`] or [`HIST_OFFCPU`].
    pub kind: u32,
}

const _: () = assert!(core::mem::size_of::<HistKey>() == 8);

/// A log2 histogram of nanoseconds, plus its maximum.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Histogram {
    pub buckets: [u64; HIST_BUCKETS],
    pub max_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Histogram>() == 8 * (HIST_BUCKETS + 1));

/// The bucket of a value: the number of significant bits, so 0 -> 0,
/// 1 -> 1, 2..3 -> 2, 4..7 -> 3, ...; values of 2^62 ns (146 years) and
/// more share the last bucket.
#[inline(always)]
pub const fn hist_bucket(ns: u64) -> usize {
    let bits = (64 - ns.leading_zeros()) as usize;
    if bits > HIST_BUCKETS - 1 {
        HIST_BUCKETS - 1
    } else {
        bits
    }
}

/// The smallest value of a bucket.
pub const fn hist_bucket_floor(bucket: usize) -> u64 {
    if bucket == 0 {
        0
    } else {
        1 << (bucket - 1)
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for StackTrace {}
    unsafe impl aya::Pod for OffCpuKey {}
    unsafe impl aya::Pod for OffCpuValue {}
    unsafe impl aya::Pod for ThreadState {}
    unsafe impl aya::Pod for HistKey {}
    unsafe impl aya::Pod for Histogram {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2() {
        assert_eq!(hist_bucket(0), 0);
        assert_eq!(hist_bucket(1), 1);
        assert_eq!(hist_bucket(2), 2);
        assert_eq!(hist_bucket(3), 2);
        assert_eq!(hist_bucket(4), 3);
        assert_eq!(hist_bucket(1_000_000), 20);
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(hist_bucket(1 << 62), HIST_BUCKETS - 1);
        assert_eq!(hist_bucket((1 << 62) - 1), 62);
        for b in 1..HIST_BUCKETS - 1 {
            assert_eq!(hist_bucket(hist_bucket_floor(b)), b);
            assert_eq!(hist_bucket(hist_bucket_floor(b + 1) - 1), b);
        }
    }
}
