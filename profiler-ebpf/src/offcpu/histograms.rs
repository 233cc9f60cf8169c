//! The per-process latency histograms (run-queue wait and off-CPU block
//! durations), created at a process's first event and read and cleared by
//! the agent.
//!
//! Each thread batches its entries in its own state (`ThreadState::
//! hist_pending`, a byte per bucket index) and adds them to its process's
//! entry `HIST_BATCH` at a time: the process lookup is a hash map helper
//! call, the thread's state is already at hand. Measured with bpf_stats
//! under `perf bench sched pipe` pinned to one CPU while `record --off-cpu
//! --off-cpu-sample 8` ran (2-CPU VM, Linux 6.18.44, one run of each
//! build at a time, interleaved): sched_switch 240-255 ns per run with a
//! lookup on every switch-in, 203-230 batched, 185-192 in a build with no
//! histograms at all (for reference only). The batches are flushed when the agent reads the
//! histograms (`SCAN_FLUSH`) and when a thread exits, so nothing is lost
//! but what a flush on another CPU races with, a few instructions wide.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use profiler_common::{
    offcpu::{hist_batch_get, hist_batch_push, hist_bucket, ProcessHistograms, ThreadState, HIST_BATCH},
    Stat,
};

use super::{atomic_add, BPF_NOEXIST};
use crate::maps::count;

/// Preallocated (2 MiB): a histogram is created at a process's first event,
/// often in the same program run as a stack insert, and on-demand
/// allocation from the tracepoint context fails when its per-CPU cache is
/// empty.
#[map]
static HISTOGRAMS: HashMap<u32, ProcessHistograms> = HashMap::with_max_entries(2_048, 0);

/// The histograms of `tgid`, created on first use.
#[inline(always)]
fn process_histograms(tgid: u32) -> Option<*mut ProcessHistograms> {
    let mut h = HISTOGRAMS.get_ptr_mut(&tgid);
    if h.is_none() {
        if let Some(empty) = SCRATCH_HIST.get_ptr(0) {
            let _ = HISTOGRAMS.insert(&tgid, unsafe { &*empty }, BPF_NOEXIST);
        }
        h = HISTOGRAMS.get_ptr_mut(&tgid);
    }
    if h.is_none() {
        count(Stat::HistogramMapFull);
    }
    h
}

/// Notes one latency of `kind` in the thread's batch, adding the batch to
/// the process's histograms when it is full.
#[inline(always)]
pub(super) fn record_latency(t: &mut ThreadState, tgid: u32, kind: u32, ns: u64) {
    let k = kind as usize & 1;
    let n = t.hist_count[k];
    t.hist_pending[k] = hist_batch_push(t.hist_pending[k], n, hist_bucket(ns));
    if ns > t.hist_max[k] {
        t.hist_max[k] = ns;
    }
    t.hist_count[k] = n + 1;
    if n + 1 >= HIST_BATCH {
        flush_latency(t, tgid);
    }
}

/// Adds the thread's batched entries of both kinds to its process's
/// histograms and empties the batch. Dropped when the map is full (counted
/// in `histogram_map_full`, once per batch).
#[inline(always)]
pub(super) fn flush_latency(t: &mut ThreadState, tgid: u32) {
    if t.hist_count[0] == 0 && t.hist_count[1] == 0 {
        return;
    }
    if let Some(all) = process_histograms(tgid) {
        for k in 0..2 {
            let n = t.hist_count[k];
            let packed = t.hist_pending[k];
            let h = unsafe { &mut (*all).kinds[k] };
            for i in 0..HIST_BATCH {
                if i < n {
                    unsafe { atomic_add(&mut h.buckets[hist_batch_get(packed, i)], 1) };
                }
            }
            // A racy max is fine: a lost update can only under-report by
            // one concurrent batch of the same process.
            if n != 0 && t.hist_max[k] > h.max_ns {
                h.max_ns = t.hist_max[k];
            }
        }
    }
    t.hist_pending = [0; 2];
    t.hist_max = [0; 2];
    t.hist_count = [0; 2];
}

/// A zeroed histogram used as the initial value (too big for the stack).
#[map]
static SCRATCH_HIST: PerCpuArray<ProcessHistograms> = PerCpuArray::with_max_entries(1, 0);
