//! Sampled off-CPU (`--off-cpu-sample N`): the kernel takes stacks for one
//! block in N, at random, and adds a sampled block's time N-fold, so each
//! stack's sum is an unbiased estimate of the time blocked there. Every
//! block, sampled or not, is also added to its thread's exact total
//! (`ThreadTotal`). This stage scales each thread's records so that they
//! sum to that total: per-thread off-CPU time is then exact, and only its
//! split between stacks is estimated. A thread with time but no sampled
//! block in the profile gets one record without stacks, so its time is
//! not lost.
//!
//! Scaling by the thread's own total is a ratio estimate: for one thread
//! with n sampled blocks its bias is of order 1/n of the variance, far
//! below the sampling noise, which `--off-cpu-sample` trades for cost
//! (`cargo xtask bench offcpu --off-cpu-sample N` measures the cost).

use std::collections::HashMap;

use profiler_common::offcpu::{found_blocked_stack_id, OffCpuKey, OffCpuValue, ThreadTotal};

use crate::bpf::OffCpuRecord;

/// What [`calibrate`] did, for the debug log and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calibration {
    /// Threads whose records were scaled to their total.
    pub scaled: usize,
    /// Threads with blocked time but no sampled block: given one record
    /// without stacks.
    pub unsampled: usize,
    /// Threads with records but no total (the kernel's totals map was
    /// full): left as sampled.
    pub without_total: usize,
}

/// Per-thread totals added up over several reads (a recording reads them
/// at every time-block boundary, so the kernel's map never fills).
#[derive(Clone, Debug, Default)]
pub struct Totals(HashMap<u32, ThreadTotal>);

impl Totals {
    pub fn add(&mut self, read: Vec<(u32, ThreadTotal)>) {
        for (tid, t) in read {
            let e = self.0.entry(tid).or_insert(ThreadTotal { tgid: t.tgid, ..Default::default() });
            e.ns += t.ns;
            e.blocks += t.blocks;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<(u32, ThreadTotal)>> for Totals {
    fn from(read: Vec<(u32, ThreadTotal)>) -> Self {
        let mut t = Totals::default();
        t.add(read);
        t
    }
}

/// Whether a record is a measurement rather than an estimate: the time of
/// a block whose stacks were taken whole (found blocked at the start, or a
/// long unsampled block taken at a cut), which counts once, not N-fold.
fn is_exact(r: &OffCpuRecord) -> bool {
    r.key.user_stack == found_blocked_stack_id(r.key.tid)
}

/// Per thread: the sums of its exact and estimated records.
#[derive(Default)]
struct Sums {
    exact: u128,
    estimated: u128,
}

/// Scales each thread's records in `records` to its exact total in
/// `totals`. The estimated records share what the exact ones leave of the
/// total, in proportion to their estimates; exact records keep their time.
/// Only where that cannot work (no estimate, or exact time above the
/// total, which a race at a cut can cause) are all of the thread's records
/// scaled together. Integer nanoseconds: each record gets the floor of its
/// share, and what rounding leaves goes to the largest record scaled, so a
/// thread's records sum to its total exactly.
pub fn calibrate(records: &mut Vec<OffCpuRecord>, totals: &Totals) -> Calibration {
    let mut out = Calibration::default();
    let mut sums: HashMap<u32, Sums> = HashMap::new();
    for r in records.iter() {
        let e = sums.entry(r.key.tid).or_default();
        let v = u128::from(r.value.total_ns);
        if is_exact(r) {
            e.exact += v;
        } else {
            e.estimated += v;
        }
    }
    // Which records of each thread are scaled, their sum and the target.
    let plan: HashMap<u32, (bool, u128, u128)> = sums
        .iter()
        .filter_map(|(tid, s)| {
            let total = u128::from(totals.0.get(tid)?.ns);
            Some(if s.estimated > 0 && s.exact <= total {
                (*tid, (false, s.estimated, total - s.exact))
            } else {
                (*tid, (true, s.exact + s.estimated, total))
            })
        })
        .collect();
    let scaled = |r: &OffCpuRecord| plan.get(&r.key.tid).is_some_and(|&(all, _, _)| all || !is_exact(r));
    // The largest record scaled per thread, which takes the rounding.
    let mut largest: HashMap<u32, usize> = HashMap::new();
    for (i, r) in records.iter().enumerate().filter(|(_, r)| scaled(r)) {
        let l = largest.entry(r.key.tid).or_insert(i);
        if r.value.total_ns > records[*l].value.total_ns {
            *l = i;
        }
    }
    let mut given: HashMap<u32, u128> = HashMap::new();
    for r in records.iter_mut() {
        if !scaled(r) {
            continue;
        }
        let (_, sum, target) = plan[&r.key.tid];
        let share = if sum == 0 { 0 } else { u128::from(r.value.total_ns) * target / sum };
        r.value.total_ns = share as u64;
        *given.entry(r.key.tid).or_default() += share;
    }
    for tid in sums.keys() {
        match plan.get(tid) {
            Some(&(_, _, target)) => {
                out.scaled += 1;
                if let Some(&i) = largest.get(tid) {
                    records[i].value.total_ns += (target - given[tid]) as u64;
                }
            }
            None => out.without_total += 1,
        }
    }
    let mut unsampled: Vec<(&u32, &ThreadTotal)> =
        totals.0.iter().filter(|(tid, t)| t.ns > 0 && !sums.contains_key(tid)).collect();
    unsampled.sort_by_key(|(tid, _)| **tid);
    for (&tid, t) in unsampled {
        out.unsampled += 1;
        records.push(OffCpuRecord {
            key: OffCpuKey { tgid: t.tgid, tid, kernel_stack: 0, user_stack: 0, comm: [0; 16] },
            value: OffCpuValue { total_ns: t.ns, count: t.blocks },
            kernel: Vec::new(),
            user: Vec::new(),
            still_blocked: false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(tid: u32, stack: u64, ns: u64) -> OffCpuRecord {
        OffCpuRecord {
            key: OffCpuKey { tgid: 1, tid, kernel_stack: stack, user_stack: stack, comm: [0; 16] },
            value: OffCpuValue { total_ns: ns, count: 1 },
            kernel: vec![stack],
            user: vec![stack],
            still_blocked: false,
        }
    }

    fn total(tid: u32, ns: u64) -> (u32, ThreadTotal) {
        (tid, ThreadTotal { tgid: 1, _pad: 0, ns, blocks: 3 })
    }

    #[test]
    fn scales_each_thread_to_its_total_keeping_the_split() {
        let mut r = vec![record(7, 1, 300), record(7, 2, 100), record(8, 3, 50)];
        let c = calibrate(&mut r, &Totals::from(vec![total(7, 200), total(8, 50)]));
        assert_eq!(c, Calibration { scaled: 2, unsampled: 0, without_total: 0 });
        assert_eq!(r.iter().map(|r| r.value.total_ns).collect::<Vec<_>>(), [150, 50, 50]);
    }

    #[test]
    fn rounding_goes_to_the_largest_record() {
        let mut r = vec![record(7, 1, 1), record(7, 2, 1), record(7, 3, 2)];
        calibrate(&mut r, &Totals::from(vec![total(7, 10)]));
        assert_eq!(r.iter().map(|r| r.value.total_ns).collect::<Vec<_>>(), [2, 2, 6]);
    }

    #[test]
    fn a_thread_without_samples_keeps_its_time_without_stacks() {
        let mut r = vec![record(7, 1, 10)];
        let c = calibrate(&mut r, &Totals::from(vec![total(7, 10), total(9, 40), total(10, 0)]));
        assert_eq!(c.unsampled, 1, "a zero total adds nothing");
        let added = r.last().unwrap();
        assert_eq!((added.key.tid, added.value.total_ns, added.value.count), (9, 40, 3));
        assert!(added.kernel.is_empty() && added.user.is_empty());
    }

    #[test]
    fn records_without_a_total_are_left_as_sampled() {
        let mut r = vec![record(7, 1, 10), record(8, 1, 20)];
        let c = calibrate(&mut r, &Totals::from(vec![total(7, 5)]));
        assert_eq!(c.without_total, 1);
        assert_eq!(r[1].value.total_ns, 20);
        assert_eq!(r[0].value.total_ns, 5);
    }

    #[test]
    fn totals_add_up_over_reads() {
        let mut t = Totals::default();
        t.add(vec![total(7, 10)]);
        t.add(vec![total(7, 5), total(8, 1)]);
        let mut r = vec![record(7, 1, 1), record(8, 1, 1)];
        calibrate(&mut r, &t);
        assert_eq!((r[0].value.total_ns, r[1].value.total_ns), (15, 1));
    }

    fn exact(tid: u32, ns: u64) -> OffCpuRecord {
        let mut r = record(tid, 9, ns);
        r.key.user_stack = found_blocked_stack_id(tid);
        r
    }

    #[test]
    fn exact_records_keep_their_time_and_estimates_share_the_rest() {
        // A hung block measured at 3 s, and sampled estimates that overshoot.
        let mut r = vec![exact(7, 3_000), record(7, 1, 1_500), record(7, 2, 500)];
        calibrate(&mut r, &Totals::from(vec![total(7, 4_000)]));
        assert_eq!(r.iter().map(|r| r.value.total_ns).collect::<Vec<_>>(), [3_000, 750, 250]);
    }

    #[test]
    fn a_thread_with_only_exact_records_is_scaled_whole() {
        // The time of its block before its stacks were taken is in the
        // total only: it belongs to that same block.
        let mut r = vec![exact(7, 3_000)];
        calibrate(&mut r, &Totals::from(vec![total(7, 4_000)]));
        assert_eq!(r[0].value.total_ns, 4_000);
        // Exact time above the total (a race at a cut): all scaled down.
        let mut r = vec![exact(7, 3_000), record(7, 1, 1_000)];
        calibrate(&mut r, &Totals::from(vec![total(7, 2_000)]));
        assert_eq!(r.iter().map(|r| r.value.total_ns).collect::<Vec<_>>(), [1_500, 500]);
    }

    proptest! {
        /// Whatever the records and totals: a thread with a total sums to it
        /// exactly; where its estimates can absorb the difference its exact
        /// records keep their time and each estimate stays within rounding
        /// of its share; a thread without a total is untouched.
        #[test]
        fn per_thread_sums_are_exact(
            recs in proptest::collection::vec((0u32..6, 0u64..4, 0u64..1_000_000_000_000, any::<bool>()), 0..40),
            tots in proptest::collection::vec((0u32..8, 0u64..4_000_000_000_000), 0..8),
        ) {
            let mut records: Vec<OffCpuRecord> = recs
                .iter()
                .map(|&(t, s, ns, x)| if x { exact(t, ns) } else { record(t, s, ns) })
                .collect();
            let before = records.clone();
            let totals = Totals::from(tots.iter().map(|&(t, ns)| total(t, ns)).collect::<Vec<_>>());
            calibrate(&mut records, &totals);
            let mut sums: HashMap<u32, u64> = HashMap::new();
            for r in &records {
                *sums.entry(r.key.tid).or_default() += r.value.total_ns;
            }
            for (tid, t) in &totals.0 {
                if t.ns > 0 || before.iter().any(|r| r.key.tid == *tid) {
                    prop_assert_eq!(sums.get(tid).copied().unwrap_or(0), t.ns, "thread {}", tid);
                }
            }
            for (i, b) in before.iter().enumerate() {
                let after = &records[i];
                let Some(t) = totals.0.get(&b.key.tid) else {
                    prop_assert_eq!(after.value.total_ns, b.value.total_ns);
                    continue;
                };
                let mine: Vec<&OffCpuRecord> = before.iter().filter(|r| r.key.tid == b.key.tid).collect();
                let sum = |exact: bool| -> u128 {
                    mine.iter().filter(|r| is_exact(r) == exact).map(|r| u128::from(r.value.total_ns)).sum()
                };
                let (exact_sum, estimated) = (sum(true), sum(false));
                if estimated > 0 && exact_sum <= u128::from(t.ns) {
                    if is_exact(b) {
                        prop_assert_eq!(after.value.total_ns, b.value.total_ns);
                    } else {
                        let share = u128::from(b.value.total_ns) * (u128::from(t.ns) - exact_sum) / estimated;
                        let got = u128::from(after.value.total_ns);
                        let n = mine.len() as u128;
                        prop_assert!(got >= share && got <= share + n, "record {}: {} against {}", i, got, share);
                    }
                }
            }
        }
    }
}
