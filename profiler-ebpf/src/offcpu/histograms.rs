//! The per-process latency histograms (run-queue wait and off-CPU block
//! durations), created at a process's first event and read and cleared by
//! the agent.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use profiler_common::{
    offcpu::{hist_bucket, Histogram, ProcessHistograms},
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
pub(super) fn process_histograms(tgid: u32) -> Option<*mut ProcessHistograms> {
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

#[inline(always)]
pub(super) fn record_latency(hists: Option<*mut ProcessHistograms>, kind: u32, ns: u64) {
    let Some(all) = hists else { return };
    let h: *mut Histogram = unsafe { &mut (*all).kinds[kind as usize & 1] };
    let b = hist_bucket(ns);
    unsafe {
        atomic_add(&mut (*h).buckets[b], 1);
        // A racy max is fine: a lost update can only under-report by one
        // concurrent sample of the same process.
        if ns > (*h).max_ns {
            (*h).max_ns = ns;
        }
    }
}

/// A zeroed histogram used as the initial value (too big for the stack).
#[map]
static SCRATCH_HIST: PerCpuArray<ProcessHistograms> = PerCpuArray::with_max_entries(1, 0);
