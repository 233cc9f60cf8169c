//! Untrusted input: random and mutated files must never panic, and any
//! table built from them must still be well formed. Merging must not change
//! what any address looks up.

use std::sync::OnceLock;

use object::read::elf::ElfFile64;
use object::{LittleEndian, Object, ObjectSection};
use profiler_common::unwind::UnwindRow;
use proptest::prelude::*;

use super::rows::{lookup_rows, merge_rows, Rule};
use super::tests::check_invariants;
use super::*;

/// A small real executable with `.eh_frame`, and that section's file range.
fn sample() -> Option<&'static (Vec<u8>, std::ops::Range<usize>)> {
    static SAMPLE: OnceLock<Option<(Vec<u8>, std::ops::Range<usize>)>> = OnceLock::new();
    SAMPLE
        .get_or_init(|| {
            let bytes = std::fs::read("/bin/ls").ok()?;
            let file = ElfFile64::<LittleEndian>::parse(&*bytes).ok()?;
            let (off, len) = file.section_by_name(".eh_frame")?.file_range()?;
            let range = off as usize..(off + len) as usize;
            Some((bytes, range))
        })
        .as_ref()
}

fn check(result: Result<UnwindTable, TableError>) {
    if let Ok(t) = result {
        check_invariants(&t);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096), elf_header in any::<bool>()) {
        let mut bytes = bytes;
        if elf_header {
            // Get past the identification checks so the rest gets parsed.
            let ident = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0\x3e\0";
            let n = ident.len().min(bytes.len());
            bytes[..n].copy_from_slice(&ident[..n]);
        }
        check(build(&bytes));
    }

    #[test]
    fn random_eh_frame(seed in prop::collection::vec(any::<u8>(), 1..512)) {
        let Some((bytes, eh)) = sample() else { return Ok(()) };
        let mut bytes = bytes.clone();
        for (i, b) in bytes[eh.clone()].iter_mut().enumerate() {
            *b = seed[i % seed.len()].wrapping_add((i / seed.len()) as u8);
        }
        check(build(&bytes));
    }

    #[test]
    fn mutated_file(
        flips in prop::collection::vec((any::<bool>(), any::<u32>(), 1u8..=255), 1..24),
        truncate in prop::option::weighted(0.2, any::<u32>()),
    ) {
        let Some((bytes, eh)) = sample() else { return Ok(()) };
        let mut bytes = bytes.clone();
        for (in_eh, at, xor) in flips {
            // Mostly inside .eh_frame, where a flip is seen; elsewhere it
            // mostly lands in code, but sometimes in the headers.
            let i = if in_eh { eh.start + at as usize % eh.len() } else { at as usize % bytes.len() };
            bytes[i] ^= xor;
        }
        if let Some(len) = truncate {
            bytes.truncate(len as usize % (bytes.len() + 1));
        }
        check(build(&bytes));
    }

    #[test]
    fn merging_preserves_lookup(
        steps in prop::collection::vec((0u32..5, 0u8..7, 0u16..3, -2i8..=2), 0..64),
        probes in prop::collection::vec(0u64..400, 0..32),
    ) {
        let mut pc = 0u32;
        let rows: Vec<UnwindRow> = steps
            .iter()
            .map(|&(delta, kind, cfa_offset, rbp_offset)| {
                pc += delta; // 0: a row replaced by the next at the same pc
                UnwindRow { pc, cfa_offset, rbp_offset, kind }
            })
            .collect();
        let merged = merge_rows(&rows);
        for w in merged.windows(2) {
            prop_assert!(w[0].pc < w[1].pc);
            prop_assert_ne!(Rule::of(&w[0]), Rule::of(&w[1]));
        }
        let all = (0..u64::from(pc) + 2).chain(probes).chain([u64::from(u32::MAX), u64::MAX]);
        for q in all {
            let a = lookup_rows(&rows, q).map(Rule::of);
            let b = lookup_rows(&merged, q).map(Rule::of);
            prop_assert_eq!(a, b, "at {}", q);
        }
    }
}
