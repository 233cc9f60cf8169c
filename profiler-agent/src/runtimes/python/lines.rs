//! Line numbers from a code object's `co_linetable`. Both formats are
//! read from another process's memory, so the parsers stop at the first
//! malformed byte rather than trust it, and never panic.

/// The line of the instruction at `lasti` (in 2-byte code units) from a
/// 3.11+ location table (`Objects/locations.md`): entries of a first byte
/// `1 CCCC LLL` (code `C`, `L + 1` code units) and code-dependent bytes.
/// `None` when the instruction has no location or the table ends first.
pub fn location_table_line(table: &[u8], firstlineno: i32, lasti: u64) -> Option<u32> {
    let mut r = Reader { data: table, pos: 0 };
    let mut line = i64::from(firstlineno);
    let mut addr = 0u64;
    while let Some(first) = r.byte() {
        if first & 0x80 == 0 {
            return None; // not at an entry's first byte: malformed
        }
        let code = (first >> 3) & 0x0f;
        let len = u64::from(first & 7) + 1;
        let has_line = match code {
            15 => false, // no location
            14 => {
                // Long form: line delta, end line delta, column, end column.
                line += r.svarint()?;
                r.varint()?;
                r.varint()?;
                r.varint()?;
                true
            }
            13 => {
                line += r.svarint()?; // no column
                true
            }
            10..=12 => {
                line += i64::from(code - 10); // one-line form: two column bytes
                r.byte()?;
                r.byte()?;
                true
            }
            _ => {
                r.byte()?; // short form (0-9): same line, one column byte
                true
            }
        };
        if lasti < addr + len {
            return if has_line { u32::try_from(line).ok() } else { None };
        }
        addr += len;
    }
    None
}

/// The line of the instruction at `lasti` (code units) from 3.10's
/// `co_linetable`: (bytecode delta, signed line delta) byte pairs, where a
/// line delta of -128 means no line. Follows `PyCode_Addr2Line` and
/// `advance` in 3.10's `Objects/codeobject.c`, whose byte offset is
/// `lasti * 2`.
pub fn pairs_310_line(table: &[u8], firstlineno: i32, lasti: u64) -> Option<u32> {
    let target = lasti.checked_mul(2)?;
    let mut line = i64::from(firstlineno);
    let mut end = 0u64;
    for pair in table.chunks_exact(2) {
        let (sdelta, ldelta) = (u64::from(pair[0]), pair[1] as i8);
        end += sdelta;
        let current = if ldelta == -128 {
            None
        } else {
            line += i64::from(ldelta);
            Some(line)
        };
        if target < end {
            return current.and_then(|l| u32::try_from(l).ok());
        }
    }
    None
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// 6-bit chunks, least significant first, bit 6 set on all but the last.
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(6) {
            let b = self.byte()?;
            if b & 0x80 != 0 {
                return None; // the next entry's first byte
            }
            v |= u64::from(b & 0x3f) << shift;
            if b & 0x40 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// A varint whose low bit is the sign.
    fn svarint(&mut self) -> Option<i64> {
        let v = self.varint()?;
        let magnitude = i64::try_from(v >> 1).ok()?;
        Some(if v & 1 != 0 { -magnitude } else { magnitude })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn location_table_forms() {
        // firstlineno 10. Entry 1: one-line form code 11 (+1 line), 2 units,
        // columns 0..4. Entry 2: short form code 0 (same line), 1 unit.
        // Entry 3: no-column form code 13, 3 units, line delta +5 (svarint 10).
        // Entry 4: no location, 1 unit. Entry 5: long form, 1 unit, line
        // delta -2 (svarint 5), end delta 0, columns 1 and 2.
        let t = [
            0x80 | (11 << 3) | 1,
            0,
            4,
            0x80,
            3,
            0x80 | (13 << 3) | 2,
            10,
            0x80 | (15 << 3),
            0x80 | (14 << 3),
            5,
            0,
            1,
            2,
        ];
        assert_eq!(location_table_line(&t, 10, 0), Some(11));
        assert_eq!(location_table_line(&t, 10, 1), Some(11));
        assert_eq!(location_table_line(&t, 10, 2), Some(11));
        assert_eq!(location_table_line(&t, 10, 3), Some(16));
        assert_eq!(location_table_line(&t, 10, 5), Some(16));
        assert_eq!(location_table_line(&t, 10, 6), None);
        assert_eq!(location_table_line(&t, 10, 7), Some(14));
        assert_eq!(location_table_line(&t, 10, 8), None);
    }

    #[test]
    fn long_varints_and_malformed_tables() {
        // Line delta +100 = svarint 200 = 0b11_001000: chunks 8 | 0x40, 3.
        let t = [0x80 | (13 << 3), 0x48, 3];
        assert_eq!(location_table_line(&t, 1, 0), Some(101));
        // A continuation into the next entry's first byte is malformed.
        assert_eq!(location_table_line(&[0x80 | (13 << 3), 0x48, 0x80], 1, 0), None);
        assert_eq!(location_table_line(&[0x05], 1, 0), None);
        assert_eq!(location_table_line(&[], 1, 0), None);
    }

    #[test]
    fn pairs_310() {
        // firstlineno 5: bytes 0..6 on line 6, 6..8 no line, 8..12 line 4.
        let t = [6, 1, 2, 0x80, 4, (-2i8) as u8];
        assert_eq!(pairs_310_line(&t, 5, 0), Some(6));
        assert_eq!(pairs_310_line(&t, 5, 2), Some(6));
        assert_eq!(pairs_310_line(&t, 5, 3), None);
        assert_eq!(pairs_310_line(&t, 5, 4), Some(4));
        assert_eq!(pairs_310_line(&t, 5, 6), None);
        // A zero-length pair moves the line for the next range.
        assert_eq!(pairs_310_line(&[0, 3, 2, 1], 1, 0), Some(5));
    }

    proptest! {
        #[test]
        fn location_table_never_panics(t in proptest::collection::vec(any::<u8>(), 0..200), first in any::<i32>(), lasti in any::<u64>()) {
            let _ = location_table_line(&t, first, lasti);
        }

        #[test]
        fn pairs_never_panic(t in proptest::collection::vec(any::<u8>(), 0..200), first in any::<i32>(), lasti in any::<u64>()) {
            let _ = pairs_310_line(&t, first, lasti);
        }

        /// A table of one-line entries (code 10 + delta) gives, for every
        /// unit, the line its entry set.
        #[test]
        fn one_line_entries_accumulate(deltas in proptest::collection::vec((0u8..3, 0u8..8), 1..40)) {
            let mut t = Vec::new();
            let mut expect = Vec::new();
            let mut line = 100u32;
            for (d, len) in &deltas {
                t.push(0x80 | ((10 + d) << 3) | len);
                t.extend_from_slice(&[0, 1]);
                line += u32::from(*d);
                expect.extend(std::iter::repeat_n(line, usize::from(*len) + 1));
            }
            for (unit, want) in expect.iter().enumerate() {
                prop_assert_eq!(location_table_line(&t, 100, unit as u64), Some(*want));
            }
            prop_assert_eq!(location_table_line(&t, 100, expect.len() as u64), None);
        }
    }
}
