//! The page index of a table: where in the rows the kernel's binary search
//! starts for a pc, so it walks the rows of one 4 KiB page instead of the
//! whole table (`cargo xtask bench unwind` reports the per-frame cost).

use profiler_common::unwind::{UnwindRow, INDEX_PAGE_SHIFT};

/// Index slots for `rows` (sorted by pc, the first at pc 0 as tables are
/// built): slot `p` is the row covering the first pc of page `p`, and a
/// final slot holds the last row. Empty for an empty table.
pub fn page_index(rows: &[UnwindRow]) -> Vec<u32> {
    let Some(last) = rows.last() else { return Vec::new() };
    let pages = (last.pc >> INDEX_PAGE_SHIFT) as usize + 1;
    let mut index = Vec::with_capacity(pages + 1);
    let mut row = 0usize;
    for page in 0..pages {
        let start = (page as u64) << INDEX_PAGE_SHIFT;
        while row + 1 < rows.len() && u64::from(rows[row + 1].pc) <= start {
            row += 1;
        }
        index.push(row as u32);
    }
    index.push(rows.len() as u32 - 1);
    index
}

/// The row covering `pc`, searched the way the kernel does: within the
/// page's slots when the pc's page is indexed, else over every row. The
/// kernel's search is what runs; this mirror lets the tests check the index.
#[cfg(test)]
fn lookup(rows: &[UnwindRow], index: &[u32], pc: u32) -> Option<usize> {
    let page = (pc >> INDEX_PAGE_SHIFT) as usize;
    let (mut lo, mut hi) = (0usize, rows.len());
    if page + 1 < index.len() {
        lo = index[page] as usize;
        hi = (index[page + 1] as usize + 1).min(rows.len());
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if rows[mid].pc <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // The page's first slot covers the page start, so `lo` only stays at
    // the start of the range when that is row 0 and the pc precedes it.
    lo.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rows(pcs: &[u32]) -> Vec<UnwindRow> {
        pcs.iter().map(|&pc| UnwindRow { pc, ..Default::default() }).collect()
    }

    #[test]
    fn slots_point_at_the_row_covering_each_page_start() {
        let r = rows(&[0, 0x10, 0x1800, 0x3000, 0x3008]);
        // Pages 0..=3: 0x1000 is covered by the row at 0x10, 0x2000 by the
        // row at 0x1800; the last slot is the last row.
        assert_eq!(page_index(&r), vec![0, 1, 2, 3, 4]);
        assert_eq!(lookup(&r, &page_index(&r), 0x2500), Some(2));
        assert_eq!(lookup(&r, &page_index(&r), 0x3004), Some(3));
        assert_eq!(lookup(&r, &page_index(&r), 0x9000), Some(4));
        assert!(page_index(&[]).is_empty());
    }

    proptest! {
        /// Searching within the page's slots finds the same row as a
        /// search over the whole table, for any table and pc.
        #[test]
        fn indexed_search_equals_full_search(
            mut pcs in prop::collection::vec(0u32..200_000, 1..300),
            probes in prop::collection::vec(0u32..250_000, 1..50),
        ) {
            pcs.sort_unstable();
            pcs.dedup();
            pcs[0] = 0;
            let r = rows(&pcs);
            let index = page_index(&r);
            for pc in probes {
                let full = r.partition_point(|row| row.pc <= pc).checked_sub(1);
                prop_assert_eq!(lookup(&r, &index, pc), full, "pc {:#x}", pc);
            }
        }
    }
}
