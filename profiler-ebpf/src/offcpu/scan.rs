//! The task iterator the agent runs over every task: finding threads that
//! were blocked before the programs attached, cutting still-blocked
//! threads at an interval boundary or the end of a recording, and flushing
//! the threads' batched histogram entries before the agent reads them.

use aya_ebpf::{
    helpers::{bpf_get_task_stack, bpf_probe_read_kernel, bpf_task_pt_regs},
    macros::map,
    maps::PerCpuArray,
};
use profiler_common::{
    offcpu::{
        found_blocked_stack_id, BlockedRegs, OffCpuKey, ThreadState, LONG_BLOCK_NS, SCAN_CUT, SCAN_FIND_BLOCKED,
        SCAN_FLUSH, SCAN_MODE, SCAN_TIME, THREAD_FOUND_BLOCKED,
    },
    Stat, COMM_LEN, MAX_STACK_DEPTH,
};

use super::threads::{claim_thread, find_thread};
use super::{
    add_blocked, flush_latency, flush_total, read_u32, sample_every, stacks::store, task_ids, window, window_closed,
    BLOCKED_REGS, SCAN, SCRATCH, STILL_BLOCKED, TASK_COMM_OFFSET, TASK_INTERRUPTIBLE, TASK_STATE_OFFSET,
    TASK_UNINTERRUPTIBLE,
};
use crate::maps::{count, wanted};

/// The task iterator: per task, the scan the agent asked for in `SCAN`.
/// Context: `struct bpf_iter__task { struct bpf_iter_meta *meta; struct
/// task_struct *task; }`; `task` is NULL once, at the end.
#[no_mangle]
#[link_section = "iter/task"]
pub extern "C" fn offcpu_tasks(ctx: *mut core::ffi::c_void) -> i32 {
    let task = unsafe { core::ptr::read_volatile((ctx as *const *const u8).add(1)) };
    if !task.is_null() {
        scan_task(task);
    }
    0
}

#[inline(always)]
fn scan_task(task: *const u8) {
    let Some((tid, tgid)) = task_ids(task) else { return };
    if tid == 0 || !wanted(tgid) {
        return;
    }
    let (Some(&time), Some(&mode)) = (SCAN.get(SCAN_TIME), SCAN.get(SCAN_MODE)) else { return };
    if mode == SCAN_CUT {
        cut(task, tid, tgid, time);
    } else if mode == SCAN_FIND_BLOCKED {
        find_blocked(task, tid, tgid, time);
    } else if mode == SCAN_FLUSH {
        if let Some(t) = find_thread(tid) {
            flush_latency(unsafe { &mut *t }, tgid);
        }
    }
}

/// Moves a still-blocked thread's time up to `time` into `STILL_BLOCKED`;
/// its switch-in then counts from `time`. The re-check before the write
/// narrows the race with a switch-in on another CPU to a few instructions
/// (BPF has no compare-and-swap at this program's instruction set level).
///
/// In sampled mode every thread's pending exact total is flushed, blocked
/// or not, so the agent reads each thread's total up to the cut, and a
/// still-blocked thread's time goes into it as it goes into the records:
/// - a sampled block's time is added N-fold, like its switch-in would;
/// - an unsampled block that has lasted `LONG_BLOCK_NS` has its stacks
///   taken here and counts whole (weight 1) from its start on;
/// - a shorter unsampled block is not cut: its time so far stays with it,
///   for its switch-in or the cut that finds it long to count, so a block
///   whose stacks are taken has all of its time under them (counted in the
///   interval it is taken in). At the last cut (window closed) it goes
///   into the total only, spread by the agent over the thread's stacks.
#[inline(always)]
fn cut(task: *const u8, tid: u32, tgid: u32, time: u64) {
    let Some(t) = find_thread(tid) else { return };
    let t = unsafe { &mut *t };
    let every = sample_every();
    let start = unsafe { core::ptr::read_volatile(&t.block_start_ns) };
    if start != 0 && start < time && (every <= 1 || still_blocked_counts(task, t, tgid, time)) {
        let key = OffCpuKey { tgid, tid, kernel_stack: t.kernel_stack, user_stack: t.user_stack, comm: t.comm };
        if unsafe { core::ptr::read_volatile(&t.block_start_ns) } != start {
            return;
        }
        unsafe { core::ptr::write_volatile(&mut t.block_start_ns, time) };
        let (from, until) = window(start, time);
        if until > from {
            let ns = until - from;
            if every <= 1 {
                add_blocked(&STILL_BLOCKED, &key, ns);
            } else {
                t.pending_ns += ns;
                if t.weight != 0 {
                    add_blocked(&STILL_BLOCKED, &key, ns * t.weight as u64);
                }
            }
        }
    }
    if every > 1 {
        flush_total(t, tgid);
    }
}

/// Sampled mode: whether a still-blocked thread is cut now (see [`cut`]),
/// its stacks taken first when its unsampled block has grown long.
#[inline(always)]
fn still_blocked_counts(task: *const u8, t: &mut ThreadState, tgid: u32, time: u64) -> bool {
    if t.weight != 0 {
        return true;
    }
    if time.saturating_sub(t.blocked_since_ns) >= LONG_BLOCK_NS {
        if let Some(s) = snapshot(task, tgid) {
            t.kernel_stack = s.kernel;
            t.user_stack = found_blocked_stack_id(t.tid);
            t.comm = s.comm;
            let _ = BLOCKED_REGS.insert(&t.tid, &s.regs, 0);
            t.weight = 1;
            return true;
        }
    }
    window_closed()
}

/// What the iterator can take of a blocked user thread that is not current.
struct Snapshot {
    kernel: u64,
    regs: BlockedRegs,
    comm: [u8; COMM_LEN],
}

/// The kernel stack (stored), user registers at kernel entry and name of
/// a blocked task; None for a kernel thread.
#[inline(always)]
fn snapshot(task: *const u8, tgid: u32) -> Option<Snapshot> {
    let regs = unsafe { bpf_task_pt_regs(task as *mut _) } as *const u8;
    if regs.is_null() {
        return None;
    }
    // x86-64 `struct pt_regs`: bp at 32, ip 128, cs 136, sp 152.
    let bp = unsafe { bpf_probe_read_kernel(regs.add(32) as *const u64) }.ok()?;
    let tail = unsafe { bpf_probe_read_kernel(regs.add(128) as *const [u64; 4]) }.ok()?;
    let (ip, cs, sp) = (tail[0], tail[1], tail[3]);
    if cs & 3 != 3 || ip == 0 {
        return None; // a kernel thread
    }
    let buf = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let ret =
        unsafe { bpf_get_task_stack(task as *mut _, buf.ips.as_mut_ptr().cast(), (MAX_STACK_DEPTH * 8) as u32, 0) };
    let kernel = if ret > 0 { store(buf, (ret as u32) / 8) } else { 0 };
    let comm_off = unsafe { core::ptr::read_volatile(&TASK_COMM_OFFSET) };
    let comm =
        unsafe { bpf_probe_read_kernel(task.add(comm_off as usize) as *const [u8; COMM_LEN]) }.unwrap_or([0; 16]);
    Some(Snapshot { kernel, regs: BlockedRegs { tgid, _pad: 0, ip, sp, bp }, comm })
}

/// A thread blocked since before the programs were attached has no entry:
/// give it one, blocked since `time`, with its kernel stack and the
/// registers the agent unwinds its user stack from. Kernel threads are
/// left to their first block (an idle system has hundreds, all "blocked").
#[inline(always)]
fn find_blocked(task: *const u8, tid: u32, tgid: u32, time: u64) {
    let state_off = unsafe { core::ptr::read_volatile(&TASK_STATE_OFFSET) };
    let Some(state) = read_u32(task, state_off) else { return };
    if state & (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE) == 0 {
        return;
    }
    if find_thread(tid).is_some() {
        return; // switched out since we attached: already tracked
    }
    let Some(Snapshot { kernel, regs, comm }) = snapshot(task, tgid) else { return };
    let Some(st) = SCRATCH_THREAD.get_ptr_mut(0) else { return };
    let st = unsafe { &mut *st };
    *st = ThreadState::default();
    st.block_start_ns = time;
    st.blocked_since_ns = time;
    st.kernel_stack = kernel;
    st.user_stack = found_blocked_stack_id(tid);
    st.flags = THREAD_FOUND_BLOCKED;
    st.weight = 1;
    st.comm = comm;
    st.tid = tid;
    // It may have switched out on another CPU since the check above; the
    // second check narrows that to the few instructions of the copy, and a
    // thread that lost it has its next block overwrite the state.
    if find_thread(tid).is_some() {
        return;
    }
    let Some(t) = claim_thread(tid) else { return };
    unsafe { *t = *st };
    let _ = BLOCKED_REGS.insert(&tid, &regs, 0);
    count(Stat::OffCpuFoundBlocked);
}

/// A ThreadState under construction: too big for the iterator's stack
/// next to its other locals.
#[map]
static SCRATCH_THREAD: PerCpuArray<ThreadState> = PerCpuArray::with_max_entries(1, 0);
