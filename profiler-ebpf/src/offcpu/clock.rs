//! Timestamps for the scheduler programs: `bpf_ktime_get_ns`, or the run
//! queue's own clock where the kernel has just updated it.
//!
//! The scheduler reads the clock itself at the moments these programs run:
//! `__schedule` updates `rq->clock` before it picks the next task, and a
//! wakeup updates the clock of the task's run queue before it enqueues the
//! task. A tp_btf program reaches that value by three plain loads
//! (`task->se.cfs_rq->rq->clock`), where `bpf_ktime_get_ns` is a helper
//! call that reads the TSC again. The run-queue clock is `sched_clock`, not
//! CLOCK_MONOTONIC, so each CPU keeps the difference between the two, taken
//! afresh every `RESYNC_NS`: everything stored stays in CLOCK_MONOTONIC,
//! which the agent, the task iterator and the recording window use.
//!
//! The scheduler skips its clock update in one case: after a wakeup that
//! asks the current task to give way, the next `__schedule` reuses the
//! wakeup's reading. That switch is an involuntary one (the leaving task is
//! still runnable) or a switch away from the idle task, so those switches
//! take `bpf_ktime_get_ns`; only a switch whose leaving task blocks uses the
//! run-queue clock.
//!
//! Measured with bpf_stats under `perf bench sched pipe` pinned to one CPU
//! while `record --off-cpu` ran (2-CPU VM, two interleaved runs against
//! `bpf_ktime_get_ns` everywhere): sched_wakeup 125-132 -> 69-70 ns per
//! run; sched_switch 433-444 -> 430-434, as only 55 % of that load's
//! switches are blocking ones (the rest follow a wakeup preemption, the
//! case above). The cost is a per-CPU offset that is one `RESYNC_NS` old
//! at most, and a blocking switch stamped up to the scheduler's own lag
//! between its clock update and the tracepoint (a pick, well under a
//! microsecond).

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};

/// Byte offsets for `task_struct.se.cfs_rq`, `cfs_rq.rq` and `rq.clock`,
/// looked up by the agent in the kernel's BTF. 0 where the kernel lacks
/// one of them (no group scheduling): `bpf_ktime_get_ns` is used.
#[no_mangle]
static TASK_CFS_RQ_OFFSET: u32 = 0;
#[no_mangle]
static CFS_RQ_RQ_OFFSET: u32 = 0;
#[no_mangle]
static RQ_CLOCK_OFFSET: u32 = 0;

/// The offset between CLOCK_MONOTONIC and the run-queue clock, per CPU.
#[repr(C)]
struct ClockSync {
    /// `ktime - rq clock`, wrapping.
    delta: u64,
    /// The run-queue clock when `delta` was taken; 0: never.
    at: u64,
}

#[map]
static CLOCK_SYNC: PerCpuArray<ClockSync> = PerCpuArray::with_max_entries(1, 0);

/// How often a CPU takes the offset again. The two clocks differ in rate
/// only by the NTP frequency correction (at most 500 ppm), so within this
/// the offset moves by well under a microsecond.
const RESYNC_NS: u64 = 1_000_000;

#[inline(always)]
pub(super) fn ktime() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// CLOCK_MONOTONIC now, from the run queue `task` is on, whose clock the
/// scheduler has just updated. `task` must be a pointer the verifier knows
/// as `struct task_struct` (a tp_btf argument).
#[inline(always)]
pub(super) fn rq_now(task: *const u8) -> u64 {
    let (task_off, rq_off, clock_off) = unsafe {
        (
            core::ptr::read_volatile(&TASK_CFS_RQ_OFFSET) as usize,
            core::ptr::read_volatile(&CFS_RQ_RQ_OFFSET) as usize,
            core::ptr::read_volatile(&RQ_CLOCK_OFFSET) as usize,
        )
    };
    if task_off == 0 || rq_off == 0 || clock_off == 0 {
        return ktime();
    }
    let clock = unsafe {
        let cfs_rq = core::ptr::read_volatile(task.add(task_off) as *const *const u8);
        if cfs_rq.is_null() {
            return ktime();
        }
        let rq = core::ptr::read_volatile(cfs_rq.add(rq_off) as *const *const u8);
        if rq.is_null() {
            return ktime();
        }
        core::ptr::read_volatile(rq.add(clock_off) as *const u64)
    };
    let Some(sync) = CLOCK_SYNC.get_ptr_mut(0) else { return ktime() };
    let sync = unsafe { &mut *sync };
    // Signed: a wakeup reads another CPU's run queue, whose clock may be a
    // little behind this CPU's last reading.
    let age = clock.wrapping_sub(sync.at) as i64;
    if clock == 0 || sync.at == 0 || !(-(RESYNC_NS as i64)..=RESYNC_NS as i64).contains(&age) {
        let now = ktime();
        sync.delta = now.wrapping_sub(clock);
        sync.at = clock;
        return now;
    }
    clock.wrapping_add(sync.delta)
}
