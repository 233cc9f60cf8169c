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

/// Block sites remembered per thread. Real services block at a few places
/// in turn (a read, a write, a timer, a futex); with one remembered site
/// every change of place re-captured both stacks, which cost a multi-site
/// load 1050 ns per switch. With four, the multi-site load of `cargo xtask
/// bench offcpu` (a client blocking at four places, five counting a
/// contended mutex inside the condition variable) still missed on every
/// block (round-robin replacement cycling through five sites): eight leave
/// room. 8 x 32 bytes per thread: 22 MB of kernel memory for the 65536
/// threads the map holds.
pub const BLOCK_SITES: usize = 8;

/// A place a thread blocked at, and the stacks captured there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockSite {
    /// Fingerprint of the user registers and return addresses at kernel
    /// entry; 0 for an empty slot.
    pub fingerprint: u64,
    pub kernel_stack: u64,
    pub user_stack: u64,
    /// Blocks served from this capture since it was taken.
    pub reused: u32,
    /// When it was taken, in units of 2^20 ns (wraps).
    pub taken: u32,
}

const _: () = assert!(core::mem::size_of::<BlockSite>() == 32);

/// [`ThreadState::flags`]: the thread was found blocked by the start scan
/// (blocked before recording began); its user stack is unwound by the agent.
pub const THREAD_FOUND_BLOCKED: u32 = 1;

/// What the scheduler programs know about one thread, in the
/// `THREAD_SLOTS` array from its first scheduling event until it exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadState {
    // What every scheduling event reads or writes comes first, within
    // 88 bytes: a slot then spans two cache lines on most events rather
    // than five, and after an idle period (a VM's vCPU descheduled) each
    // line can be a miss. What only a captured block uses follows.
    /// The thread that owns this slot; 0 for a free slot.
    pub tid: u32,
    /// `THREAD_*` bits.
    pub flags: u32,
    /// When it started waiting on a run queue; 0 when it is not waiting.
    pub runq_start_ns: u64,
    /// When it blocked, or the last interval cut while it stayed blocked
    /// (time before that was already counted); 0 when it is not blocked.
    pub block_start_ns: u64,
    /// When the current (or last) block began, for the minimum block
    /// duration and the histogram.
    pub blocked_since_ns: u64,
    /// What the current block's time is multiplied by in the aggregate:
    /// 1 when every block is recorded, N for a block sampled one in N
    /// (`--off-cpu-sample`), 0 for a block left unsampled.
    pub weight: u32,
    /// Blocks and blocked time not yet added to `THREAD_TOTALS` (sampled
    /// mode only): added at a cut (the agent reads the totals after one)
    /// and when it exits, so no block costs a hash update.
    pub pending_blocks: u32,
    pub pending_ns: u64,
    /// Latency histogram entries not yet added to the process's
    /// `HISTOGRAMS` entry, per kind ([`HIST_RUNQ`], [`HIST_OFFCPU`]): up to
    /// [`HIST_BATCH`] bucket indices packed a byte each ([`hist_batch_push`]),
    /// their count and their largest value. Added when either kind holds
    /// `HIST_BATCH`, when the agent reads the histograms ([`SCAN_FLUSH`])
    /// and when the thread exits, so most events cost no hash lookup.
    pub hist_count: [u32; 2],
    pub hist_pending: [u64; 2],
    pub hist_max: [u64; 2],
    /// Stack ids of the current (or last) block.
    pub kernel_stack: u64,
    pub user_stack: u64,
    /// The slot the next new site replaces (round robin).
    pub next_site: u32,
    /// The slot of the current block's site (BLOCK_SITES: none). Goes
    /// through memory so the verifier sees one unknown index rather than
    /// following each slot's path separately.
    pub site: u32,
    /// Non-zero when the thread's last capture found it running Python
    /// code: its stacks are then never reused.
    pub python: u32,
    pub _pad: u32,
    /// The current block's fingerprint, kept while its stacks are captured.
    pub fingerprint: u64,
    pub comm: [u8; COMM_LEN],
    /// Recent block sites, reused when the fingerprint matches.
    pub sites: [BlockSite; BLOCK_SITES],
}

const _: () = assert!(core::mem::size_of::<ThreadState>() == 144 + 32 * BLOCK_SITES);
const _: () = assert!(core::mem::offset_of!(ThreadState, hist_max) + 16 == 88);

/// A thread's exact blocked time in the recording window, every block
/// counted, sampled or not: what `--off-cpu-sample` scales the thread's
/// sampled stacks to. Keyed by tid; read and cleared by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTotal {
    pub tgid: u32,
    pub _pad: u32,
    pub ns: u64,
    pub blocks: u64,
}

const _: () = assert!(core::mem::size_of::<ThreadTotal>() == 24);

/// In sampled mode, a block left unsampled that is still going on at a cut
/// after this long has its stacks taken there (by the task iterator, as
/// for a thread found blocked) and is counted whole from then on: a hung
/// thread shows under its blocking stack however the coin fell, and a
/// still-blocked thread is snapshotted once, not at every cut.
pub const LONG_BLOCK_NS: u64 = 1_000_000_000;

/// Slots of the per-thread table, a power of two. A thread takes the first
/// free slot of its probe sequence ([`thread_slot`]); where pid_max is at
/// most `THREAD_SLOTS` (32768 by default on machines with up to 32 CPUs)
/// that is always the first.
pub const THREAD_SLOTS: u32 = 65_536;
pub const THREAD_PROBES: u32 = 4;

/// The slot a thread's probe sequence visits at step `k`. The stride is
/// odd and far from 1: tids are handed out in sequence, and a thread
/// displaced into its neighbour's home slot would displace the neighbour.
pub const fn thread_slot(tid: u32, k: u32) -> u32 {
    tid.wrapping_add(k.wrapping_mul(40_503)) & (THREAD_SLOTS - 1)
}

/// Stack id the start scan gives the user stack of a thread it found
/// blocked: even, so it never equals a content hash (those are odd). The
/// agent unwinds that stack from [`BlockedRegs`] and stores it under it.
pub const fn found_blocked_stack_id(tid: u32) -> u64 {
    (tid as u64) << 1
}

/// User registers of a thread found blocked by the start scan, for the
/// agent to unwind (a blocked thread's user memory can only be read from
/// user space, with `process_vm_readv`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedRegs {
    pub tgid: u32,
    pub _pad: u32,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

const _: () = assert!(core::mem::size_of::<BlockedRegs>() == 32);

/// Slots of the `SCAN` array the agent sets before running the task
/// iterator: the time it counts from or up to, and what it does.
pub const SCAN_TIME: u32 = 0;
pub const SCAN_MODE: u32 = 1;
/// The recording window (CLOCK_MONOTONIC ns), read by the switch program
/// and the cut: blocked time before `SCAN_WINDOW_START` or after
/// `SCAN_WINDOW_END` (0: open) is not counted, so off-CPU time covers the
/// same window as the on-CPU samples.
pub const SCAN_WINDOW_START: u32 = 2;
pub const SCAN_WINDOW_END: u32 = 3;
/// Entries of the `SCAN` array.
pub const SCAN_SLOTS: u32 = 4;
/// Find threads blocked before recording started: they get a `THREADS`
/// entry blocked since `SCAN_TIME`, their kernel stack and their registers.
pub const SCAN_FIND_BLOCKED: u64 = 1;
/// Cut: every thread still blocked has its blocked time up to `SCAN_TIME`
/// added to `STILL_BLOCKED`, and counts from `SCAN_TIME` on.
pub const SCAN_CUT: u64 = 2;
/// Flush: every thread's batched latency histogram entries
/// ([`ThreadState::hist_pending`]) are added to `HISTOGRAMS`, before the
/// agent reads it.
pub const SCAN_FLUSH: u64 = 3;

/// A small ring buffer record: the switch program met a process whose
/// unwind tables are not loaded. Told apart from samples by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessNotice {
    pub kind: u32,
    pub tgid: u32,
}

pub const NOTICE_NO_TABLES: u32 = 1;

const _: () = assert!(core::mem::size_of::<ProcessNotice>() == 8);

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

/// Both latency histograms of one process ([`HIST_RUNQ`], [`HIST_OFFCPU`]):
/// one map entry, so a switch-in that ends a block and its run-queue wait
/// looks the process up once, not twice.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessHistograms {
    pub kinds: [Histogram; 2],
}

const _: () = assert!(core::mem::size_of::<ProcessHistograms>() == 2 * core::mem::size_of::<Histogram>());

impl ProcessHistograms {
    /// Whether the histogram of `kind` holds nothing.
    pub fn is_empty(&self, kind: usize) -> bool {
        self.kinds[kind].buckets.iter().all(|&b| b == 0)
    }
}

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

/// Histogram entries a thread batches per kind before adding them to its
/// process's histograms (one bucket index per byte of a `u64`).
pub const HIST_BATCH: u32 = 8;

/// `packed` (holding `count` < [`HIST_BATCH`] bucket indices) with
/// `bucket` added as the next one.
#[inline(always)]
pub const fn hist_batch_push(packed: u64, count: u32, bucket: usize) -> u64 {
    packed | ((bucket as u64 & 0xff) << (8 * (count & (HIST_BATCH - 1))))
}

/// The `i`-th bucket index of a packed batch.
#[inline(always)]
pub const fn hist_batch_get(packed: u64, i: u32) -> usize {
    ((packed >> (8 * (i & (HIST_BATCH - 1)))) & (HIST_BUCKETS as u64 - 1)) as usize
}

const _: () = assert!(HIST_BUCKETS <= 256 && HIST_BUCKETS.is_power_of_two());

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
    unsafe impl aya::Pod for BlockedRegs {}
    unsafe impl aya::Pod for ThreadTotal {}
    unsafe impl aya::Pod for ProcessNotice {}
    unsafe impl aya::Pod for Histogram {}
    unsafe impl aya::Pod for ProcessHistograms {}
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

    /// A batch gives back every bucket pushed, in order, for any values.
    #[test]
    fn histogram_batches_keep_every_bucket() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1000 {
            let mut packed = 0;
            let mut want = [0usize; HIST_BATCH as usize];
            for (i, w) in want.iter_mut().enumerate() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Values across the whole range, zero and the top bucket included.
                let ns = seed >> (seed % 64);
                *w = hist_bucket(ns);
                packed = hist_batch_push(packed, i as u32, *w);
            }
            for (i, w) in want.iter().enumerate() {
                assert_eq!(hist_batch_get(packed, i as u32), *w, "entry {i} of {packed:#x}");
            }
        }
    }

    /// Below `THREAD_SLOTS` every tid has its own home slot; above, the
    /// probes of one tid are distinct and do not land in the home slots of
    /// the tids next to it (tids are handed out in sequence).
    #[test]
    fn thread_slots_probe_apart_from_neighbours() {
        for tid in [0, 1, 300, 32_767, THREAD_SLOTS - 1] {
            assert_eq!(thread_slot(tid, 0), tid);
        }
        for tid in [1, 65_536, 65_537, 4_194_303, u32::MAX] {
            let probes: [u32; THREAD_PROBES as usize] = core::array::from_fn(|k| thread_slot(tid, k as u32));
            for (i, p) in probes.iter().enumerate() {
                assert!(*p < THREAD_SLOTS);
                assert!(!probes[..i].contains(p), "tid {}: probes {:?} repeat", tid, probes);
                if i > 0 {
                    for near in 1..=64u32 {
                        assert_ne!(
                            *p,
                            thread_slot(tid.wrapping_add(near), 0),
                            "tid {tid}: probe {i} is tid+{near}'s home"
                        );
                        assert_ne!(
                            *p,
                            thread_slot(tid.wrapping_sub(near), 0),
                            "tid {tid}: probe {i} is tid-{near}'s home"
                        );
                    }
                }
            }
        }
    }
}
