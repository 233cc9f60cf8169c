//! The only module that talks to the kernel through aya: it loads the
//! embedded programs, attaches them, and reads their maps.
//!
//! Everything downstream sees the kernel only through [`SampleSource`], so
//! the aggregation and symbolization stages are tested with [`fake::FakeSource`]
//! without root.

pub mod btf;
pub mod fake;
mod loader;
pub mod target_maps;
mod unwind_maps;

use std::time::Duration;

use profiler_common::{
    offcpu::{HistKey, Histogram, OffCpuKey, OffCpuValue},
    unwind::{Mapping, UnwindRow},
    Sample, Stat, STAT_COUNT,
};

pub use loader::{EbpfSource, LoadOptions, OffCpuOptions, UnwindOptions};
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
    #[error("rows {start}..{end} are outside the unwind rows array ({capacity} rows)")]
    RowsOutOfRange { start: u64, end: u64, capacity: u32 },
    #[error("the unwinder's mappings array is full ({0} slots); this process unwinds by frame pointer")]
    MappingsFull(u32),
}

/// Totals of the kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub counts: [u64; STAT_COUNT as usize],
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
}
