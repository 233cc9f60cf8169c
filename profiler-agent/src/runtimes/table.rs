//! The JIT symbols of one process: an interval map from code address to
//! symbol where a later entry replaces whatever it overlaps (the runtimes
//! reuse code memory after freeing it, and their files are append-only, so
//! the last word on an address is the true one).

use std::{collections::BTreeMap, ops::Bound, sync::Arc};

/// Where a pc inside a JIT function came from in the source, from jitdump's
/// `DEBUG_INFO` (the entry with the highest address at or below the pc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineEntry {
    /// Offset from the function's start.
    pub offset: u64,
    pub line: u32,
    pub file: Arc<str>,
}

/// One JIT-compiled function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitSymbol {
    /// The function as the runtime names it, without a source location the
    /// runtime appended (V8's ` /path/file.js:LINE:COL`), which is in
    /// `file` and `line`.
    pub name: String,
    pub file: Option<Arc<str>>,
    /// The function's first line (perf maps), or the line of its first
    /// instruction (jitdump).
    pub line: Option<u32>,
    /// jitdump line table, sorted by offset; empty for perf maps.
    pub lines: Box<[LineEntry]>,
}

impl JitSymbol {
    /// The file and line of the instruction `offset` bytes into the function.
    pub fn line_at(&self, offset: u64) -> (Option<Arc<str>>, Option<u32>) {
        let i = self.lines.partition_point(|l| l.offset <= offset);
        match i.checked_sub(1).and_then(|i| self.lines.get(i)) {
            Some(l) => (Some(l.file.clone()), Some(l.line)),
            None => (self.file.clone(), self.line),
        }
    }

    /// Approximate heap bytes, for the memory bounds.
    fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.name.len()
            + self.file.as_ref().map_or(0, |f| f.len())
            + self.lines.len() * (std::mem::size_of::<LineEntry>() + 16)
    }
}

#[derive(Clone, Debug)]
struct Range {
    end: u64,
    /// Insertion order: eviction drops the oldest.
    seq: u64,
    sym: Arc<JitSymbol>,
}

/// Per-entry bookkeeping on top of the symbol: the B-tree slot (key, value
/// and a share of node overhead). `cargo bench --bench jit` measures the
/// live heap of a 100k-line V8-like map with a counting allocator: 206
/// bytes per line, where an overhead of 64 estimated 180; 90 makes the
/// estimate (which the memory bounds use) match.
const ENTRY_OVERHEAD: usize = 90;

/// Interval map of one process's JIT code, bounded in bytes.
#[derive(Debug, Default)]
pub struct JitTable {
    ranges: BTreeMap<u64, Range>,
    next_seq: u64,
    bytes: usize,
}

impl JitTable {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Approximate memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds `[start, start + size)`, trimming or removing what it overlaps.
    /// Empty or overflowing ranges are ignored (returns false).
    pub fn insert(&mut self, start: u64, size: u64, sym: Arc<JitSymbol>) -> bool {
        let Some(end) = start.checked_add(size).filter(|_| size > 0) else { return false };
        // An earlier range that starts before `start` and reaches into it.
        if let Some((&s, r)) = self.ranges.range(..start).next_back() {
            if r.end > start {
                let old = r.clone();
                self.ranges.get_mut(&s).expect("present").end = start;
                if old.end > end {
                    // The new range punches a hole: keep the tail too.
                    self.put(end, Range { end: old.end, ..old });
                }
            }
        }
        // Ranges starting inside the new one.
        let inside: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let r = self.remove(s).expect("present");
            if r.end > end {
                self.put(end, Range { end: r.end, ..r });
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.put(start, Range { end, seq, sym });
        true
    }

    /// The function containing `pc` and its start address.
    pub fn lookup(&self, pc: u64) -> Option<(u64, &Arc<JitSymbol>)> {
        let (&start, r) = self.ranges.range((Bound::Unbounded, Bound::Included(pc))).next_back()?;
        (pc < r.end).then_some((start, &r.sym))
    }

    /// Drops the oldest entries until at most `target` bytes are held;
    /// returns how many were dropped.
    pub fn evict_to(&mut self, target: usize) -> u64 {
        if self.bytes <= target {
            return 0;
        }
        // Oldest first; one sort per eviction round, which frees a quarter
        // of the budget so rounds are rare.
        let mut by_age: Vec<(u64, u64)> = self.ranges.iter().map(|(&s, r)| (r.seq, s)).collect();
        by_age.sort_unstable();
        let mut dropped = 0;
        for (_, s) in by_age {
            if self.bytes <= target {
                break;
            }
            self.remove(s);
            dropped += 1;
        }
        dropped
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
        self.bytes = 0;
    }

    fn put(&mut self, start: u64, r: Range) {
        self.bytes += cost(&r);
        if let Some(old) = self.ranges.insert(start, r) {
            self.bytes -= cost(&old);
        }
    }

    fn remove(&mut self, start: u64) -> Option<Range> {
        let r = self.ranges.remove(&start)?;
        self.bytes -= cost(&r);
        Some(r)
    }
}

/// A symbol shared by split parts of one range is counted once per part:
/// an overestimate, which errs on the side of the bound.
fn cost(r: &Range) -> usize {
    ENTRY_OVERHEAD + r.sym.heap_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sym(name: &str) -> Arc<JitSymbol> {
        Arc::new(JitSymbol { name: name.into(), file: None, line: None, lines: Box::new([]) })
    }

    fn name_at(t: &JitTable, pc: u64) -> Option<&str> {
        t.lookup(pc).map(|(_, s)| s.name.as_str())
    }

    #[test]
    fn later_entries_win_on_overlap() {
        let mut t = JitTable::default();
        t.insert(0x1000, 0x100, sym("old"));
        t.insert(0x1040, 0x20, sym("new"));
        assert_eq!(name_at(&t, 0x103f), Some("old"));
        assert_eq!(name_at(&t, 0x1040), Some("new"));
        assert_eq!(name_at(&t, 0x105f), Some("new"));
        assert_eq!(name_at(&t, 0x1060), Some("old"), "the tail of the old range survives");
        assert_eq!(name_at(&t, 0x1100), None);
        t.insert(0x0f00, 0x400, sym("all"));
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(0x1050).map(|(s, _)| s), Some(0x0f00));
    }

    #[test]
    fn rejects_empty_and_overflowing_ranges() {
        let mut t = JitTable::default();
        assert!(!t.insert(0x10, 0, sym("a")));
        assert!(!t.insert(u64::MAX, 2, sym("b")));
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn eviction_drops_the_oldest_first() {
        let mut t = JitTable::default();
        for i in 0..100u64 {
            t.insert(i * 0x100, 0x100, sym(&format!("f{i}")));
        }
        let before = t.bytes();
        let dropped = t.evict_to(before / 2);
        assert!((49..=51).contains(&dropped), "{dropped}");
        assert!(t.bytes() <= before / 2);
        assert_eq!(name_at(&t, 0), None);
        assert_eq!(name_at(&t, 99 * 0x100), Some("f99"));
    }

    #[test]
    fn line_table_picks_the_entry_at_or_below() {
        let file: Arc<str> = Arc::from("a.js");
        let s = JitSymbol {
            name: "f".into(),
            file: Some(file.clone()),
            line: Some(1),
            lines: vec![
                LineEntry { offset: 0x10, line: 5, file: file.clone() },
                LineEntry { offset: 0x30, line: 7, file: file.clone() },
            ]
            .into(),
        };
        assert_eq!(s.line_at(0x0).1, Some(1));
        assert_eq!(s.line_at(0x10).1, Some(5));
        assert_eq!(s.line_at(0x2f).1, Some(5));
        assert_eq!(s.line_at(0x99).1, Some(7));
    }

    proptest! {
        /// Against a naive model: a list of ranges where the last one
        /// containing a pc names it.
        #[test]
        fn matches_the_last_writer_model(ops in proptest::collection::vec((0u64..64, 1u64..16), 1..40),
                                         probes in proptest::collection::vec(0u64..90, 1..40)) {
            let mut t = JitTable::default();
            for (i, &(start, size)) in ops.iter().enumerate() {
                t.insert(start, size, sym(&i.to_string()));
            }
            for pc in probes {
                let want = ops.iter().enumerate().rev().find(|(_, &(s, n))| pc >= s && pc < s + n).map(|(i, _)| i.to_string());
                prop_assert_eq!(name_at(&t, pc).map(str::to_owned), want);
            }
            let bytes: usize = t.ranges.values().map(cost).sum();
            prop_assert_eq!(t.bytes(), bytes);
        }
    }
}
