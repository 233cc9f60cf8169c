//! An in-memory [`SampleSource`] for tests: samples are queued by the test and
//! handed out in batches, and the counters are whatever the test sets.

use std::{collections::VecDeque, time::Duration};

use profiler_common::{Sample, Stat};

use super::{BpfError, KernelStats, SampleSource};

/// A fake source that replays queued samples.
#[derive(Default)]
pub struct FakeSource {
    pub queue: VecDeque<Sample>,
    pub stats: KernelStats,
    /// At most this many samples per `poll`; 0 means all.
    pub batch: usize,
}

impl FakeSource {
    /// Queues a sample and counts it as sent, as the kernel would.
    pub fn push(&mut self, sample: Sample) {
        self.stats.counts[Stat::SampleEvents as usize] += 1;
        self.stats.counts[Stat::SamplesSent as usize] += 1;
        self.queue.push_back(sample);
    }
}

impl SampleSource for FakeSource {
    fn poll(&mut self, out: &mut Vec<Sample>, _timeout: Duration) -> Result<usize, BpfError> {
        let n = if self.batch == 0 { self.queue.len() } else { self.batch.min(self.queue.len()) };
        out.extend(self.queue.drain(..n));
        Ok(n)
    }

    fn stats(&self) -> Result<KernelStats, BpfError> {
        Ok(self.stats)
    }
}

/// Builds a [`Sample`] from stacks given innermost first.
pub fn sample(tgid: u32, tid: u32, comm: &str, kernel: &[u64], user: &[u64]) -> Sample {
    // SAFETY: Sample is plain old data; all-zero is a valid value.
    let mut s: Sample = unsafe { std::mem::zeroed() };
    s.tgid = tgid;
    s.tid = tid;
    let n = comm.len().min(s.comm.len());
    s.comm[..n].copy_from_slice(&comm.as_bytes()[..n]);
    s.kernel[..kernel.len()].copy_from_slice(kernel);
    s.kernel_len = kernel.len() as u32;
    s.user[..user.len()].copy_from_slice(user);
    s.user_len = user.len() as u32;
    s
}

/// An in-memory [`UnwindMaps`](super::UnwindMaps): a rows array and a
/// process map the test can inspect.
pub struct FakeUnwindMaps {
    pub rows: Vec<profiler_common::unwind::UnwindRow>,
    pub processes: std::collections::HashMap<u32, Vec<profiler_common::unwind::Mapping>>,
    pub python: std::collections::HashMap<u32, profiler_common::python::PyProcess>,
}

impl FakeUnwindMaps {
    pub fn new(capacity: u32) -> Self {
        Self {
            rows: vec![Default::default(); capacity as usize],
            processes: Default::default(),
            python: Default::default(),
        }
    }
}

impl super::UnwindMaps for FakeUnwindMaps {
    fn capacity(&self) -> u32 {
        self.rows.len() as u32
    }

    fn write_rows(&mut self, start: u32, rows: &[profiler_common::unwind::UnwindRow]) -> Result<(), BpfError> {
        let end = start as usize + rows.len();
        if end > self.rows.len() {
            return Err(BpfError::RowsOutOfRange { start: start.into(), end: end as u64, capacity: self.capacity() });
        }
        self.rows[start as usize..end].copy_from_slice(rows);
        Ok(())
    }

    fn set_process(&mut self, tgid: u32, m: &[profiler_common::unwind::Mapping]) -> Result<(), BpfError> {
        self.processes.insert(tgid, m.to_vec());
        Ok(())
    }

    fn remove_process(&mut self, tgid: u32) -> Result<(), BpfError> {
        self.processes.remove(&tgid);
        Ok(())
    }

    fn set_python(&mut self, tgid: u32, record: Option<&profiler_common::python::PyProcess>) -> Result<(), BpfError> {
        match record {
            Some(r) => self.python.insert(tgid, *r),
            None => self.python.remove(&tgid),
        };
        Ok(())
    }
}

/// An in-memory [`ProcessEventSource`](super::ProcessEventSource): events
/// queued by the test (through a shared handle, so the test can feed a
/// tracker's running thread).
#[derive(Clone, Default)]
pub struct FakeProcessEvents {
    pub queue: std::sync::Arc<std::sync::Mutex<VecDeque<profiler_common::process::ProcessEvent>>>,
}

impl FakeProcessEvents {
    pub fn push(&self, kind: u32, tgid: u32, parent: u32, time_ns: u64, comm: &str) {
        let mut e = profiler_common::process::ProcessEvent { kind, tgid, parent, time_ns, ..Default::default() };
        let n = comm.len().min(e.comm.len());
        e.comm[..n].copy_from_slice(&comm.as_bytes()[..n]);
        self.queue.lock().unwrap().push_back(e);
    }
}

impl super::ProcessEventSource for FakeProcessEvents {
    fn drain(&mut self, out: &mut Vec<profiler_common::process::ProcessEvent>) -> usize {
        let mut q = self.queue.lock().unwrap();
        let n = q.len();
        out.extend(q.drain(..));
        n
    }
}
