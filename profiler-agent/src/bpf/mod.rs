//! The only module that talks to the kernel through aya: it loads the
//! embedded programs, attaches them, and reads their maps.
//!
//! Everything downstream sees the kernel only through [`SampleSource`], so
//! the aggregation and symbolization stages are tested with [`fake::FakeSource`]
//! without root.

mod attach;
pub mod btf;
pub mod fake;
mod loader;
pub mod probe;
mod process_events;
pub mod target_maps;
mod unwind_maps;

use std::time::Duration;

use profiler_common::{
    offcpu::{BlockedRegs, HistKey, Histogram, OffCpuKey, OffCpuValue, ThreadTotal},
    unwind::{Mapping, UnwindRow},
    Sample, Stat, STAT_COUNT,
};

pub use loader::{EbpfSource, LoadOptions, OffCpuOptions, UnwindOptions};
pub use process_events::EbpfProcessEvents;
pub use unwind_maps::EbpfUnwindMaps;

/// Errors from loading, attaching and reading the BPF programs.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this agent was built with AYA_BUILD_SKIP=1 and contains no eBPF programs; rebuild it with `cargo xtask build`"
    )]
    NotBuilt,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program or map named `{0}`; the agent binary is inconsistent")]
    Missing(&'static str),
    #[error("program `{name}` could not be loaded or attached: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map `{name}` could not be used: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("listing online CPUs from {0} failed: {1}")]
    Cpus(&'static str, #[source] std::io::Error),
    #[error("waiting for samples failed: {0}")]
    Poll(#[source] std::io::Error),
    #[error("reading the kernel's BTF (/sys/kernel/btf/vmlinux) failed: {0}")]
    BtfRead(#[source] std::io::Error),
    #[error("the kernel's BTF lacks a needed type: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("mapping the unwind rows array into memory failed: {0}")]
    Mmap(#[source] std::io::Error),
    #[error("writing an unwinder array (BPF_MAP_UPDATE_BATCH) failed: {0}")]
    ArrayWrite(#[source] std::io::Error),
    #[error("rows {start}..{end} are outside the unwind rows array ({capacity} rows)")]
    RowsOutOfRange { start: u64, end: u64, capacity: u32 },
    #[error("running the task iterator failed: {0}")]
    Iter(#[source] std::io::Error),
    #[error("the unwinder's mappings array is full ({0} slots); this process unwinds by frame pointer")]
    MappingsFull(u32),
}

/// Totals of the kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelStats {
    pub counts: [u64; STAT_COUNT as usize],
}

// Written out: `Default` is derived for arrays of at most 32 elements.
impl Default for KernelStats {
    fn default() -> Self {
        KernelStats { counts: [0; STAT_COUNT as usize] }
    }
}

impl KernelStats {
    pub fn get(&self, stat: Stat) -> u64 {
        self.counts[stat as usize]
    }

    /// Samples that were not delivered for a reason other than the pid
    /// filter or idle CPUs: the ones a user should worry about.
    pub fn lost(&self) -> u64 {
        self.get(Stat::RingBufferFull)
    }
}

/// Blocked time of one thread at one pair of stacks, read from the kernel.
#[derive(Clone, Debug)]
pub struct OffCpuRecord {
    pub key: OffCpuKey,
    pub value: OffCpuValue,
    /// Kernel stack, innermost first (empty if not captured).
    pub kernel: Vec<u64>,
    /// User stack, innermost first.
    pub user: Vec<u64>,
    /// Time of a thread still blocked at the cut (or the end), counted up
    /// to it; its block goes on.
    pub still_blocked: bool,
}

/// Cumulative run time of one loaded program (`kernel.bpf_stats_enabled`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRunTime {
    pub name: String,
    pub time: Duration,
    pub runs: u64,
}

/// What the per-thread scheduler map holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapOccupancy {
    /// Threads with an entry (seen, not yet exited).
    pub threads: Vec<u32>,
    /// Of those, threads currently blocked.
    pub blocked: usize,
    /// Of those, threads waiting on a run queue.
    pub runnable: usize,
}

/// The kernel side as the agent sees it: a stream of on-CPU samples plus the
/// maps the scheduler programs aggregate into.
pub trait SampleSource {
    /// Waits at most `timeout` for samples, then appends every available one
    /// to `out` and returns how many were appended.
    fn poll(&mut self, out: &mut Vec<Sample>, timeout: Duration) -> Result<usize, BpfError>;

    /// Current kernel-side counters.
    fn stats(&self) -> Result<KernelStats, BpfError>;

    /// Cumulative run time and run count of each loaded program, when the
    /// kernel keeps them (`kernel.bpf_stats_enabled`).
    fn run_time(&self) -> Vec<ProgramRunTime> {
        Vec::new()
    }

    /// Detaches every program; maps stay readable.
    fn detach(&mut self) -> Result<(), BpfError> {
        Ok(())
    }

    /// Reads and clears the off-CPU aggregate, stacks resolved.
    fn take_off_cpu(&mut self) -> Result<Vec<OffCpuRecord>, BpfError> {
        Ok(Vec::new())
    }

    /// Reads and clears the per-process latency histograms.
    fn take_histograms(&mut self) -> Result<Vec<(HistKey, Histogram)>, BpfError> {
        Ok(Vec::new())
    }

    /// Threads present in the per-thread scheduler maps.
    fn occupancy(&self) -> Result<MapOccupancy, BpfError> {
        Ok(MapOccupancy::default())
    }

    /// Processes the switch program met before their unwind tables were
    /// loaded, since the last call (from notices in the sample stream).
    fn take_notices(&mut self) -> Vec<u32> {
        Vec::new()
    }

    /// Finds the threads that were blocked before the programs were
    /// attached and counts them blocked from `since_ns` (CLOCK_MONOTONIC);
    /// returns each one's tid and user registers, whose user stack the
    /// caller unwinds and stores with [`store_stack`](Self::store_stack).
    fn find_blocked(&mut self, _since_ns: u64) -> Result<Vec<(u32, BlockedRegs)>, BpfError> {
        Ok(Vec::new())
    }

    /// Registers of threads the last cut found in a long unsampled block
    /// (sampled mode), taken once: their records' user stack id is
    /// `found_blocked_stack_id(tid)`, which the caller unwinds and stores.
    fn take_blocked_regs(&mut self) -> Result<Vec<(u32, BlockedRegs)>, BpfError> {
        Ok(Vec::new())
    }

    /// Each thread's exact blocked time since the last call (sampled mode;
    /// empty when every block is recorded), by tid.
    fn take_thread_totals(&mut self) -> Result<Vec<(u32, ThreadTotal)>, BpfError> {
        Ok(Vec::new())
    }

    /// Stores a stack (innermost first) under `id` for the off-CPU records.
    fn store_stack(&mut self, _id: u64, _frames: &[u64]) -> Result<(), BpfError> {
        Ok(())
    }

    /// Opens the off-CPU window at `start_ns` (CLOCK_MONOTONIC): blocked
    /// time before it is not counted.
    fn open_window(&mut self, _start_ns: u64) -> Result<(), BpfError> {
        Ok(())
    }

    /// Closes the off-CPU window at `end_ns`: blocked time after it is not
    /// counted, though the programs stay attached.
    fn close_window(&mut self, _end_ns: u64) -> Result<(), BpfError> {
        Ok(())
    }

    /// Counts every thread still blocked up to `at_ns` (CLOCK_MONOTONIC) and
    /// returns that time, stacks resolved; their blocks count on from
    /// `at_ns`, so no time is counted twice.
    fn cut_still_blocked(&mut self, _at_ns: u64) -> Result<Vec<OffCpuRecord>, BpfError> {
        Ok(Vec::new())
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Process lifecycle events from the kernel (fork, exec, exit); a seam so
/// the lifecycle tracker is tested without root.
pub trait ProcessEventSource: Send {
    /// Appends every available event to `out`, oldest first; returns how
    /// many.
    fn drain(&mut self, out: &mut Vec<profiler_common::process::ProcessEvent>) -> usize;
    /// A descriptor that polls readable when events wait; `None`: the
    /// tracker polls on a timer.
    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Events the kernel could not deliver (ring buffer full).
    fn lost(&self) -> u64 {
        0
    }
}

/// The unwinder's maps as the agent writes them: table rows into one
/// fixed-size array, and each process's executable mappings. A seam so the
/// table registry is tested without root.
pub trait UnwindMaps: Send {
    /// Rows the array holds (the memory budget).
    fn capacity(&self) -> u32;
    /// Writes `rows` at `start`. The range must not be referenced by any
    /// process's mappings while it is written.
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> Result<(), BpfError>;
    /// Sets (replaces) the executable mappings of `tgid`, sorted by start.
    fn set_process(&mut self, tgid: u32, mappings: &[Mapping]) -> Result<(), BpfError>;
    /// Forgets `tgid`; absent is fine.
    fn remove_process(&mut self, tgid: u32) -> Result<(), BpfError>;
    /// Sets, or with `None` clears, the CPython walk's record of `tgid`.
    fn set_python(&mut self, tgid: u32, record: Option<&profiler_common::python::PyProcess>) -> Result<(), BpfError>;
}

impl<M: UnwindMaps + ?Sized> UnwindMaps for &mut M {
    fn capacity(&self) -> u32 {
        (**self).capacity()
    }
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> Result<(), BpfError> {
        (**self).write_rows(start, rows)
    }
    fn set_process(&mut self, tgid: u32, mappings: &[Mapping]) -> Result<(), BpfError> {
        (**self).set_process(tgid, mappings)
    }
    fn remove_process(&mut self, tgid: u32) -> Result<(), BpfError> {
        (**self).remove_process(tgid)
    }
    fn set_python(&mut self, tgid: u32, record: Option<&profiler_common::python::PyProcess>) -> Result<(), BpfError> {
        (**self).set_python(tgid, record)
    }
}
