//! The target filter: which processes are sampled and traced. Checked
//! first by every program (through `maps::wanted`) so a process outside the
//! selection costs a map lookup or two and no unwinding.
//!
//! A process is wanted when its tgid is in `TARGET_PIDS` (`--pid`, and the
//! processes the agent's rescan matched), or, for the running task only,
//! when its cgroup or one of its ancestors is in `TARGET_CGROUPS`
//! (`--cgroup`, and the cgroups of selected containers and pods): a new
//! process in a selected cgroup is then caught at its first sample. The
//! cgroup test needs the current task, so events about other tasks (a
//! wakeup) rely on the tgid set, which the agent keeps current.
//! `cargo xtask bench filter` measures the cost per filtered-out sample.

use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_pid_tgid},
    macros::map,
    maps::{Array, HashMap},
};
use profiler_common::MAX_FILTER_CGROUPS;

/// Allowed cgroup v2 ids. Value unused.
#[map]
pub static TARGET_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTER_CGROUPS, 0);

/// Entry 0: bit `n` set when some allowed cgroup is at level `n` (root 0),
/// so only those ancestors are looked up.
#[map]
pub static TARGET_CGROUP_LEVELS: Array<u64> = Array::with_max_entries(1, 0);

/// Cgroup levels checked at most (the mask has 64 bits).
const MAX_LEVELS: i32 = 64;

/// Whether the current task, if it is of `tgid`, runs in an allowed cgroup.
#[inline(always)]
pub fn in_target_cgroup(tgid: u32) -> bool {
    let levels = match TARGET_CGROUP_LEVELS.get(0) {
        Some(l) => *l,
        None => return false,
    };
    if levels == 0 || (bpf_get_current_pid_tgid() >> 32) as u32 != tgid {
        return false;
    }
    let mut level = 0;
    while level < MAX_LEVELS {
        let rest = levels >> level;
        if rest == 0 {
            break;
        }
        if rest & 1 != 0 {
            // 0 when the task's cgroup is shallower than `level`.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if id != 0 && unsafe { TARGET_CGROUPS.get(&id).is_some() } {
                return true;
            }
        }
        level += 1;
    }
    false
}
