//! Off-CPU time and scheduler latency from `sched_switch`, `sched_wakeup`
//! and `sched_wakeup_new`, with `sched_process_exit` cleaning up.
//!
//! Every traced thread has one `THREADS` entry, cleared when the
//! thread exits. It is an array indexed by tid rather than a hash map: the
//! kernel inlines an array lookup into a few instructions, where a hash
//! lookup is a helper call that hashes the key, and a context switch looks
//! a thread up twice and a wakeup once (figures at `threads::thread`).
//! - A thread that leaves the CPU blocked (prev_state has
//!   TASK_INTERRUPTIBLE or TASK_UNINTERRUPTIBLE, and it was not preempted)
//!   records the time and the ids of its kernel and user stacks. The stacks
//!   can only be read now, in its own context: `bpf_get_stack` has no
//!   cross-task user stacks, so the minimum block duration is applied when
//!   the thread runs again.
//! - When it is switched in again, the blocked time goes into `OFFCPU`
//!   (keyed by thread and stacks) and the per-process off-CPU histogram.
//! - Wakeups and preemptions start a run-queue wait; the switch-in ends it
//!   and feeds the run-queue histogram. Preemption is not off-CPU time.
//!   The wakeup programs cost ~70 ns per wakeup (timestamps from the run
//!   queue's clock, see `clock`), and the kernel's own
//!   per-task run delay (`sched_info.run_delay`, read at switch-out) would
//!   save them, but it misses most wakeup waits since EEVDF's delayed
//!   dequeue: a task woken while still queued is never enqueued again, so
//!   no wait starts. On the multi-site load of `cargo xtask bench offcpu`
//!   it gave a run-queue p50 of 0 against 9.3 us from the wakeups.
//!
//! Unwinding is most of the cost of a blocking switch (measured with
//! bpf_stats on `perf bench sched pipe`, 2-CPU VM: sched_switch 300 ns per
//! event without stacks, 1040 ns with kernel stacks, 1470 ns with both;
//! with the reuse below 375 ns; `cargo xtask bench offcpu` reports it).
//! Threads mostly block at the same few places, so a block whose user
//! registers at kernel entry (ip, sp, bp, syscall number) and two return
//! addresses ([sp] and [bp+8]) match the thread's previous capture reuses
//! those stacks. Frames deeper than that could in principle differ under an
//! identical fingerprint, so every `REFRESH_EVERY`-th block unwinds again.
//!
//! Sampled mode (`SAMPLE_EVERY` = N > 1, `--off-cpu-sample`): a coin at
//! switch-out picks one block in N, on average, for stacks; the others are
//! only timed. A sampled block's time is added N-fold, so each stack's sum
//! is an unbiased estimate of its blocked time. Every block's time also
//! goes into the thread's exact total (`THREAD_TOTALS`), which the agent
//! scales the thread's stacks to, so per-thread time stays exact. What it
//! saves is the fingerprint, the site search and the `OFFCPU` update on
//! N-1 blocks in N; `cargo xtask bench offcpu --off-cpu-sample N` measures
//! it. 2-CPU VM, Linux 6.18.44, three runs of 2 rounds of 10 s, exact and
//! N = 8 in each: (sched_switch + sched_wakeup) ns per switch 361-371 ->
//! 235-240 on the one-site ping-pong and 460-486 -> 283-310 on the
//! multi-site load, ping-pong throughput 0.75-0.79x -> 0.80-0.81x of the
//! baseline, overhead run (99 Hz plus off-CPU over a CPU-bound process and
//! the multi-site service) 0.84-1.02 -> 0.63-0.78 % of a core. What is left per switch is the unsampled path itself
//! (thread lookups, clocks, the coin); the
//! price is per-stack time as an estimate (see `offcpu::sampled` in the
//! agent).

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext},
    EbpfContext,
};
use profiler_common::{
    offcpu::{
        BlockSite, BlockedRegs, OffCpuKey, OffCpuValue, ProcessNotice, StackTrace, BLOCK_SITES, HIST_OFFCPU, HIST_RUNQ,
        NOTICE_NO_TABLES, SCAN_SLOTS, SCAN_WINDOW_END, SCAN_WINDOW_START,
    },
    Stat, SAMPLE_FLAG_USER_PARTIAL,
};

use crate::{
    maps::{count, wanted, SAMPLES},
    unwind,
};

mod clock;
mod fingerprint;
mod histograms;
mod scan;
mod stacks;
mod threads;
mod totals;

use clock::{ktime, rq_now};
use fingerprint::fingerprint;
use histograms::{flush_latency, record_latency};
use stacks::{capture, STACK_LOST};
use threads::{find_thread, forget, thread};
use totals::flush_total;

/// Set by the agent: blocks shorter than this are not recorded.
#[no_mangle]
static MIN_BLOCK_NS: u64 = 0;
/// Set by the agent: 1 records every block's stacks (exact); N > 1 takes
/// stacks for one block in N, chosen at random (sampled mode). Read-only
/// data: the verifier knows its value, so the exact mode's programs carry
/// none of the sampled mode's code.
#[no_mangle]
static SAMPLE_EVERY: u32 = 1;

#[inline(always)]
fn sample_every() -> u32 {
    unsafe { core::ptr::read_volatile(&SAMPLE_EVERY) }
}
/// Byte offsets of `task_struct.pid` and `.tgid`, looked up by the agent in
/// the kernel's BTF (aya-ebpf has no CO-RE relocations for Rust).
#[no_mangle]
static TASK_PID_OFFSET: u32 = 0;
#[no_mangle]
static TASK_TGID_OFFSET: u32 = 0;
/// Offsets of `task_struct.__state` and `.comm`, for the task iterator.
#[no_mangle]
static TASK_STATE_OFFSET: u32 = 0;
#[no_mangle]
static TASK_COMM_OFFSET: u32 = 0;

/// A site's capture is taken again after this many reuses or this long
/// (in units of 2^20 ns, about a millisecond), whichever comes first: a
/// fingerprint that also matches a different deeper stack is corrected
/// within that. Every 16th block (the former rule) cost the one-site
/// ping-pong a capture per 16 switches, a third of its BPF time on a 2-CPU
/// VM (`cargo xtask bench offcpu`, load "max": sched_switch 1477 ns per
/// switch). The age was 25 ms, which at service-like rates made the age,
/// not the block count, decide: every site of every thread was walked 40
/// times a second, 8 % of the blocks of the bench's overhead run (4353
/// walks in 12 s), with caches cold from the CPU-bound process. At 268 ms
/// that run went from 1982 to 1193 ns of BPF time per switch (BPF 1.55 ->
/// 0.92 % of a core) and "multi" from 696 to 630. The price: two deeper
/// stacks under one fingerprint are told apart by a walk about four times
/// a second instead of forty, so their split is a coarser sample. In
/// tests/tests/offcpu_shared_site.rs (two callers alternating through one
/// site, truth 50/50, 8 s) it came out 49/51 at 25 ms and 63/37 and 46/54
/// at 268 ms; with no walks at all, 0/100.
const REFRESH_EVERY: u32 = 256;
const REFRESH_AGE: u32 = 256;

const TASK_RUNNING: u32 = 0;
const TASK_INTERRUPTIBLE: u32 = 0x1;
const TASK_UNINTERRUPTIBLE: u32 = 0x2;
const TASK_DEAD: u32 = 0x80;

/// Blocked time per (thread, stacks). Cleared by the agent when read.
#[map]
static OFFCPU: HashMap<OffCpuKey, OffCpuValue> = HashMap::with_max_entries(32_768, 0);
/// Stacks by content hash. Not preallocated: 1 KiB per entry, paid only for
/// stacks actually seen.
#[map]
static STACKS: HashMap<u64, StackTrace> = HashMap::with_max_entries(32_768, BPF_F_NO_PREALLOC);
/// Blocked time of threads still blocked at an interval cut, up to the cut
/// (keyed like `OFFCPU`). Written by the task iterator, cleared by the agent.
#[map]
static STILL_BLOCKED: HashMap<OffCpuKey, OffCpuValue> = HashMap::with_max_entries(16_384, 0);
/// Registers of threads the start scan found blocked (or a cut found in a
/// long unsampled block), by tid, for the agent to unwind their user stacks.
#[map]
static BLOCKED_REGS: HashMap<u32, BlockedRegs> = HashMap::with_max_entries(8_192, 0);
/// What the task iterator does (`SCAN_*` slots), set by the agent per run.
#[map]
static SCAN: Array<u64> = Array::with_max_entries(SCAN_SLOTS, 0);
/// When each process without unwind tables was last announced to the agent.
#[map]
static ANNOUNCED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4_096, 0);
/// A process without tables is announced at most this often: the agent
/// loads it within milliseconds, and the queue to its table thread is
/// bounded.
const ANNOUNCE_EVERY_NS: u64 = 250_000_000;

/// Per-CPU scratch for capturing a stack: too big for the BPF stack.
#[map]
static SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(1, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_NOEXIST: u64 = 1;

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    // (bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    let preempt = preempt & 0xff != 0;
    // Only a switch whose leaving task blocks is sure to find the run
    // queue's clock fresh (see `clock`).
    let now = if blocks(preempt, prev_state as u32) { rq_now(prev) } else { ktime() };
    // prev is current: its ids by plain loads rather than a helper call.
    let prev_ids = task_ids_btf(prev);
    on_switch(&ctx, true, now, preempt, prev_ids, || Some(task_ids_btf(next)), prev_state as u32);
    0
}

/// Fallback for kernels whose BTF lacks the tracepoint's prototype.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    let pid_tgid = bpf_get_current_pid_tgid();
    let prev_ids = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    on_switch(&ctx, false, ktime(), preempt & 0xff != 0, prev_ids, || task_ids(next), prev_state as u32);
    0
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> u32 {
    let task: *const u8 = ctx.arg(0);
    on_wakeup(task_ids_btf(task), || rq_now(task));
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> u32 {
    let task: *const u8 = ctx.arg(0);
    on_wakeup(task_ids_btf(task), || rq_now(task));
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn sched_wakeup_raw(ctx: RawTracePointContext) -> i32 {
    if let Some(ids) = task_ids(ctx.arg(0)) {
        on_wakeup(ids, ktime);
    }
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn sched_wakeup_new_raw(ctx: RawTracePointContext) -> i32 {
    if let Some(ids) = task_ids(ctx.arg(0)) {
        on_wakeup(ids, ktime);
    }
    0
}

/// The exiting thread is current. Its entries would otherwise stay until
/// the maps fill.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> u32 {
    let ids = bpf_get_current_pid_tgid();
    retire(ids as u32, (ids >> 32) as u32);
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_raw(_ctx: RawTracePointContext) -> i32 {
    let ids = bpf_get_current_pid_tgid();
    retire(ids as u32, (ids >> 32) as u32);
    0
}

/// A thread's entry is dropped, what it still holds for the maps added
/// first: its batched histogram entries and, in sampled mode, its pending
/// exact total.
#[inline(always)]
fn retire(tid: u32, tgid: u32) {
    let Some(t) = find_thread(tid) else { return };
    let t = unsafe { &mut *t };
    if sample_every() > 1 {
        flush_total(t, tgid);
    }
    flush_latency(t, tgid);
    forget(t);
}

#[inline(always)]
fn read_u32(task: *const u8, offset: u32) -> Option<u32> {
    unsafe { bpf_probe_read_kernel(task.add(offset as usize) as *const u32).ok() }
}

/// (tid, tgid) of a task, read with the helper: for raw tracepoints and
/// the task iterator, whose task pointers the verifier has no type for.
#[inline(always)]
fn task_ids(task: *const u8) -> Option<(u32, u32)> {
    let pid_off = unsafe { core::ptr::read_volatile(&TASK_PID_OFFSET) };
    let tgid_off = unsafe { core::ptr::read_volatile(&TASK_TGID_OFFSET) };
    Some((read_u32(task, pid_off)?, read_u32(task, tgid_off)?))
}

/// (tid, tgid) of a task that a tp_btf program got as an argument, by
/// plain loads. The verifier knows the pointer's BTF type, and the offsets
/// are constants to it (frozen read-only data), so it checks each load
/// against the `task_struct` field at that offset and lets the JIT emit a
/// single instruction with a fault fixup, where `bpf_probe_read_kernel` is
/// a helper call per field. Measured with bpf_stats over `record
/// --off-cpu` on the loads of `cargo xtask bench offcpu` (2-CPU VM, three
/// interleaved rounds against the helper reads): sched_wakeup 242-296 ->
/// 171-178 ns per run on the pipe ping-pong and 295-357 -> 205-225 on the
/// multi-site load; sched_switch 526-655 -> 468-494 and 858-1044 -> 752-816.
#[inline(always)]
fn task_ids_btf(task: *const u8) -> (u32, u32) {
    let pid_off = unsafe { core::ptr::read_volatile(&TASK_PID_OFFSET) } as usize;
    let tgid_off = unsafe { core::ptr::read_volatile(&TASK_TGID_OFFSET) } as usize;
    unsafe {
        (
            core::ptr::read_volatile(task.add(pid_off) as *const u32),
            core::ptr::read_volatile(task.add(tgid_off) as *const u32),
        )
    }
}

#[inline(always)]
fn on_wakeup((tid, tgid): (u32, u32), now: impl FnOnce() -> u64) {
    if tid == 0 || !wanted(tgid) {
        return;
    }
    if let Some(t) = thread(tid) {
        unsafe { (*t).runq_start_ns = now() };
    }
}

/// Whether the leaving task blocks: it was not preempted and waits on
/// something (interruptible or not).
#[inline(always)]
fn blocks(preempt: bool, prev_state: u32) -> bool {
    !preempt && prev_state & (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE) != 0
}

#[inline(always)]
fn on_switch<C: EbpfContext>(
    ctx: &C,
    btf: bool,
    now: u64,
    preempt: bool,
    prev: (u32, u32),
    next: impl FnOnce() -> Option<(u32, u32)>,
    prev_state: u32,
) {
    count(Stat::Switches);
    switch_out(ctx, btf, now, preempt, prev, prev_state);
    // The arriving task's ids are read only now, after the switch-out:
    // read before it, a fallible read would split every path through
    // `switch_out` in two for the verifier, and the raw program would pass
    // its one-million-instruction limit.
    if let Some(ids) = next() {
        switch_in(now, ids);
    }
}

/// The leaving thread, `(tid, tgid)`, is current.
/// `btf`: called from the tp_btf program, which may load from kernel
/// pointers of a known type directly.
#[inline(always)]
fn switch_out<C: EbpfContext>(ctx: &C, btf: bool, now: u64, preempt: bool, (tid, tgid): (u32, u32), prev_state: u32) {
    if tid == 0 {
        return;
    }
    if prev_state & TASK_DEAD != 0 {
        retire(tid, tgid);
        return;
    }
    // Cheap checks before any unwinding.
    if !wanted(tgid) {
        return;
    }
    let Some(t) = thread(tid) else { return };
    let t = unsafe { &mut *t };
    if preempt || prev_state == TASK_RUNNING {
        // Still runnable: the time until it runs again is run-queue wait.
        t.runq_start_ns = now;
        // It ran, so it is not blocked (this clears a start-scan entry whose
        // thread woke between the scan's look and its insert).
        t.block_start_ns = 0;
        return;
    }
    if !blocks(preempt, prev_state) {
        return; // stopped or traced: not waiting on anything we can name
    }
    let every = sample_every();
    if every > 1 {
        // The coin: one block in `every` on average is captured, weighted
        // `every` at its switch-in; the rest are only timed.
        if unsafe { bpf_get_prandom_u32() } % every != 0 {
            t.weight = 0;
            t.block_start_ns = now;
            t.blocked_since_ns = now;
            t.flags = 0;
            count(Stat::OffCpuUnsampled);
            count(Stat::OffCpuBlocks);
            return;
        }
        t.weight = every;
    }
    // Python frames live on the heap, not in the registers the fingerprint
    // covers: two Python functions blocking through the same C path would
    // share one, so the stacks of a thread running Python are never reused.
    // Only a thread whose last capture found Python frames counts as one:
    // programs that embed libpython without running it (perf, gdb) made
    // every block a full capture and a faulting interpreter lookup,
    // 3.6 us per switch under `perf bench sched pipe` (2-CPU VM), and
    // native threads of Python processes are no different. A thread that
    // starts running Python is caught at its next capture, which the
    // refresh rule below takes within REFRESH_AGE.
    let fp = if t.python != 0 && crate::python::walks(tgid) { 0 } else { fingerprint(btf) };
    let mut hit = BLOCK_SITES as u32;
    // A site captured before the process's tables were loaded is stored
    // with the fingerprint's low bit (always set) cleared: it is reused
    // (a fresh walk would be just as partial) until the tables are there.
    for i in 0..BLOCK_SITES {
        if fp != 0 && t.sites[i].fingerprint | 1 == fp {
            hit = i as u32;
        }
    }
    // Values that live across the captures go through the thread's map
    // entry: the verifier checks the unwinder's loop once per distinct
    // state it is entered with, and values it knows (which slot, which
    // branch) made those states distinct until loading took minutes.
    unsafe { core::ptr::write_volatile(&mut t.site, hit) };
    let hit = unsafe { core::ptr::read_volatile(&t.site) } as usize;
    let now_ms = (now >> 20) as u32;
    let fresh = |s: &BlockSite| s.reused < REFRESH_EVERY && now_ms.wrapping_sub(s.taken) < REFRESH_AGE;
    let reusable = hit < BLOCK_SITES && fresh(&t.sites[hit & (BLOCK_SITES - 1)]) && {
        let partial = t.sites[hit & (BLOCK_SITES - 1)].fingerprint & 1 == 0;
        !partial || !tables_known(tgid, now)
    };
    if reusable {
        let site = &mut t.sites[hit & (BLOCK_SITES - 1)];
        site.reused += 1;
        t.kernel_stack = site.kernel_stack;
        t.user_stack = site.user_stack;
        count(Stat::StacksReused);
    } else {
        let slot = if hit < BLOCK_SITES {
            hit as u32
        } else {
            let s = t.next_site;
            t.next_site = s.wrapping_add(1);
            s
        };
        unsafe {
            core::ptr::write_volatile(&mut t.site, slot);
            core::ptr::write_volatile(&mut t.fingerprint, fp);
        }
        let kernel = capture(ctx, tgid, false);
        unsafe { core::ptr::write_volatile(&mut t.kernel_stack, kernel.id) };
        let user = capture(ctx, tgid, true);
        t.python = u32::from(crate::python::found_frames());
        // A stack that could not be stored is not reused: the next block
        // at this place tries again. One walked before the process's tables
        // were loaded is marked, and taken again once they are.
        let complete = user.flags & SAMPLE_FLAG_USER_PARTIAL == 0 || tables_known(tgid, now);
        let (kernel, slot, fp) = unsafe {
            (
                core::ptr::read_volatile(&t.kernel_stack),
                core::ptr::read_volatile(&t.site) as usize,
                core::ptr::read_volatile(&t.fingerprint),
            )
        };
        let stored = kernel != STACK_LOST && user.id != STACK_LOST;
        t.sites[slot & (BLOCK_SITES - 1)] = BlockSite {
            fingerprint: if !stored {
                0
            } else if complete {
                fp
            } else {
                fp & !1
            },
            kernel_stack: kernel,
            user_stack: user.id,
            reused: 0,
            taken: now_ms,
        };
        t.user_stack = user.id;
        t.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
    t.block_start_ns = now;
    t.blocked_since_ns = now;
    t.flags = 0;
    count(Stat::OffCpuBlocks);
}

const _: () = assert!(BLOCK_SITES.is_power_of_two());

/// Whether the unwinder has `tgid`'s tables, for a stack the unwinder
/// flagged partial. If not (CFI unwinding on and the process unknown), the
/// block is counted and the agent told, at most every ANNOUNCE_EVERY_NS.
#[inline(always)]
fn tables_known(tgid: u32, now: u64) -> bool {
    if !unwind::cfi_enabled() || unwind::known(tgid) {
        return true;
    }
    count(Stat::OffCpuBeforeTables);
    match ANNOUNCED.get_ptr_mut(&tgid) {
        Some(last) => unsafe {
            if now.wrapping_sub(*last) < ANNOUNCE_EVERY_NS {
                return false;
            }
            *last = now;
        },
        None => {
            let _ = ANNOUNCED.insert(&tgid, &now, 0);
        }
    }
    match SAMPLES.reserve::<ProcessNotice>(0) {
        Some(mut entry) => {
            unsafe { entry.as_mut_ptr().write(ProcessNotice { kind: NOTICE_NO_TABLES, tgid }) };
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => count(Stat::RingBufferFull),
    }
    false
}

/// The arriving thread ends its wait.
#[inline(always)]
fn switch_in(now: u64, (tid, tgid): (u32, u32)) {
    if tid == 0 {
        return;
    }
    let Some(t) = find_thread(tid) else { return };
    let t = unsafe { &mut *t };
    if t.runq_start_ns != 0 {
        record_latency(t, tgid, HIST_RUNQ, now.saturating_sub(t.runq_start_ns));
        t.runq_start_ns = 0;
    }
    if t.block_start_ns == 0 {
        return;
    }
    // Counted from the last interval cut it stayed blocked through (the
    // time before is in STILL_BLOCKED already), within the recording
    // window; judged and binned by the whole block.
    let (from, until) = window(t.block_start_ns, now);
    t.block_start_ns = 0;
    if until <= from {
        return; // ended before the window opened, or began after it closed
    }
    let blocked = until - from;
    let whole = now.saturating_sub(t.blocked_since_ns);
    let min = unsafe { core::ptr::read_volatile(&MIN_BLOCK_NS) };
    if whole < min {
        count(Stat::OffCpuShort);
        return;
    }
    record_latency(t, tgid, HIST_OFFCPU, whole);
    let mut weight = 1;
    if sample_every() > 1 {
        t.pending_ns += blocked;
        t.pending_blocks += 1;
        if t.weight == 0 {
            return; // unsampled: in the thread's total only
        }
        // The total stays pending until the next cut (every read of the
        // totals follows one) or the thread's exit.
        weight = t.weight as u64;
    }
    let key = OffCpuKey { tgid, tid, kernel_stack: t.kernel_stack, user_stack: t.user_stack, comm: t.comm };
    add_blocked(&OFFCPU, &key, blocked * weight);
}

/// `start..end` clipped to the recording window (`SCAN_WINDOW_*`). Two
/// array loads, which the kernel inlines for array maps.
#[inline(always)]
fn window(start: u64, end: u64) -> (u64, u64) {
    let open = SCAN.get(SCAN_WINDOW_START).copied().unwrap_or(0);
    let close = match SCAN.get(SCAN_WINDOW_END).copied().unwrap_or(0) {
        0 => u64::MAX,
        t => t,
    };
    (start.max(open), end.min(close))
}

/// Whether the agent has closed the recording window (the end of a
/// recording, or the daemon's last interval).
#[inline(always)]
fn window_closed() -> bool {
    SCAN.get(SCAN_WINDOW_END).is_some_and(|&t| t != 0)
}

/// Adds `ns` to `key` in an aggregate map.
#[inline(always)]
fn add_blocked(map: &HashMap<OffCpuKey, OffCpuValue>, key: &OffCpuKey, ns: u64) {
    match map.get_ptr_mut(key) {
        Some(v) => unsafe {
            // Another CPU may add to the same key concurrently.
            atomic_add(&mut (*v).total_ns, ns);
            atomic_add(&mut (*v).count, 1);
        },
        None => {
            let v = OffCpuValue { total_ns: ns, count: 1 };
            if map.insert(key, &v, BPF_NOEXIST).is_err() {
                // Lost a race with another CPU inserting the same key, or full.
                match map.get_ptr_mut(key) {
                    Some(v) => unsafe {
                        atomic_add(&mut (*v).total_ns, ns);
                        atomic_add(&mut (*v).count, 1);
                    },
                    None => count(Stat::OffCpuAggregateFull),
                }
            }
        }
    }
}

/// An atomic add (BPF_ATOMIC | BPF_ADD). `core::sync::atomic` offers no
/// read-modify-write on the BPF target, so the intrinsic is used directly.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, v);
}
