//! Ranges of the kernel's rows array, handed out to tables.
//!
//! The array is one fixed-size BPF map (its size is the memory budget), so
//! tables of different files share it. First fit over a free list kept
//! sorted and coalesced: tables are allocated and freed rarely (on process
//! start and exit), and a list of a few hundred holes is scanned in
//! microseconds.

/// A range of rows: `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Range {
    pub start: u32,
    pub len: u32,
}

impl Range {
    fn end(&self) -> u32 {
        self.start + self.len
    }
}

/// Free-space bookkeeping for `capacity` rows.
#[derive(Debug)]
pub struct Allocator {
    capacity: u32,
    /// Free ranges, sorted by start, never adjacent (always coalesced).
    free: Vec<Range>,
}

impl Allocator {
    pub fn new(capacity: u32) -> Self {
        let free = if capacity > 0 { vec![Range { start: 0, len: capacity }] } else { Vec::new() };
        Self { capacity, free }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Rows not allocated.
    pub fn free_rows(&self) -> u64 {
        self.free.iter().map(|r| u64::from(r.len)).sum()
    }

    /// The first free range of `len` rows, or `None` if no hole is big
    /// enough (there may still be enough rows in total: fragmentation).
    pub fn alloc(&mut self, len: u32) -> Option<Range> {
        if len == 0 {
            return Some(Range { start: 0, len: 0 });
        }
        let i = self.free.iter().position(|r| r.len >= len)?;
        let hole = &mut self.free[i];
        let got = Range { start: hole.start, len };
        hole.start += len;
        hole.len -= len;
        if hole.len == 0 {
            self.free.remove(i);
        }
        Some(got)
    }

    /// Returns a range from [`alloc`](Self::alloc). Freeing a range that is
    /// not allocated is a bug in the caller; it is ignored rather than
    /// corrupting the list.
    pub fn free(&mut self, r: Range) {
        if r.len == 0 || r.end() > self.capacity {
            return;
        }
        let i = self.free.partition_point(|f| f.start < r.start);
        let overlaps_prev = i > 0 && self.free[i - 1].end() > r.start;
        let overlaps_next = i < self.free.len() && r.end() > self.free[i].start;
        if overlaps_prev || overlaps_next {
            debug_assert!(false, "double free of rows {r:?}");
            return;
        }
        self.free.insert(i, r);
        // Coalesce with the next, then with the previous hole.
        if i + 1 < self.free.len() && self.free[i].end() == self.free[i + 1].start {
            self.free[i].len += self.free[i + 1].len;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].end() == self.free[i].start {
            self.free[i - 1].len += self.free[i].len;
            self.free.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_fit_then_coalesce_back_to_one_hole() {
        let mut a = Allocator::new(100);
        let x = a.alloc(30).unwrap();
        let y = a.alloc(30).unwrap();
        let z = a.alloc(40).unwrap();
        assert_eq!((x.start, y.start, z.start), (0, 30, 60));
        assert_eq!(a.alloc(1), None);
        a.free(y);
        // Too big for the hole left by y, although 30 rows are free.
        assert_eq!(a.alloc(31), None);
        assert_eq!(a.alloc(10).unwrap().start, 30);
        a.free(Range { start: 30, len: 10 });
        a.free(x);
        a.free(z);
        assert_eq!(a.free, vec![Range { start: 0, len: 100 }]);
    }

    #[test]
    fn bad_frees_are_ignored() {
        let mut a = Allocator::new(10);
        a.free(Range { start: 5, len: 10 });
        assert_eq!(a.free_rows(), 10);
    }

    proptest! {
        /// Any sequence of allocations and frees keeps allocated ranges
        /// disjoint and inside the array, and free + allocated = capacity.
        #[test]
        fn ranges_stay_disjoint_and_accounted(ops in prop::collection::vec((any::<bool>(), 1u32..40, any::<prop::sample::Index>()), 1..200)) {
            let mut a = Allocator::new(500);
            let mut live: Vec<Range> = Vec::new();
            for (is_alloc, len, pick) in ops {
                if is_alloc || live.is_empty() {
                    if let Some(r) = a.alloc(len) {
                        prop_assert!(r.end() <= 500);
                        for other in &live {
                            prop_assert!(r.end() <= other.start || other.end() <= r.start, "{r:?} overlaps {other:?}");
                        }
                        live.push(r);
                    } else {
                        prop_assert!(a.free.iter().all(|f| f.len < len));
                    }
                } else {
                    let r = live.swap_remove(pick.index(live.len()));
                    a.free(r);
                }
                let used: u64 = live.iter().map(|r| u64::from(r.len)).sum();
                prop_assert_eq!(used + a.free_rows(), 500);
                prop_assert!(a.free.windows(2).all(|w| w[0].end() < w[1].start));
            }
        }
    }
}
