//! Raw samples -> unique (process, thread, kernel stack, user stack) with a
//! count, per interval. This runs before symbolization so each unique stack
//! (and each unique address) is resolved once, however often it was sampled.

use std::collections::HashMap;

use profiler_common::{Sample, COMM_LEN};

use crate::{bpf::OffCpuRecord, process::LATEST_GENERATION};

/// [`StackKey::cpu`] when there is no CPU to name.
pub const NO_CPU: u32 = u32::MAX;

/// Identity of an aggregated stack. Addresses are raw, innermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub pid: u32,
    pub tid: u32,
    /// CPU of an on-CPU sample; [`NO_CPU`] for off-CPU time. Part of the key
    /// because OTLP consumers expect `cpu.logical_number` per sample; a
    /// thread that migrates splits into at most one stack per CPU.
    pub cpu: u32,
    pub thread_name: [u8; COMM_LEN],
    /// Which image of the process the stack ran in (one per exec, see
    /// `ProcessTable::observe_at`), so samples from before an exec are
    /// symbolized against the old image; `LATEST_GENERATION` when unknown.
    pub generation: u32,
    pub kernel: Box<[u64]>,
    pub user: Box<[u64]>,
    /// Off-CPU time of a thread still blocked at the end of the interval
    /// (labelled `state=still_blocked` by the exporters).
    pub still_blocked: bool,
}

impl StackKey {
    /// The thread name up to its first NUL, lossily decoded.
    pub fn thread_name(&self) -> String {
        let end = self.thread_name.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        String::from_utf8_lossy(&self.thread_name[..end]).into_owned()
    }
}

/// One interval's aggregate.
#[derive(Debug, Default)]
pub struct Aggregate {
    pub stacks: HashMap<StackKey, u64>,
    /// Samples added (kept or not).
    pub samples: u64,
    /// Samples dropped because the table was full.
    pub dropped: u64,
    /// Samples whose user or kernel stack was flagged truncated.
    pub truncated: u64,
}

/// Aggregates samples into at most `capacity` unique stacks. The bound keeps
/// memory flat when stacks never repeat (JIT code, a fork bomb); what does not
/// fit is counted in [`Aggregate::dropped`], never silently lost.
pub struct Aggregator {
    current: Aggregate,
    capacity: usize,
}

impl Aggregator {
    pub fn new(capacity: usize) -> Self {
        Self { current: Aggregate::default(), capacity }
    }

    /// Adds one sample with weight 1.
    pub fn add(&mut self, s: &Sample) {
        self.add_weighted(s, 1);
    }

    /// Adds one sample of a known image generation of its process.
    pub fn add_in_generation(&mut self, s: &Sample, generation: u32) {
        self.add_sample(s, 1, generation);
    }

    /// Adds one sample with the given weight (a count, or nanoseconds).
    pub fn add_weighted(&mut self, s: &Sample, weight: u64) {
        self.add_sample(s, weight, LATEST_GENERATION);
    }

    fn add_sample(&mut self, s: &Sample, weight: u64, generation: u32) {
        self.current.samples += 1;
        if s.flags != 0 {
            self.current.truncated += 1;
        }
        let key = StackKey {
            pid: s.tgid,
            tid: s.tid,
            cpu: s.cpu,
            thread_name: s.comm,
            generation,
            kernel: s.kernel_stack().into(),
            user: s.user_stack().into(),
            still_blocked: false,
        };
        self.insert(key, weight);
    }

    /// Adds an already-keyed stack (e.g. read from an in-kernel aggregate)
    /// with the given weight; counted as one sample.
    pub fn add_stack(&mut self, key: StackKey, weight: u64) {
        self.current.samples += 1;
        self.insert(key, weight);
    }

    fn insert(&mut self, key: StackKey, weight: u64) {
        let full = self.current.stacks.len() >= self.capacity;
        match self.current.stacks.get_mut(&key) {
            Some(v) => *v += weight,
            None if full => self.current.dropped += 1,
            None => {
                self.current.stacks.insert(key, weight);
            }
        }
    }

    /// Number of unique stacks so far.
    pub fn len(&self) -> usize {
        self.current.stacks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.stacks.is_empty()
    }

    /// Samples added in the current interval.
    pub fn samples(&self) -> u64 {
        self.current.samples
    }

    /// Ends the interval and returns its aggregate.
    pub fn take(&mut self) -> Aggregate {
        std::mem::take(&mut self.current)
    }
}

/// Off-CPU records read from the kernel as an aggregate the symbolizer
/// understands, weighted by blocked nanoseconds.
pub fn from_off_cpu(records: &[OffCpuRecord], capacity: usize) -> Aggregate {
    let mut agg = Aggregator::new(capacity);
    for r in records {
        let key = StackKey {
            pid: r.key.tgid,
            tid: r.key.tid,
            cpu: NO_CPU,
            thread_name: r.key.comm,
            generation: LATEST_GENERATION,
            kernel: r.kernel.clone().into(),
            user: r.user.clone().into(),
            still_blocked: r.still_blocked,
        };
        agg.add_stack(key, r.value.total_ns);
    }
    agg.take()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::fake::sample;

    #[test]
    fn identical_stacks_of_one_thread_are_counted_together() {
        let mut agg = Aggregator::new(100);
        agg.add(&sample(10, 11, "w", &[], &[0x1, 0x2]));
        agg.add(&sample(10, 11, "w", &[], &[0x1, 0x2]));
        agg.add(&sample(10, 11, "w", &[0xffff], &[0x1, 0x2]));
        agg.add(&sample(10, 12, "w", &[], &[0x1, 0x2]));
        let a = agg.take();
        assert_eq!(a.samples, 4);
        assert_eq!(a.stacks.len(), 3);
        let key = StackKey {
            pid: 10,
            tid: 11,
            cpu: 0,
            thread_name: sample(0, 0, "w", &[], &[]).comm,
            generation: LATEST_GENERATION,
            kernel: [].into(),
            user: [0x1, 0x2].into(),
            still_blocked: false,
        };
        assert_eq!(a.stacks[&key], 2);
        assert_eq!(key.thread_name(), "w");
        assert!(agg.is_empty(), "take starts a new interval");
    }

    #[test]
    fn beyond_capacity_new_stacks_are_dropped_and_counted_but_known_ones_still_count() {
        let mut agg = Aggregator::new(2);
        agg.add(&sample(1, 1, "a", &[], &[1]));
        agg.add(&sample(1, 1, "a", &[], &[2]));
        agg.add(&sample(1, 1, "a", &[], &[3]));
        agg.add(&sample(1, 1, "a", &[], &[1]));
        let a = agg.take();
        assert_eq!(a.dropped, 1);
        assert_eq!(a.stacks.values().sum::<u64>(), 3);
    }

    #[test]
    fn off_cpu_records_become_weighted_stacks() {
        let key = profiler_common::offcpu::OffCpuKey { tgid: 1, tid: 2, kernel_stack: 5, user_stack: 6, comm: [0; 16] };
        let value = profiler_common::offcpu::OffCpuValue { total_ns: 1_000, count: 4 };
        let agg = from_off_cpu(
            &[OffCpuRecord { key, value, kernel: vec![0xffff], user: vec![1, 2], still_blocked: true }],
            10,
        );
        assert_eq!(agg.stacks.len(), 1);
        let (k, v) = agg.stacks.iter().next().unwrap();
        assert_eq!((k.pid, k.tid, &*k.user, *v), (1, 2, &[1u64, 2][..], 1_000));
        assert!(k.still_blocked, "the still-blocked mark survives aggregation");
    }

    #[test]
    fn weights_are_summed() {
        let mut agg = Aggregator::new(10);
        agg.add_weighted(&sample(1, 1, "a", &[], &[1]), 500);
        agg.add_weighted(&sample(1, 1, "a", &[], &[1]), 250);
        assert_eq!(agg.take().stacks.values().copied().collect::<Vec<_>>(), vec![750]);
    }
}
