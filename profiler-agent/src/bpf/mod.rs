//! The only module that talks to the kernel through aya: it loads the
//! embedded programs, attaches them, and reads their maps.
//!
//! Everything downstream sees the kernel only through [`SampleSource`], so
//! the aggregation and symbolization stages are tested with [`fake::FakeSource`]
//! without root.

mod loader;
pub mod fake;

use std::time::Duration;

use profiler_common::{Sample, Stat, STAT_COUNT};

pub use loader::{EbpfSource, LoadOptions};

/// Errors from loading, attaching and reading the BPF programs.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("this agent was built with AYA_BUILD_SKIP=1 and contains no eBPF programs; rebuild it with `cargo xtask build`")]
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

/// A source of raw on-CPU samples.
pub trait SampleSource {
    /// Waits at most `timeout` for samples, then appends every available one
    /// to `out` and returns how many were appended.
    fn poll(&mut self, out: &mut Vec<Sample>, timeout: Duration) -> Result<usize, BpfError>;

    /// Current kernel-side counters.
    fn stats(&self) -> Result<KernelStats, BpfError>;

    /// Cumulative run time and run count of the loaded programs, when the
    /// kernel keeps them (`kernel.bpf_stats_enabled`).
    fn run_time(&self) -> Option<(Duration, u64)> {
        None
    }
}
