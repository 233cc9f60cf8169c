//! Off-CPU time of a recording read at every time-block boundary, so each
//! block has its own off-CPU profile (for `profiler-agent diff` on one
//! recording per side), while the whole recording's records come out as if
//! read once at the end.
//!
//! At a boundary the kernel's aggregate of ended blocks is read and cleared,
//! and every thread still blocked is cut there (its time so far counted,
//! the rest counted from the boundary on). A block that spans boundaries
//! thus arrives in pieces. For the whole recording the pieces of one block
//! are joined again: while the thread stays blocked at the same place its
//! pieces are held as a "chain"; when the block ends they count as ended
//! time, and when it is still going at the end of the recording they count
//! as still-blocked time, the label the summary's hung-thread list reads.

use std::collections::HashMap;

use profiler_common::offcpu::OffCpuKey;

use crate::bpf::OffCpuRecord;

/// The whole recording's off-CPU records, rebuilt from the boundaries.
#[derive(Default)]
pub struct Timeline {
    /// Ended blocks (and pieces of ended blocks), summed per key.
    ended: HashMap<OffCpuKey, OffCpuRecord>,
    /// Blocks going on at the last boundary: their pieces so far.
    chains: HashMap<OffCpuKey, OffCpuRecord>,
}

fn add(into: &mut HashMap<OffCpuKey, OffCpuRecord>, r: OffCpuRecord) {
    match into.get_mut(&r.key) {
        Some(e) => {
            e.value.total_ns += r.value.total_ns;
            e.value.count += r.value.count;
        }
        None => {
            into.insert(r.key, OffCpuRecord { still_blocked: false, ..r });
        }
    }
}

impl Timeline {
    /// One boundary: `ended` is what the kernel aggregate held (blocks that
    /// ended since the last boundary), `cut` the threads still blocked.
    pub fn boundary(&mut self, ended: Vec<OffCpuRecord>, cut: Vec<OffCpuRecord>) {
        self.end_chains(ended);
        let mut next = HashMap::with_capacity(cut.len());
        for r in cut {
            let mut piece = self.chains.remove(&r.key).unwrap_or(OffCpuRecord {
                value: Default::default(),
                still_blocked: false,
                ..r.clone()
            });
            piece.value.total_ns += r.value.total_ns;
            piece.value.count += r.value.count;
            next.insert(r.key, piece);
        }
        // A chain neither ended nor cut again: its thread's entry is gone
        // (the thread exited, or the map evicted it). Its time ended.
        for (_, c) in std::mem::replace(&mut self.chains, next) {
            add(&mut self.ended, c);
        }
    }

    /// Blocks that ended: their earlier pieces end with them.
    fn end_chains(&mut self, ended: Vec<OffCpuRecord>) {
        for r in ended {
            if let Some(c) = self.chains.remove(&r.key) {
                add(&mut self.ended, c);
            }
            add(&mut self.ended, r);
        }
    }

    /// The end of the recording, read like a boundary: returns every record
    /// of the recording, blocks still going at the end labelled so with all
    /// their time in the window.
    pub fn finish(mut self, ended: Vec<OffCpuRecord>, cut: Vec<OffCpuRecord>) -> Vec<OffCpuRecord> {
        self.end_chains(ended);
        let mut out = Vec::with_capacity(self.ended.len() + cut.len());
        for r in cut {
            let mut still = OffCpuRecord { still_blocked: true, ..r };
            if let Some(c) = self.chains.remove(&still.key) {
                still.value.total_ns += c.value.total_ns;
                still.value.count += c.value.count;
            }
            out.push(still);
        }
        for (_, c) in self.chains.drain() {
            add(&mut self.ended, c);
        }
        out.extend(self.ended.into_values());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::offcpu::OffCpuValue;

    fn rec(tid: u32, site: u64, ns: u64, still: bool) -> OffCpuRecord {
        OffCpuRecord {
            key: OffCpuKey { tgid: 1, tid, kernel_stack: site, user_stack: site, comm: [0; 16] },
            value: OffCpuValue { total_ns: ns, count: 1 },
            kernel: vec![site],
            user: vec![site],
            still_blocked: still,
        }
    }

    fn by_key(records: &[OffCpuRecord]) -> Vec<(u32, u64, u64, bool)> {
        let mut v: Vec<_> =
            records.iter().map(|r| (r.key.tid, r.key.user_stack, r.value.total_ns, r.still_blocked)).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_hang_across_boundaries_is_one_still_blocked_record_with_all_its_time() {
        let mut t = Timeline::default();
        t.boundary(vec![], vec![rec(7, 1, 400, true)]);
        t.boundary(vec![], vec![rec(7, 1, 1000, true)]);
        let out = t.finish(vec![], vec![rec(7, 1, 300, true)]);
        assert_eq!(by_key(&out), vec![(7, 1, 1700, true)]);
    }

    #[test]
    fn a_block_that_ends_after_a_boundary_is_ended_time_whole() {
        let mut t = Timeline::default();
        t.boundary(vec![rec(7, 2, 50, false)], vec![rec(7, 1, 400, true)]);
        // The block at site 1 ends; the thread then blocks at site 1 again
        // and is cut at the next boundary: a new chain, not the old one.
        t.boundary(vec![rec(7, 1, 200, false)], vec![rec(7, 1, 100, true)]);
        let out = t.finish(vec![], vec![rec(7, 1, 30, true)]);
        assert_eq!(by_key(&out), vec![(7, 1, 130, true), (7, 1, 600, false), (7, 2, 50, false)]);
    }

    #[test]
    fn a_chain_whose_thread_vanished_counts_as_ended_and_nothing_is_lost() {
        let mut t = Timeline::default();
        t.boundary(vec![], vec![rec(7, 1, 400, true), rec(8, 3, 10, true)]);
        t.boundary(vec![], vec![rec(8, 3, 1000, true)]);
        let out = t.finish(vec![rec(8, 3, 5, false)], vec![]);
        assert_eq!(by_key(&out), vec![(7, 1, 400, false), (8, 3, 1015, false)]);
        let total: u64 = out.iter().map(|r| r.value.total_ns).sum();
        assert_eq!(total, 400 + 10 + 1000 + 5);
    }

    #[test]
    fn without_boundaries_the_end_is_passed_through() {
        let out = Timeline::default().finish(vec![rec(1, 1, 5, false)], vec![rec(2, 2, 9, true)]);
        assert_eq!(by_key(&out), vec![(1, 1, 5, false), (2, 2, 9, true)]);
    }
}
