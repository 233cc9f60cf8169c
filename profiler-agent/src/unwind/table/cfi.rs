//! Evaluates every FDE's CFI program with gimli and reduces each resulting
//! row to the few rules the kernel unwinder understands.

use std::collections::HashMap;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, CommonInformationEntry, EndianSlice, LittleEndian, Register, RegisterRule,
    UnwindContext, UnwindOffset, UnwindSection, UnwindTableRow,
};
use profiler_common::unwind::{
    UnwindRow, ROW_CFA_RBP, ROW_CFA_RSP, ROW_END, ROW_NONE, ROW_PLT, ROW_SIGNAL, ROW_UNSUPPORTED,
};

use super::rows::{RowSink, Rule};
use super::{TableError, TableStats, UnsupportedCounts};

pub(super) type Slice<'a> = EndianSlice<'a, LittleEndian>;

const RBP: Register = Register(6);
const RSP: Register = Register(7);
const RA: Register = Register(16);

/// Rows (as gimli produces them, before merging) past which a file is
/// refused: libc has ~60k, the largest real binaries a few million at most,
/// and the kernel's row map could not hold more anyway.
pub const MAX_ROWS: usize = 4 << 20;

const UNSUPPORTED: Rule = Rule::new(ROW_UNSUPPORTED, 0, 0);

/// One FDE's address range and its rows in [`Collected::raw`].
#[derive(Clone, Copy, Debug)]
struct FdeSpan {
    start: u64,
    end: u64,
    first: u32,
    len: u32,
}

#[derive(Clone, Copy, Debug)]
struct RawRow {
    pc: u64,
    rule: Rule,
}

/// Rows grouped by FDE in section order, which is link order and not
/// address order (python3.11's `_start` FDE comes before its `.plt` one),
/// so they are sorted by FDE before they become a table.
#[derive(Debug, Default)]
pub(super) struct Collected {
    spans: Vec<FdeSpan>,
    raw: Vec<RawRow>,
}

impl Collected {
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

/// Runs every FDE of `section` (whose bytes are `data`), keeping those that
/// start inside one of `exec_ranges` (all, when that is empty).
pub(super) fn collect<'a, S>(
    section: &S,
    data: &'a [u8],
    bases: &BaseAddresses,
    exec_ranges: &[(u64, u64)],
    stats: &mut TableStats,
) -> Result<Collected, TableError>
where
    S: UnwindSection<Slice<'a>>,
{
    // gcc output averages a row per 5-6 bytes of CFI and an FDE per ~40;
    // reserving a little more means the vectors rarely grow and copy.
    let mut out = Collected { spans: Vec::with_capacity(data.len() / 32), raw: Vec::with_capacity(data.len() / 4) };
    let mut ctx = UnwindContext::new();
    let mut cies: HashMap<usize, CommonInformationEntry<Slice<'a>>> = HashMap::new();
    // Each FDE re-runs its CIE's initial instructions, so a crafted file with
    // one huge CIE shared by many FDEs would cost quadratic time; real files
    // evaluate little more than their section size.
    let mut budget = data.len().saturating_mul(4).saturating_add(1 << 20);

    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next()? {
        let partial = match entry {
            CieOrFde::Cie(cie) => {
                cies.insert(cie.offset(), cie);
                continue;
            }
            CieOrFde::Fde(partial) => partial,
        };
        let parsed = partial.parse(|section, bases, offset| match cies.get(&UnwindOffset::into(offset)) {
            Some(cie) => Ok(cie.clone()),
            None => section.cie_from_offset(bases, offset),
        });
        // A bad FDE (or one whose CIE is bad) says nothing about the others:
        // skip it rather than lose the whole file.
        let Ok(fde) = parsed else {
            stats.skipped_fdes += 1;
            continue;
        };
        cies.entry(fde.cie().offset()).or_insert_with(|| fde.cie().clone());

        let (start, end) = (fde.initial_address(), fde.end_address());
        let in_exec = exec_ranges.is_empty() || exec_ranges.iter().any(|&(lo, hi)| lo <= start && start < hi);
        if start >= end || !in_exec {
            stats.skipped_fdes += 1;
            continue;
        }
        let cost = fde.entry_len().saturating_add(fde.cie().entry_len());
        budget = budget.checked_sub(cost).ok_or(TableError::TooManyRows)?;

        let first = out.raw.len();
        let emit = |pc: u64, rule: Rule, out: &mut Collected, stats: &mut TableStats| {
            stats.rows_before_merge += 1;
            if rule.kind == ROW_UNSUPPORTED {
                stats.unsupported_rows += 1;
            }
            // Merging inside one FDE already keeps the intermediate vector
            // near the final table's size.
            if out.raw.len() > first && out.raw.last().is_some_and(|r| r.rule == rule) {
                return;
            }
            out.raw.push(RawRow { pc, rule });
        };

        if fde.is_signal_trampoline() {
            // rsp points at the kernel's ucontext here, not at a return
            // address; the CFI says so with expressions the kernel could not
            // run anyway, and the kernel knows the layout.
            emit(start, Rule::new(ROW_SIGNAL, 0, 0), &mut out, stats);
        } else if fde.cie().return_address_register() != RA {
            stats.unsupported.ra_rule += 1;
            emit(start, UNSUPPORTED, &mut out, stats);
        } else {
            match fde.rows(section, bases, &mut ctx) {
                Err(_) => {
                    stats.bad_fdes += 1;
                    emit(start, UNSUPPORTED, &mut out, stats);
                }
                Ok(mut table) => {
                    let mut covered = start;
                    loop {
                        match table.next_row() {
                            Ok(Some(row)) => {
                                let (lo, hi) = (row.start_address().max(start), row.end_address().min(end));
                                if lo >= hi {
                                    continue;
                                }
                                emit(lo, classify(row, data, &mut stats.unsupported), &mut out, stats);
                                covered = hi;
                            }
                            Ok(None) => break,
                            Err(_) => {
                                // What was evaluated before the error is
                                // still right; only the rest is unknown.
                                stats.bad_fdes += 1;
                                if covered < end {
                                    emit(covered, UNSUPPORTED, &mut out, stats);
                                }
                                break;
                            }
                        }
                        if stats.rows_before_merge > MAX_ROWS {
                            return Err(TableError::TooManyRows);
                        }
                    }
                }
            }
        }
        if out.raw.len() == first {
            // Only empty rows (e.g. an FDE whose program is all past its
            // range): nothing covers it after all.
            stats.skipped_fdes += 1;
            continue;
        }
        stats.fdes += 1;
        out.spans.push(FdeSpan { start, end, first: first as u32, len: (out.raw.len() - first) as u32 });
    }
    Ok(out)
}

/// Lays the FDEs out in address order: gaps between them become
/// `ROW_NONE`, a later FDE overlapping an earlier one only contributes the
/// part past the earlier one's end. Returns the base and the rows.
pub(super) fn assemble(mut c: Collected, stats: &mut TableStats) -> Result<(u64, Vec<UnwindRow>), TableError> {
    // Stable, so of two FDEs starting at the same address the first in the
    // section wins, as it would for a linear FDE search.
    if !c.spans.is_sorted_by_key(|s| s.start) {
        c.spans.sort_by_key(|s| s.start);
    }
    let Some(base) = c.spans.first().map(|s| s.start) else { return Ok((0, Vec::new())) };
    let max_end = c.spans.iter().map(|s| s.end).max().unwrap_or(base);
    if max_end - base > u64::from(u32::MAX) {
        return Err(TableError::TooBig { span: max_end - base });
    }
    let pc = |addr: u64| (addr - base) as u32;

    let mut sink = RowSink::with_capacity(c.raw.len() + c.spans.len() + 1);
    let mut covered = base;
    for span in &c.spans {
        if span.end <= covered {
            stats.overlapping_fdes += 1;
            continue;
        }
        if span.start > covered {
            sink.push(pc(covered), Rule::new(ROW_NONE, 0, 0));
            stats.rows_before_merge += 1;
        } else if span.start < covered {
            stats.overlapping_fdes += 1;
        }
        let rows = &c.raw[span.first as usize..(span.first + span.len) as usize];
        for (i, row) in rows.iter().enumerate() {
            let row_end = rows.get(i + 1).map_or(span.end, |next| next.pc);
            let lo = row.pc.max(covered);
            if lo < row_end {
                sink.push(pc(lo), row.rule);
            }
        }
        covered = span.end;
    }
    sink.push(pc(covered), Rule::new(ROW_NONE, 0, 0));
    stats.rows_before_merge += 1;
    Ok((base, sink.into_rows()))
}

fn classify(row: &UnwindTableRow<usize>, data: &[u8], why: &mut UnsupportedCounts) -> Rule {
    match row.register(RA) {
        // The x86-64 ABI default is what `call` does; CIEs state it anyway.
        None | Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => return Rule::new(ROW_END, 0, 0),
        Some(_) => {
            why.ra_rule += 1;
            return UNSUPPORTED;
        }
    }
    // The kernel takes the caller's rsp to be the CFA; only hand-written
    // code (longjmp, context switches) says otherwise.
    if !matches!(row.register(RSP), None | Some(RegisterRule::ValOffset(0))) {
        why.rsp_rule += 1;
        return UNSUPPORTED;
    }
    let rbp_offset = match row.register(RBP) {
        None | Some(RegisterRule::Undefined | RegisterRule::SameValue) => 0,
        Some(RegisterRule::Offset(n)) if n % 8 == 0 && i8::try_from(n / 8).is_ok() => (n / 8) as i8,
        Some(_) => {
            why.rbp_rule += 1;
            return UNSUPPORTED;
        }
    };
    match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let kind = match *register {
                RSP => ROW_CFA_RSP,
                RBP => ROW_CFA_RBP,
                _ => {
                    why.cfa_register += 1;
                    return UNSUPPORTED;
                }
            };
            match u16::try_from(*offset) {
                Ok(off) => Rule::new(kind, off, rbp_offset),
                Err(_) => {
                    why.cfa_offset += 1;
                    UNSUPPORTED
                }
            }
        }
        CfaRule::Expression(expr) => {
            let bytes = expr.offset.checked_add(expr.length).and_then(|end| data.get(expr.offset..end));
            // ROW_PLT reuses rbp_offset for the threshold, so a PLT row
            // cannot also restore rbp (no PLT saves it).
            match bytes.and_then(plt_expression) {
                Some((off, thr)) if rbp_offset == 0 => Rule::new(ROW_PLT, off, thr),
                _ => {
                    why.cfa_expression += 1;
                    UNSUPPORTED
                }
            }
        }
    }
}

const DW_OP_BREG7: u8 = 0x77;
const DW_OP_BREG16: u8 = 0x80;
const DW_OP_LIT0: u8 = 0x30;
const DW_OP_LIT3: u8 = 0x33;
const DW_OP_LIT15: u8 = 0x3f;
const DW_OP_LIT31: u8 = 0x4f;
const DW_OP_AND: u8 = 0x1a;
const DW_OP_GE: u8 = 0x2a;
const DW_OP_SHL: u8 = 0x24;
const DW_OP_PLUS: u8 = 0x22;

/// Recognises the CFA expression binutils emits for `.plt` (and `.plt.sec`):
/// `rsp + off + (((rip & 15) >= thr) << 3)`, i.e. `DW_OP_breg7 off;
/// DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_lit<thr>; DW_OP_ge;
/// DW_OP_lit3; DW_OP_shl; DW_OP_plus`. Returns `(off, thr)`.
pub(super) fn plt_expression(bytes: &[u8]) -> Option<(u16, i8)> {
    let (&op, rest) = bytes.split_first()?;
    if op != DW_OP_BREG7 {
        return None;
    }
    let (off, rest) = read_sleb128(rest)?;
    let off = u16::try_from(off).ok()?;
    match *rest {
        [DW_OP_BREG16, 0x00, DW_OP_LIT15, DW_OP_AND, thr @ DW_OP_LIT0..=DW_OP_LIT31, DW_OP_GE, DW_OP_LIT3, DW_OP_SHL, DW_OP_PLUS] => {
            Some((off, (thr - DW_OP_LIT0) as i8))
        }
        _ => None,
    }
}

/// A SLEB128 of at most 3 bytes (enough for any u16 offset).
fn read_sleb128(bytes: &[u8]) -> Option<(i64, &[u8])> {
    let mut value: i64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(3) {
        value |= i64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let bits = 7 * (i + 1);
            if b & 0x40 != 0 {
                value |= -1i64 << bits;
            }
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod assemble_tests {
    use super::*;

    /// FDEs as (start, end, [(pc, cfa_offset)]), in section order.
    #[allow(clippy::type_complexity)]
    fn table(fdes: &[(u64, u64, &[(u64, u16)])]) -> (u64, Vec<(u32, u8, u16)>, TableStats) {
        let mut c = Collected::default();
        for &(start, end, rows) in fdes {
            let first = c.raw.len() as u32;
            c.raw.extend(rows.iter().map(|&(pc, off)| RawRow { pc, rule: Rule::new(ROW_CFA_RSP, off, 0) }));
            c.spans.push(FdeSpan { start, end, first, len: rows.len() as u32 });
        }
        let mut stats = TableStats::default();
        let (base, rows) = assemble(c, &mut stats).unwrap();
        (base, rows.iter().map(|r| (r.pc, r.kind, r.cfa_offset)).collect(), stats)
    }

    #[test]
    fn gaps_order_and_overlaps() {
        let (base, rows, stats) = table(&[
            (0x2000, 0x2010, &[(0x2000, 8), (0x2004, 16)]),
            (0x1000, 0x1010, &[(0x1000, 8)]),
            // Starts inside the previous FDE: only its part past 0x2010 counts.
            (0x2008, 0x2020, &[(0x2008, 24), (0x2018, 32)]),
            // Wholly inside an earlier FDE.
            (0x1004, 0x1008, &[(0x1004, 40)]),
            // Adjacent to the previous one, same rule as its last row.
            (0x2020, 0x2030, &[(0x2020, 32)]),
        ]);
        assert_eq!(base, 0x1000);
        assert_eq!(
            rows,
            [
                (0x0000, ROW_CFA_RSP, 8),
                (0x0010, ROW_NONE, 0),
                (0x1000, ROW_CFA_RSP, 8),
                (0x1004, ROW_CFA_RSP, 16),
                (0x1010, ROW_CFA_RSP, 24),
                (0x1018, ROW_CFA_RSP, 32),
                (0x1030, ROW_NONE, 0),
            ]
        );
        assert_eq!(stats.overlapping_fdes, 2);
        assert_eq!(stats.rows_before_merge, 2);
    }

    #[test]
    fn span_beyond_u32_is_refused() {
        let mut c = Collected::default();
        c.raw.push(RawRow { pc: 0, rule: UNSUPPORTED });
        c.raw.push(RawRow { pc: 1 << 33, rule: UNSUPPORTED });
        c.spans.push(FdeSpan { start: 0, end: 1, first: 0, len: 1 });
        c.spans.push(FdeSpan { start: 1 << 33, end: (1 << 33) + 1, first: 1, len: 1 });
        assert!(matches!(assemble(c, &mut TableStats::default()), Err(TableError::TooBig { .. })));
    }
}
