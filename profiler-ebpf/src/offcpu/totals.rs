//! Sampled mode's exact per-thread totals: every block's time, sampled or
//! not, kept pending in the thread's state and added to `THREAD_TOTALS` at
//! a cut and when it exits (`super::retire`). The agent reads the totals
//! only after a cut, so no block pays for a hash update.

use aya_ebpf::{macros::map, maps::HashMap};
use profiler_common::{
    offcpu::{ThreadState, ThreadTotal},
    Stat,
};

use super::{atomic_add, BPF_NOEXIST};
use crate::maps::count;

/// Exact blocked time per thread in sampled mode (see [`ThreadTotal`]).
/// Read and cleared by the agent at every read of `OFFCPU`; a thread
/// that exits leaves its last total here until then.
#[map]
static THREAD_TOTALS: HashMap<u32, ThreadTotal> = HashMap::with_max_entries(32_768, 0);

/// Adds a thread's pending blocks and time to its `THREAD_TOTALS` entry.
/// Left pending when the map is full (counted), for a later flush once the
/// agent has emptied it. The cut flushes from the task iterator, possibly
/// while the thread's switch-in adds on another CPU: a block ending in
/// those few instructions can be lost from the total (BPF has no
/// compare-and-swap at this program's instruction set level).
#[inline(always)]
pub(super) fn flush_total(t: &mut ThreadState, tgid: u32) {
    let (ns, blocks) = (t.pending_ns, t.pending_blocks as u64);
    if ns == 0 && blocks == 0 {
        return;
    }
    let tid = t.tid;
    let added = match THREAD_TOTALS.get_ptr_mut(&tid) {
        Some(v) => {
            unsafe {
                atomic_add(&mut (*v).ns, ns);
                atomic_add(&mut (*v).blocks, blocks);
            }
            true
        }
        None => THREAD_TOTALS.insert(&tid, &ThreadTotal { tgid, _pad: 0, ns, blocks }, BPF_NOEXIST).is_ok(),
    };
    if added {
        t.pending_ns = 0;
        t.pending_blocks = 0;
    } else {
        count(Stat::ThreadTotalsFull);
    }
}
