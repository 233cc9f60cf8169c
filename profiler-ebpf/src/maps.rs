//! Maps and read-only globals shared by the programs.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use profiler_common::{Stat, MAX_FILTER_PIDS, STAT_COUNT};

/// Set by the agent at load time: non-zero when only the tgids in
/// [`TARGET_PIDS`] and the cgroups of `filter::TARGET_CGROUPS` are sampled.
#[no_mangle]
static FILTER_PIDS: u32 = 0;

/// Samples to user space. The agent sizes it at load time for the CPU count
/// and frequency (see `bpf::loader::ring_buffer_bytes`); this is the ceiling.
#[map]
pub static SAMPLES: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Set by the agent: fill level at which a submit wakes the agent instead
/// of waiting for its next poll (a quarter of the ring buffer).
#[no_mangle]
static SAMPLES_WAKEUP_BYTES: u64 = 2 * 1024 * 1024;

#[inline(always)]
pub fn samples_wakeup_bytes() -> u64 {
    unsafe { core::ptr::read_volatile(&SAMPLES_WAKEUP_BYTES) }
}

/// The `--pid` set. Value unused.
#[map]
pub static TARGET_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_PIDS, 0);

/// Per-CPU counters indexed by [`Stat`]; per-CPU so counting never contends.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot and programs do not nest on one CPU for this event, so a
        // plain add is race free.
        unsafe { *v += 1 };
    }
}

/// Whether a sample of `tgid` should be taken. Cheap checks come first so
/// filtered processes cost no unwinding.
#[inline(always)]
pub fn wanted(tgid: u32) -> bool {
    let filter = unsafe { core::ptr::read_volatile(&FILTER_PIDS) };
    if filter == 0 {
        return true;
    }
    let listed = unsafe { TARGET_PIDS.get(&tgid).is_some() };
    listed || crate::filter::in_target_cgroup(tgid)
}
