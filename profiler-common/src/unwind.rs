//! Compact CFI unwind tables and per-process mappings, written by the agent
//! (from `.eh_frame`/`.debug_frame`) and read by the kernel unwinder.
//!
//! x86-64 only. A row says, for every pc from its own up to the next row's,
//! how to find the canonical frame address (CFA) and the caller's rbp. The
//! return address is always at CFA - 8 on x86-64 (rows where the CFI says
//! otherwise are [`ROW_UNSUPPORTED`]), and the caller's rsp is the CFA.

/// One row of a compact unwind table: 8 bytes, so the whole of libc fits in
/// a few hundred KiB of map memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// First pc the row covers, as an offset from the table's base address
    /// (the base is folded into [`Mapping::bias`]).
    pub pc: u32,
    /// `ROW_CFA_RSP`/`ROW_CFA_RBP`: CFA = register + `cfa_offset`.
    /// `ROW_PLT`: CFA = rsp + `cfa_offset`, plus 8 when `(pc & 15) >= rbp_offset`.
    pub cfa_offset: u16,
    /// Where the caller's rbp was saved, in 8-byte units from the CFA:
    /// rbp = [CFA + 8 * rbp_offset]. 0: rbp still holds the caller's value.
    /// For `ROW_PLT`: the threshold described above.
    pub rbp_offset: i8,
    /// One of the `ROW_*` kinds.
    pub kind: u8,
}

const _: () = assert!(core::mem::size_of::<UnwindRow>() == 8);

/// No CFI covers these pcs (a gap between FDEs): fall back to frame pointers.
pub const ROW_NONE: u8 = 0;
/// CFA = rsp + offset.
pub const ROW_CFA_RSP: u8 = 1;
/// CFA = rbp + offset.
pub const ROW_CFA_RBP: u8 = 2;
/// A PLT stub: the CFA expression `rsp + off + ((rip & 15) >= thr) << 3`
/// that binutils emits for `.plt`.
pub const ROW_PLT: u8 = 3;
/// The outermost frame: the return address is undefined (`_start`,
/// `clone`'s child, thread start routines). The stack is complete.
pub const ROW_END: u8 = 4;
/// A rule the kernel cannot evaluate (DWARF expressions other than the PLT
/// one, registers other than rsp/rbp, offsets out of range).
pub const ROW_UNSUPPORTED: u8 = 5;
/// A signal trampoline (`__restore_rt`, FDE augmentation `S`): rsp points
/// at a `ucontext_t`, whose saved registers give the interrupted frame.
pub const ROW_SIGNAL: u8 = 6;

/// Byte offsets into the `ucontext_t` a signal trampoline's rsp points at
/// (uc_mcontext starts at 40; sigcontext order r8..r15, rdi, rsi, rbp, rbx,
/// rdx, rax, rcx, rsp, rip).
pub const SIGFRAME_RBP: u64 = 40 + 10 * 8;
pub const SIGFRAME_RSP: u64 = 40 + 15 * 8;
pub const SIGFRAME_RIP: u64 = 40 + 16 * 8;

/// Slots of the kernel's mappings array, shared by all processes (each
/// process has a contiguous range, sorted by start): 2.5 MiB, ~3000
/// processes of 20 executable mappings.
pub const MAPPING_SLOTS: u32 = 65_536;

/// One executable mapping of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Subtracted from a pc in this mapping to get a row pc: the load bias
    /// plus the table's base address.
    pub bias: u64,
    /// First row of the file's table in the rows array.
    pub rows_start: u32,
    /// Rows in the table; 0: no table (JIT code, unreadable file, evicted),
    /// so pcs here unwind by frame pointer.
    pub rows_len: u32,
    /// The table's page index: `index_len` slots of the rows array from
    /// `index_start`, whose `pc` fields hold, for each `INDEX_PAGE` of row
    /// pcs, the (table-relative) row covering the page's first pc; the last
    /// slot holds the last row. The rows for a pc in page `p` lie between
    /// slots `p` and `p + 1`, so the search starts from a few dozen rows
    /// instead of the whole table. 0: no index, search every row.
    pub index_start: u32,
    pub index_len: u32,
}

const _: () = assert!(core::mem::size_of::<Mapping>() == 40);

/// `rows_start` of a mapping of anonymous executable memory (JIT code),
/// which has no table (`rows_len` 0): its frames are walked by frame
/// pointer and counted as JIT frames rather than as frames without a table.
pub const ROWS_ANON: u32 = u32::MAX;

/// log2 of the pc range one index slot covers (4 KiB): libc's 28k rows
/// over 1.6 MB of text are ~70 rows per slot, 7 search steps instead of 15,
/// for index slots costing 1.5 % of the rows.
pub const INDEX_PAGE_SHIFT: u32 = 12;

/// Where a process's mappings are in the mappings array (map value keyed
/// by tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEntry {
    pub start: u32,
    pub len: u32,
}

const _: () = assert!(core::mem::size_of::<ProcessEntry>() == 8);

/// Frames the kernel unwinder walks at most; also the stack buffer size.
pub const MAX_UNWIND_FRAMES: u32 = crate::MAX_STACK_DEPTH as u32;

/// Iterations of the table binary search: enough for 2^24 rows, more than
/// the rows array can hold.
pub const ROW_SEARCH_STEPS: u32 = 24;
/// Iterations of the mapping binary search (2^16 = MAPPING_SLOTS).
pub const MAPPING_SEARCH_STEPS: u32 = 17;

#[cfg(feature = "user")]
unsafe impl aya::Pod for UnwindRow {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Mapping {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ProcessEntry {}
