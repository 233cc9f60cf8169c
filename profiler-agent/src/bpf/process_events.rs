//! The kernel's process lifecycle events (`PROCESS_EVENTS` ring buffer).

use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use profiler_common::process::ProcessEvent;

use super::{BpfError, ProcessEventSource};

/// The ring buffer of fork, exec and exit events and its counters.
pub struct EbpfProcessEvents {
    ring: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
}

impl EbpfProcessEvents {
    pub(super) fn new(ring: aya::maps::Map, stats: aya::maps::Map) -> Result<Self, BpfError> {
        let ring = RingBuf::try_from(ring).map_err(|source| BpfError::Map { name: "PROCESS_EVENTS", source })?;
        let stats =
            PerCpuArray::try_from(stats).map_err(|source| BpfError::Map { name: "PROCESS_EVENT_STATS", source })?;
        Ok(Self { ring, stats })
    }

    fn counter(&self, i: u32) -> u64 {
        self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

impl ProcessEventSource for EbpfProcessEvents {
    fn drain(&mut self, out: &mut Vec<ProcessEvent>) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<ProcessEvent>() {
                // SAFETY: the kernel wrote a whole ProcessEvent (size
                // checked); records are only 8-byte aligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ProcessEvent>()) });
                n += 1;
            }
        }
        n
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.ring.as_fd().as_raw_fd())
    }

    fn lost(&self) -> u64 {
        self.counter(1)
    }
}
