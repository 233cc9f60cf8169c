//! Tables of real system files and of small programs compiled here, checked
//! against facts found without gimli (instruction bytes, ELF headers).

use std::path::Path;
use std::process::Command;

use object::read::elf::{ElfFile64, FileHeader};
use object::{LittleEndian, Object, ObjectSection, ObjectSymbol};
use profiler_common::unwind::{
    UnwindRow, ROW_CFA_RBP, ROW_CFA_RSP, ROW_END, ROW_NONE, ROW_PLT, ROW_SIGNAL, ROW_UNSUPPORTED,
};

use super::cfi::plt_expression;
use super::*;

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
const PYTHON: &str = "/usr/bin/python3.11";

/// The file's bytes, or `None` (and a note) where this machine lacks it.
fn system_file(path: &str) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            eprintln!("skipping: {path}: {e}");
            None
        }
    }
}

/// What every table promises, whatever its input.
pub(super) fn check_invariants(t: &UnwindTable) {
    assert!(!t.rows.is_empty());
    assert_eq!(t.rows[0].pc, 0, "base is the first FDE's start");
    assert_eq!(t.rows.last().unwrap().kind, ROW_NONE, "a gap row ends the table");
    for w in t.rows.windows(2) {
        assert!(w[0].pc < w[1].pc, "rows not strictly sorted: {w:?}");
        assert_ne!(rows::Rule::of(&w[0]), rows::Rule::of(&w[1]), "adjacent rows not merged: {w:?}");
    }
    assert!(t.rows.iter().all(|r| r.kind <= ROW_SIGNAL));
    assert!(t.stats.rows_before_merge >= t.rows.len());
}

fn naive_lookup(t: &UnwindTable, vaddr: u64) -> Option<&UnwindRow> {
    let pc = vaddr.checked_sub(t.base)?;
    t.rows.iter().rev().find(|r| u64::from(r.pc) <= pc)
}

/// Probes lookup() at every row boundary and next to it, and at a spread
/// of addresses in between.
fn check_lookup_matches_naive(t: &UnwindTable) {
    let end = t.base + u64::from(t.rows.last().unwrap().pc);
    let mut probes: Vec<u64> = vec![0, t.base.saturating_sub(1), end + 1, u64::MAX];
    // A few hundred rows suffice; the naive scan is quadratic in debug builds.
    for r in t.rows.iter().step_by(t.rows.len() / 300 + 1) {
        let a = t.base + u64::from(r.pc);
        probes.extend([a.saturating_sub(1), a, a + 1]);
    }
    probes.extend((t.base..end).step_by(((end - t.base) / 1000).max(1) as usize));
    for a in probes {
        assert_eq!(t.lookup(a), naive_lookup(t, a), "at {a:#x}");
    }
}

fn section_range(bytes: &[u8], name: &str) -> (u64, u64) {
    let file = ElfFile64::<LittleEndian>::parse(bytes).unwrap();
    let s = file.section_by_name(name).unwrap_or_else(|| panic!("no {name}"));
    (s.address(), s.address() + s.size())
}

#[test]
fn libc_table() {
    let Some(bytes) = system_file(LIBC) else { return };
    let t = build(&bytes).unwrap();
    check_invariants(&t);
    check_lookup_matches_naive(&t);
    assert_eq!(t.stats.section, CfiSection::EhFrame);
    assert!(t.stats.fdes > 1000, "{:?}", t.stats);
    assert_eq!(t.stats.bad_fdes, 0);
    assert_eq!(t.exec_segments.len(), 1);

    // __restore_rt is a local symbol, gone from the stripped libc; its body,
    // `mov $15, %rax; syscall` (rt_sigreturn), is unique.
    let code = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];
    let hits: Vec<usize> = bytes.windows(code.len()).enumerate().filter(|(_, w)| *w == code).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "rt_sigreturn trampoline found {} times", hits.len());
    let restore_rt = t.vaddr_of_file_offset(hits[0] as u64).unwrap();
    for a in restore_rt..restore_rt + code.len() as u64 {
        assert_eq!(t.lookup(a).unwrap().kind, ROW_SIGNAL, "at {a:#x}");
    }
    assert_eq!(t.rows.iter().filter(|r| r.kind == ROW_SIGNAL).count(), 1);

    // The .plt rows after PLT0 are the binutils expression.
    let (plt, plt_end) = section_range(&bytes, ".plt");
    assert_plt_rows(&t, plt, plt_end);
}

fn assert_plt_rows(t: &UnwindTable, plt: u64, plt_end: u64) {
    // PLT0 pushes the link map and jumps to the resolver.
    assert_eq!(
        *t.lookup(plt).unwrap(),
        UnwindRow { pc: (plt - t.base) as u32, cfa_offset: 16, rbp_offset: 0, kind: ROW_CFA_RSP }
    );
    assert_eq!(t.lookup(plt + 6).unwrap().cfa_offset, 24);
    for a in plt + 16..plt_end {
        let r = t.lookup(a).unwrap();
        assert_eq!((r.kind, r.cfa_offset, r.rbp_offset), (ROW_PLT, 8, 11), "at {a:#x}");
    }
    assert_ne!(t.lookup(plt_end).unwrap().kind, ROW_PLT);
}

#[test]
fn python_table() {
    let Some(bytes) = system_file(PYTHON) else { return };
    let t = build(&bytes).unwrap();
    check_invariants(&t);
    check_lookup_matches_naive(&t);
    // Not PIE: the table starts at the .plt, far above 0.
    let (plt, plt_end) = section_range(&bytes, ".plt");
    assert_eq!(t.base, plt);
    assert_plt_rows(&t, plt, plt_end);

    // _start's CIE marks the return address undefined.
    let header = object::elf::FileHeader64::<LittleEndian>::parse(&*bytes).unwrap();
    let entry = header.e_entry(LittleEndian);
    let row = t.lookup(entry).unwrap();
    assert_eq!(row.kind, ROW_END);
    assert_eq!(u64::from(row.pc), entry - t.base);

    // The only rows it cannot express are frames over 64 KiB.
    assert_eq!(t.stats.unsupported_rows, t.stats.unsupported.cfa_offset);
}

#[test]
fn vaddr_of_file_offset() {
    let t = UnwindTable {
        exec_segments: vec![
            Segment { offset: 0x1000, vaddr: 0x401000, filesz: 0x2000 },
            // lld lays segments out without page-aligning p_offset.
            Segment { offset: 0x3234, vaddr: 0x805234, filesz: 0x100 },
        ],
        ..Default::default()
    };
    assert_eq!(t.vaddr_of_file_offset(0x1000), Some(0x401000));
    assert_eq!(t.vaddr_of_file_offset(0x2fff), Some(0x402fff));
    assert_eq!(t.vaddr_of_file_offset(0x3000), Some(0x805000));
    assert_eq!(t.vaddr_of_file_offset(0x3300), Some(0x805300));
    assert_eq!(t.vaddr_of_file_offset(0x3334), None);
    assert_eq!(t.vaddr_of_file_offset(0), None);
}

#[test]
fn vdso_table() {
    let image = vdso_image().expect("this process has a vDSO");
    let t = build(&image).unwrap();
    check_invariants(&t);
    check_lookup_matches_naive(&t);
    assert!(t.stats.fdes > 0);
}

#[test]
fn rejects_what_is_not_x86_64_elf() {
    assert!(matches!(build(b""), Err(TableError::NotElf)));
    assert!(matches!(build(b"#!/bin/sh\n"), Err(TableError::NotElf)));
    let mut header = [0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 1; // ELFCLASS32
    header[5] = 1;
    assert!(matches!(build(&header), Err(TableError::NotX86_64 { machine: None })));
    header[4] = 2;
    header[18] = 183; // EM_AARCH64
    assert!(matches!(build(&header), Err(TableError::NotX86_64 { machine: Some(183) })));
    assert!(matches!(build_file(Path::new("/nonexistent/file")), Err(TableError::Io(_))));
}

#[test]
fn plt_expression_bytes() {
    // As in python3.11's .eh_frame.
    let bytes = [0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22];
    assert_eq!(plt_expression(&bytes), Some((8, 11)));
    // Offsets past 63 take two SLEB128 bytes.
    let bytes = [0x77, 0xc0, 0x00, 0x80, 0x00, 0x3f, 0x1a, 0x3a, 0x2a, 0x33, 0x24, 0x22];
    assert_eq!(plt_expression(&bytes), Some((64, 10)));
    assert_eq!(plt_expression(&[0x77, 0x78, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22]), None);
    assert_eq!(plt_expression(&[0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24]), None);
    // libc's signal frame CFA: DW_OP_breg7 160; DW_OP_deref.
    assert_eq!(plt_expression(&[0x77, 0xa0, 0x01, 0x06]), None);
}

const C_SOURCE: &str = "
extern long ext(long);
long work(long a, long b, long c) {
    long x = ext(a);
    long y = ext(b);
    long z = ext(c);
    return x * y + z * a + b * c + x;
}
";

/// Compiles [`C_SOURCE`] into a shared object with `flags`; `None` (and a
/// note) without a working gcc.
fn compile(flags: &[&str]) -> Option<(tempfile::TempDir, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("w.c"), dir.path().join("w.so"));
    std::fs::write(&src, C_SOURCE).unwrap();
    let status = Command::new("gcc").args(flags).args(["-fPIC", "-shared", "-o"]).arg(&out).arg(&src).status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("skipping: gcc failed: {other:?}");
            return None;
        }
    }
    let bytes = std::fs::read(&out).unwrap();
    Some((dir, bytes))
}

/// `work`'s address and code.
fn work_symbol(bytes: &[u8]) -> (u64, Vec<u8>) {
    let file = ElfFile64::<LittleEndian>::parse(bytes).unwrap();
    let sym = file.dynamic_symbols().find(|s| s.name() == Ok("work")).expect("work is exported");
    let text = file.section_by_name(".text").unwrap();
    let code = text.data_range(sym.address(), sym.size()).unwrap().unwrap();
    (sym.address(), code.to_vec())
}

#[test]
fn gcc_omit_frame_pointer() {
    let Some((_dir, bytes)) = compile(&["-O2", "-fomit-frame-pointer"]) else { return };
    let t = build(&bytes).unwrap();
    check_invariants(&t);
    let (work, code) = work_symbol(&bytes);
    let entry = t.lookup(work).unwrap();
    assert_eq!((entry.kind, entry.cfa_offset, entry.rbp_offset), (ROW_CFA_RSP, 8, 0));

    // Walk the prologue (pushes of callee-saved registers interleaved with
    // register moves, up to the first call): after the n-th push the CFA
    // is rsp + 8 + 8n, and once rbp is pushed as the n-th it sits at
    // CFA - 8 - 8n.
    let (mut pc, mut pushes, mut rbp_offset) = (0usize, 0u16, 0i8);
    loop {
        let insn = match code[pc..] {
            [0x50..=0x57, ..] => 1,
            [0x41, 0x50..=0x57, ..] => 2,
            [0x48..=0x4f, 0x89, 0xc0..=0xff, ..] => 3,
            _ => break,
        };
        let row = t.lookup(work + pc as u64).unwrap();
        assert_eq!((row.kind, row.cfa_offset, row.rbp_offset), (ROW_CFA_RSP, 8 + 8 * pushes, rbp_offset), "at +{pc}");
        if insn < 3 {
            pushes += 1;
            if code[pc] == 0x55 {
                rbp_offset = -1 - pushes as i8;
            }
        }
        pc += insn;
    }
    assert_eq!(code[pc], 0xe8, "the prologue ends at the first call");
    assert!(pushes >= 3 && rbp_offset != 0, "gcc saved {pushes} registers (rbp at {rbp_offset})");
    let row = t.lookup(work + pc as u64).unwrap();
    assert_eq!((row.kind, row.cfa_offset, row.rbp_offset), (ROW_CFA_RSP, 8 + 8 * pushes, rbp_offset));
    assert_eq!(t.lookup(work + code.len() as u64 - 1).unwrap().cfa_offset, 8, "at the final ret");
}

#[test]
fn gcc_frame_pointer() {
    let Some((_dir, bytes)) = compile(&["-O2", "-fno-omit-frame-pointer"]) else { return };
    let t = build(&bytes).unwrap();
    check_invariants(&t);
    let (work, code) = work_symbol(&bytes);
    assert_eq!(code[..4], [0x55, 0x48, 0x89, 0xe5], "push %rbp; mov %rsp,%rbp");
    let at = |off: u64| {
        let r = t.lookup(work + off).unwrap();
        (r.kind, r.cfa_offset, r.rbp_offset)
    };
    assert_eq!(at(0), (ROW_CFA_RSP, 8, 0));
    assert_eq!(at(1), (ROW_CFA_RSP, 16, -2));
    for off in 4..code.len() as u64 / 2 {
        assert_eq!(at(off), (ROW_CFA_RBP, 16, -2), "at +{off}");
    }
}

#[test]
fn debug_frame_fallback_and_no_cfi() {
    let Some((_dir, bytes)) =
        compile(&["-O2", "-g", "-nostdlib", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"])
    else {
        return;
    };
    let t = build(&bytes).unwrap();
    check_invariants(&t);
    assert_eq!(t.stats.section, CfiSection::DebugFrame);
    let (work, _) = work_symbol(&bytes);
    assert_eq!(t.lookup(work).unwrap().kind, ROW_CFA_RSP);

    let Some((_dir, bytes)) = compile(&["-O2", "-nostdlib", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"])
    else {
        return;
    };
    assert!(matches!(build(&bytes), Err(TableError::NoCfi)));
}

#[test]
fn unsupported_rules_are_marked() {
    // libc's setcontext/__longjmp family keep the return address in a
    // register: the only unsupported rows of this libc.
    let Some(bytes) = system_file(LIBC) else { return };
    let t = build(&bytes).unwrap();
    assert!(t.stats.unsupported_rows > 0);
    let unsupported = t.rows.iter().filter(|r| r.kind == ROW_UNSUPPORTED).count();
    assert!(unsupported > 0 && unsupported <= t.stats.unsupported_rows);
    assert!(t.rows.iter().filter(|r| r.kind == ROW_UNSUPPORTED).all(|r| r.cfa_offset == 0 && r.rbp_offset == 0));
    // Outermost frames: clone's and clone3's child paths.
    assert!(t.rows.iter().any(|r| r.kind == ROW_END));
}
