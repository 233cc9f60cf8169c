//! The per-thread table: each traced thread's `ThreadState`, from its
//! first scheduling event until it exits.

use aya_ebpf::{macros::map, maps::Array};
use profiler_common::{
    offcpu::{thread_slot, ThreadState, THREAD_PROBES, THREAD_SLOTS},
    Stat,
};

use crate::maps::count;

/// Per-thread state (25 MiB), found by [`find_thread`].
#[map]
static THREADS: Array<ThreadState> = Array::with_max_entries(THREAD_SLOTS, 0);

/// Frees a thread's slot. Zeroed whole, tid included: the slot is free and
/// clean for the next thread. In place: a default value would be built on
/// the 512-byte BPF stack first.
#[inline(always)]
pub(super) fn forget(t: &mut ThreadState) {
    unsafe { core::ptr::write_bytes(t as *mut ThreadState, 0, 1) };
}

#[inline(always)]
fn slot(tid: u32, k: u32) -> Option<*mut ThreadState> {
    THREADS.get_ptr_mut(thread_slot(tid, k))
}

/// The thread's state, if it has one.
#[inline(always)]
pub(super) fn find_thread(tid: u32) -> Option<*mut ThreadState> {
    for k in 0..THREAD_PROBES {
        if let Some(t) = slot(tid, k) {
            if unsafe { core::ptr::read_volatile(&(*t).tid) } == tid {
                return Some(t);
            }
        }
    }
    None
}

/// A free slot for `tid`, claimed: the first of its probe sequence. Two
/// CPUs claiming one slot for two tids that share it at the same instant
/// would both write it (BPF has no compare-and-swap at this program's
/// instruction set level); the loser's next event finds it taken and
/// claims another, losing the one block it had started.
#[inline(always)]
pub(super) fn claim_thread(tid: u32) -> Option<*mut ThreadState> {
    for k in 0..THREAD_PROBES {
        if let Some(t) = slot(tid, k) {
            if unsafe { core::ptr::read_volatile(&(*t).tid) } == 0 {
                unsafe { core::ptr::write_volatile(&mut (*t).tid, tid) };
                return Some(t);
            }
        }
    }
    count(Stat::ThreadMapFull);
    None
}

/// The thread's state, created on first use.
///
/// `THREADS` was a hash map of 65536 entries. As this array, under `perf
/// bench sched pipe` pinned to one CPU while `record --off-cpu` ran
/// (bpf_stats, 2-CPU VM, three runs each, fingerprint by plain loads in
/// both): sched_switch 467-483 -> 414-434 ns per run, sched_wakeup 170-177
/// -> 124-128. The array holds fewer threads where pid_max is large (a
/// thread whose `THREAD_PROBES` slots are all taken is counted in
/// `thread_map_full` and not traced), and costs what the preallocated hash
/// map did (22 MiB then; 25 MiB since threads batch histogram entries).
#[inline(always)]
pub(super) fn thread(tid: u32) -> Option<*mut ThreadState> {
    find_thread(tid).or_else(|| claim_thread(tid))
}
