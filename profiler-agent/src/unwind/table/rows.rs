//! Row accumulation and lookup, kept apart from the CFI parsing so the
//! merge and search rules can be tested on arbitrary row sequences.

use profiler_common::unwind::UnwindRow;

/// The part of a row that says how to unwind; rows whose rules are equal
/// are interchangeable, which is what lets adjacent ones merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Rule {
    pub kind: u8,
    pub cfa_offset: u16,
    pub rbp_offset: i8,
}

impl Rule {
    pub const fn new(kind: u8, cfa_offset: u16, rbp_offset: i8) -> Self {
        Self { kind, cfa_offset, rbp_offset }
    }

    pub const fn of(row: &UnwindRow) -> Self {
        Self { kind: row.kind, cfa_offset: row.cfa_offset, rbp_offset: row.rbp_offset }
    }

    pub const fn at(self, pc: u32) -> UnwindRow {
        UnwindRow { pc, cfa_offset: self.cfa_offset, rbp_offset: self.rbp_offset, kind: self.kind }
    }
}

/// Appends rows in pc order, merging as it goes so the output never holds
/// more than the final table (the kernel map is the scarce resource, and a
/// second pass over a few hundred thousand rows would cost as much as the
/// parse itself).
#[derive(Debug, Default)]
pub(crate) struct RowSink {
    rows: Vec<UnwindRow>,
}

impl RowSink {
    pub fn with_capacity(n: usize) -> Self {
        Self { rows: Vec::with_capacity(n) }
    }

    /// Adds a row starting at `pc`, which must not be below the previous
    /// row's pc (callers clamp). A row at the same pc as the previous one
    /// replaces it: the earlier one covered no addresses.
    pub fn push(&mut self, pc: u32, rule: Rule) {
        let Some(last) = self.rows.last_mut() else {
            self.rows.push(rule.at(pc));
            return;
        };
        debug_assert!(pc >= last.pc, "rows must arrive in pc order");
        if pc <= last.pc {
            *last = rule.at(last.pc);
            // The replacement may now equal its predecessor, which then
            // already covers this pc.
            let n = self.rows.len();
            if n >= 2 && Rule::of(&self.rows[n - 2]) == rule {
                self.rows.pop();
            }
        } else if Rule::of(last) != rule {
            self.rows.push(rule.at(pc));
        }
    }

    pub fn into_rows(self) -> Vec<UnwindRow> {
        self.rows
    }
}

/// Merges a pc-sorted row sequence the way [`RowSink`] does.
#[cfg(test)]
pub(crate) fn merge_rows(rows: &[UnwindRow]) -> Vec<UnwindRow> {
    let mut sink = RowSink::with_capacity(rows.len());
    for row in rows {
        sink.push(row.pc, Rule::of(row));
    }
    sink.into_rows()
}

/// The last row whose pc is <= `pc`, as the kernel's bounded binary search
/// finds it; `None` before the first row.
pub(crate) fn lookup_rows(rows: &[UnwindRow], pc: u64) -> Option<&UnwindRow> {
    // Every row pc is a u32, so a larger pc is past all of them.
    let pc = u32::try_from(pc).unwrap_or(u32::MAX);
    let after = rows.partition_point(|r| r.pc <= pc);
    after.checked_sub(1).map(|i| &rows[i])
}
