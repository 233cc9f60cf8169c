//! Tiny programs `profiler-agent check` loads to prove that this kernel
//! accepts each program type, map type and helper the profiler is built on,
//! one feature per program, so a rejection names the missing feature. They
//! use only their own maps and are unloaded right after the check.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_loop,
    macros::{btf_tracepoint, map, perf_event, raw_tracepoint},
    maps::{Array, RingBuf},
    programs::{BtfTracePointContext, PerfEventContext, RawTracePointContext},
};

const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The smallest ring buffer (one page).
#[map]
static PROBE_RING: RingBuf = RingBuf::with_byte_size(4096, 0);

/// An mmapable array: the agent maps it and writes through the mapping, as
/// it does with the CFI tables.
#[map]
static PROBE_MMAP: Array<u64> = Array::with_max_entries(512, BPF_F_MMAPABLE);

/// Program type perf_event (the on-CPU sampler).
#[perf_event]
pub fn probe_perf_event(_ctx: PerfEventContext) -> u32 {
    0
}

/// Program type tracing/tp_btf (the scheduler and exec hooks).
#[btf_tracepoint(function = "sched_switch")]
pub fn probe_tp_btf(_ctx: BtfTracePointContext) -> u32 {
    0
}

/// Program type raw_tracepoint (the fallback for kernels whose BTF lacks
/// the tracepoints).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn probe_raw_tracepoint(_ctx: RawTracePointContext) -> i32 {
    0
}

/// The ring buffer helpers (Linux 5.8).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn probe_ring_buffer(_ctx: RawTracePointContext) -> i32 {
    if let Some(mut entry) = PROBE_RING.reserve::<u64>(0) {
        entry.write(1);
        entry.submit(0);
    }
    0
}

/// `bpf_loop` (Linux 5.17), which the CFI unwinder's frame loop needs.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn probe_bpf_loop(_ctx: RawTracePointContext) -> i32 {
    let mut n: u64 = 0;
    unsafe {
        bpf_loop(4, count_step as *mut c_void, (&mut n as *mut u64).cast(), 0);
    }
    0
}

extern "C" fn count_step(_index: u32, ctx: *mut c_void) -> i64 {
    let n = unsafe { &mut *(ctx as *mut u64) };
    *n += 1;
    0
}

/// Reads the mmapable array from a program, so the map is used.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn probe_mmapable_array(_ctx: RawTracePointContext) -> i32 {
    match PROBE_MMAP.get(0) {
        Some(v) => *v as i32 & 1,
        None => 0,
    }
}
