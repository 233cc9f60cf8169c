//! User-space unwinding of a thread that is blocked, from the registers the
//! kernel saved at its syscall entry, with the same CFI tables (and the
//! same rules, step for step) as the kernel unwinder in
//! `profiler-ebpf/src/unwind.rs`.
//!
//! Why here and not in the kernel: a thread found blocked by the start scan
//! is not running, and a BPF program can read only the current task's user
//! memory (`bpf_probe_read_user`); the task iterator that finds it gives
//! its registers, and the agent reads its stack with `process_vm_readv`.
//! The scan runs once per recording, so the cost (building the tables of
//! the files those threads map) is paid once.

use std::collections::HashMap;

use profiler_common::{
    unwind::{
        UnwindRow, ROW_CFA_RBP, ROW_CFA_RSP, ROW_END, ROW_NONE, ROW_PLT, ROW_SIGNAL, SIGFRAME_RBP, SIGFRAME_RIP,
        SIGFRAME_RSP,
    },
    MAX_STACK_DEPTH,
};

use crate::{
    process::{maps::find, MapEntry},
    unwind::table::UnwindTable,
};

/// Reads another process's memory.
pub trait Memory {
    /// The 8 bytes at `addr`, or `None` where nothing is mapped.
    fn read_u64(&self, addr: u64) -> Option<u64>;
}

/// A live process's memory through `process_vm_readv`.
pub struct ProcessMemory(pub u32);

impl Memory for ProcessMemory {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut buf = [0u8; 8];
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 8 };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: 8 };
        // SAFETY: one local iovec over `buf`, which outlives the call; the
        // remote address is only read by the kernel, which checks it.
        let n = unsafe { libc::process_vm_readv(self.0 as libc::pid_t, &local, 1, &remote, 1, 0) };
        (n == 8).then(|| u64::from_le_bytes(buf))
    }
}

/// The executable mappings of one process, each with its table (or none).
pub struct ProcessTables<'a> {
    pub maps: Vec<MapEntry>,
    /// By index into `maps`: the table and the ELF virtual address of the
    /// mapping's start.
    pub tables: HashMap<usize, (&'a UnwindTable, u64)>,
}

impl<'a> ProcessTables<'a> {
    /// Pairs `maps` (sorted by start) with tables from `table_of`.
    pub fn new(maps: Vec<MapEntry>, mut table_of: impl FnMut(&MapEntry) -> Option<&'a UnwindTable>) -> Self {
        let mut tables = HashMap::new();
        for (i, m) in maps.iter().enumerate() {
            if let Some(t) = table_of(m) {
                if let Some(vaddr) = t.vaddr_of_file_offset(m.offset) {
                    tables.insert(i, (t, vaddr));
                }
            }
        }
        Self { maps, tables }
    }

    /// The row covering `pc`: `Err(())` when `pc` is in no known mapping,
    /// `Ok(None)` when its mapping has no table (or no row for it).
    fn row(&self, pc: u64) -> Result<Option<UnwindRow>, ()> {
        let m = find(&self.maps, pc).ok_or(())?;
        let i = self.maps.iter().position(|x| x.start == m.start).ok_or(())?;
        let Some((t, vaddr)) = self.tables.get(&i) else { return Ok(None) };
        Ok(t.lookup(vaddr + (pc - m.start)).copied())
    }
}

/// Registers at the user/kernel boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// How an unwind went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unwound {
    /// Return addresses, innermost first (the first is the exact pc).
    pub frames: Vec<u64>,
    /// Some frame was walked by frame pointer (no table covered it).
    pub partial: bool,
}

/// Unwinds from `regs`, at most MAX_STACK_DEPTH frames.
pub fn unwind(regs: Regs, tables: &ProcessTables<'_>, mem: &impl Memory) -> Unwound {
    let mut out = Unwound::default();
    let (mut pc, mut sp, mut bp, mut exact) = (regs.ip, regs.sp, regs.bp, true);
    while out.frames.len() < MAX_STACK_DEPTH && pc != 0 {
        out.frames.push(pc);
        // A return address points after its call (see the kernel side).
        let lookup = if exact { pc } else { pc - 1 };
        exact = false;
        let row = match tables.row(lookup) {
            Ok(Some(row)) if row.kind != ROW_NONE => row,
            _ => {
                out.partial = true;
                match frame_pointer_step(bp, mem) {
                    Some((next_pc, next_sp, next_bp)) => {
                        (pc, sp, bp) = (next_pc, next_sp, next_bp);
                        continue;
                    }
                    None => break,
                }
            }
        };
        let cfa = match row.kind {
            ROW_CFA_RSP => sp.wrapping_add(row.cfa_offset as u64),
            ROW_CFA_RBP => bp.wrapping_add(row.cfa_offset as u64),
            ROW_PLT => {
                let extra = if (pc & 15) as i8 >= row.rbp_offset { 8 } else { 0 };
                sp.wrapping_add(row.cfa_offset as u64 + extra)
            }
            ROW_END => break,
            ROW_SIGNAL => {
                let (Some(b), Some(s), Some(p)) = (
                    mem.read_u64(sp.wrapping_add(SIGFRAME_RBP)),
                    mem.read_u64(sp.wrapping_add(SIGFRAME_RSP)),
                    mem.read_u64(sp.wrapping_add(SIGFRAME_RIP)),
                ) else {
                    break;
                };
                (pc, sp, bp, exact) = (p, s, b, true);
                continue;
            }
            _ => break, // unsupported rule
        };
        let Some(ra) = mem.read_u64(cfa.wrapping_sub(8)) else { break };
        if row.rbp_offset != 0 && row.kind != ROW_PLT {
            let at = cfa.wrapping_add((row.rbp_offset as i64 * 8) as u64);
            let Some(b) = mem.read_u64(at) else { break };
            bp = b;
        }
        sp = cfa;
        pc = ra;
    }
    out
}

/// [bp] is the caller's bp, [bp+8] the return address; 0 ends the chain.
fn frame_pointer_step(bp: u64, mem: &impl Memory) -> Option<(u64, u64, u64)> {
    if bp == 0 {
        return None;
    }
    let next_bp = mem.read_u64(bp)?;
    let pc = mem.read_u64(bp.wrapping_add(8))?;
    Some((pc, bp + 16, next_bp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Memory as a map of 8-byte words.
    struct Words(HashMap<u64, u64>);

    impl Memory for Words {
        fn read_u64(&self, addr: u64) -> Option<u64> {
            self.0.get(&addr).copied()
        }
    }

    fn mapping(start: u64, end: u64) -> MapEntry {
        MapEntry {
            start,
            end,
            offset: 0,
            dev_major: 1,
            dev_minor: 1,
            inode: 7,
            executable: true,
            path: "/x".into(),
            deleted: false,
        }
    }

    fn row(pc: u32, kind: u8, cfa_offset: u16, rbp_offset: i8) -> UnwindRow {
        UnwindRow { pc, cfa_offset, rbp_offset, kind }
    }

    fn table(rows: Vec<UnwindRow>) -> UnwindTable {
        UnwindTable {
            base: 0,
            rows,
            exec_segments: vec![crate::unwind::table::Segment { offset: 0, vaddr: 0, filesz: 0x10000 }],
            stats: Default::default(),
        }
    }

    #[test]
    fn cfi_then_frame_pointer_then_end() {
        // Mapped at 0x1000 from file offset 0 (vaddr 0). vaddr 0..0x100: a
        // leaf with CFA = rsp + 8 (a libc syscall wrapper); 0x100..0x200:
        // CFA = rbp + 16, rbp saved at CFA - 16 (a function with a frame
        // pointer); 0x200..: ROW_END (_start).
        let t = table(vec![row(0, ROW_CFA_RSP, 8, 0), row(0x100, ROW_CFA_RBP, 16, -2), row(0x200, ROW_END, 0, 0)]);
        let tables = ProcessTables::new(vec![mapping(0x1000, 0x2000)], |_| Some(&t));
        let mut mem = HashMap::new();
        // Leaf: sp=0x8000 holds the return address into the second function.
        mem.insert(0x8000, 0x1150);
        // Second function: rbp=0x8100; [rbp] = caller's rbp, [rbp+8] = ra.
        mem.insert(0x8100, 0x8200);
        mem.insert(0x8108, 0x1250);
        let u = unwind(Regs { ip: 0x1010, sp: 0x8000, bp: 0x8100 }, &tables, &Words(mem));
        assert_eq!(u.frames, vec![0x1010, 0x1150, 0x1250]);
        assert!(!u.partial);
    }

    #[test]
    fn pc_outside_every_mapping_falls_back_to_frame_pointers() {
        let tables = ProcessTables::new(vec![], |_| None);
        let mut mem = HashMap::new();
        mem.insert(0x8100, 0);
        mem.insert(0x8108, 0x4444);
        let u = unwind(Regs { ip: 0x9999, sp: 0x8000, bp: 0x8100 }, &tables, &Words(mem));
        assert_eq!(u.frames, vec![0x9999, 0x4444]);
        assert!(u.partial);
    }

    proptest! {
        /// Garbage registers and memory never panic nor loop forever.
        #[test]
        fn arbitrary_input_is_bounded(ip: u64, sp: u64, bp: u64, words in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..32)) {
            let t = table(vec![row(0, ROW_CFA_RSP, 8, 0), row(0x100, ROW_CFA_RBP, 16, -2), row(0x200, ROW_SIGNAL, 0, 0), row(0x300, ROW_PLT, 8, 11)]);
            let tables = ProcessTables::new(vec![mapping(0, 0x400)], |_| Some(&t));
            let mut mem: HashMap<u64, u64> = words.into_iter().collect();
            mem.insert(sp, ip);
            let u = unwind(Regs { ip, sp, bp }, &tables, &Words(mem));
            prop_assert!(u.frames.len() <= MAX_STACK_DEPTH);
        }
    }
}
