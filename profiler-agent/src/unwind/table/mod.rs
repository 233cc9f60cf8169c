//! Builds the compact unwind table of one x86-64 ELF file from its
//! `.eh_frame` (or `.debug_frame`, when that is all it has).
//!
//! Every file a profiled process maps goes through here, so the input is
//! untrusted: nothing panics on malformed bytes, and the work is bounded by
//! the size of the CFI section. A malformed FDE costs only its own range
//! (marked [`ROW_UNSUPPORTED`](profiler_common::unwind::ROW_UNSUPPORTED));
//! only a section whose entry list cannot be walked fails the whole file.

mod cfi;
mod elf;
mod rows;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::path::Path;

use gimli::{BaseAddresses, DebugFrame, EhFrame, LittleEndian};
use profiler_common::unwind::UnwindRow;

pub use cfi::MAX_ROWS;

/// The unwind table of one ELF file.
#[derive(Clone, Debug, Default)]
pub struct UnwindTable {
    /// Subtract from an ELF virtual address to get a row pc (the lowest FDE
    /// start, or 0).
    pub base: u64,
    /// Sorted by pc, adjacent rows with identical rules merged, gaps between
    /// FDEs as `ROW_NONE` rows, a `ROW_NONE` row after the last FDE's end.
    pub rows: Vec<UnwindRow>,
    /// Executable `PT_LOAD` segments sorted by file offset, to turn a
    /// mapping's file offset into an ELF virtual address.
    pub exec_segments: Vec<Segment>,
    pub stats: TableStats,
}

/// An executable `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
}

/// Which section the rows came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CfiSection {
    #[default]
    EhFrame,
    DebugFrame,
}

/// What went into a table, for telemetry and for judging how much of a
/// file the kernel can actually unwind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// FDEs that contributed rows.
    pub fdes: usize,
    /// FDEs left out: unparsable, empty, or outside every executable segment.
    pub skipped_fdes: usize,
    /// FDEs whose CFI program failed part way; rows from the failure on are
    /// `ROW_UNSUPPORTED`.
    pub bad_fdes: usize,
    /// FDEs lying (partly) over an earlier one's range.
    pub overlapping_fdes: usize,
    /// Rows as the CFI programs produce them plus the `ROW_NONE` gap rows,
    /// before adjacent identical rows are merged.
    pub rows_before_merge: usize,
    /// Rows (before merging) that became `ROW_UNSUPPORTED`.
    pub unsupported_rows: usize,
    /// Why they did.
    pub unsupported: UnsupportedCounts,
    /// Size of the CFI section used.
    pub cfi_bytes: usize,
    pub section: CfiSection,
}

/// Reasons rows became `ROW_UNSUPPORTED`, counted per unmerged row (per FDE
/// for `ra_rule` when the CIE's return address column is not 16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnsupportedCounts {
    /// A CFA expression other than the PLT one.
    pub cfa_expression: usize,
    /// CFA based on a register other than rsp/rbp.
    pub cfa_register: usize,
    /// CFA offset outside 0..=65535.
    pub cfa_offset: usize,
    /// Return address not at CFA-8 (nor undefined).
    pub ra_rule: usize,
    /// Caller's rbp not at a multiple of 8 within i8 range of the CFA.
    pub rbp_rule: usize,
    /// Caller's rsp not the CFA.
    pub rsp_rule: usize,
}

#[derive(thiserror::Error, Debug)]
pub enum TableError {
    #[error("not an ELF file")]
    NotElf,
    #[error("malformed ELF file: {0}")]
    MalformedElf(#[source] object::Error),
    /// `machine` is the ELF `e_machine`, or `None` when the class or byte
    /// order already rules x86-64 out.
    #[error("not a 64-bit little-endian x86-64 ELF file (e_machine {machine:?})")]
    NotX86_64 { machine: Option<u16> },
    #[error("no .eh_frame or .debug_frame with FDEs for executable code")]
    NoCfi,
    #[error("malformed CFI: {0}")]
    MalformedCfi(#[from] gimli::Error),
    /// The code the FDEs cover spans more than a u32 row pc can express.
    #[error("FDEs span {span:#x} bytes, more than a 32-bit row pc can address")]
    TooBig { span: u64 },
    #[error("more than {MAX_ROWS} CFI rows (or as much CFI evaluation work)")]
    TooManyRows,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Builds the table of the ELF image `elf_bytes`.
pub fn build(elf_bytes: &[u8]) -> Result<UnwindTable, TableError> {
    let info = elf::parse(elf_bytes)?;
    let mut stats = TableStats::default();
    let mut collected = None;

    if let Some(eh) = info.eh_frame {
        let mut section = EhFrame::new(eh.data, LittleEndian);
        section.set_address_size(8);
        let mut bases = BaseAddresses::default().set_eh_frame(eh.addr).set_text(info.text_addr);
        if let Some(got) = info.got_addr {
            bases = bases.set_got(got);
        }
        stats = TableStats { cfi_bytes: eh.data.len(), section: CfiSection::EhFrame, ..Default::default() };
        collected = Some(cfi::collect(&section, eh.data, &bases, &info.exec_ranges, &mut stats)?);
    }
    if collected.as_ref().is_none_or(cfi::Collected::is_empty) {
        if let Some(df) = info.debug_frame {
            let mut section = DebugFrame::new(df.data, LittleEndian);
            section.set_address_size(8);
            stats = TableStats { cfi_bytes: df.data.len(), section: CfiSection::DebugFrame, ..Default::default() };
            let bases = BaseAddresses::default();
            collected = Some(cfi::collect(&section, df.data, &bases, &info.exec_ranges, &mut stats)?);
        }
    }
    let collected = collected.filter(|c| !c.is_empty()).ok_or(TableError::NoCfi)?;
    let (base, rows) = cfi::assemble(collected, &mut stats)?;
    Ok(UnwindTable { base, rows, exec_segments: info.exec_segments, stats })
}

/// Reads `path` and builds its table.
pub fn build_file(path: &Path) -> Result<UnwindTable, TableError> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Err(TableError::NotElf);
    }
    let len = usize::try_from(len).map_err(|_| TableError::NotElf)?;
    // The mapping's pages are released between symbolization passes
    // (process::residency); held until after the munmap (`_unmap` drops first).
    let _mapping = crate::process::residency::MAPPING.read().unwrap_or_else(|e| e.into_inner());
    // Mapped rather than read: only the headers and the CFI sections are
    // touched, so a 150 MB shared library costs its .eh_frame in page cache,
    // not 150 MB of agent memory (peak RSS is in `cargo xtask bench overhead`).
    // SAFETY: a private read-only mapping of a file we opened, unmapped on
    // drop. A file truncated while mapped would fault (SIGBUS); executables
    // and libraries in use are not rewritten in place.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(TableError::Io(std::io::Error::last_os_error()));
    }
    struct Unmap(*mut libc::c_void, usize);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: unmapping exactly what was mapped above.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }
    let _unmap = Unmap(ptr, len);
    // SAFETY: `len` readable bytes at `ptr` until `_unmap` drops.
    build(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// A copy of this process's vDSO image. Every process on the host maps the
/// same vDSO, so its one table serves every `[vdso]` mapping.
pub fn vdso_image() -> Option<Vec<u8>> {
    elf::vdso_image()
}

/// Pages are mapped whole, so a mapping of a segment whose `p_offset` is
/// not page aligned starts up to a page before it.
const PAGE_SIZE: u64 = 4096;

impl UnwindTable {
    /// The ELF virtual address at `file_offset` of an executable mapping
    /// (`vaddr = p_vaddr + (file_offset - p_offset)`), or `None` when no
    /// executable segment holds that offset.
    pub fn vaddr_of_file_offset(&self, file_offset: u64) -> Option<u64> {
        let segment_end = |s: &Segment| s.offset.saturating_add(s.filesz);
        // An exact hit first: the page-rounded start of one segment may lie
        // inside the previous one.
        let seg = self.exec_segments.iter().find(|s| s.offset <= file_offset && file_offset < segment_end(s)).or_else(
            || {
                self.exec_segments
                    .iter()
                    .find(|s| s.offset & !(PAGE_SIZE - 1) <= file_offset && file_offset < segment_end(s))
            },
        )?;
        if file_offset >= seg.offset {
            seg.vaddr.checked_add(file_offset - seg.offset)
        } else {
            seg.vaddr.checked_sub(seg.offset - file_offset)
        }
    }

    /// The row covering ELF virtual address `vaddr`, found as the kernel
    /// finds it: the last row whose pc is <= `vaddr - base`. `None` before
    /// the first row; past the last FDE this is the final `ROW_NONE` row.
    pub fn lookup(&self, vaddr: u64) -> Option<&UnwindRow> {
        rows::lookup_rows(&self.rows, vaddr.checked_sub(self.base)?)
    }
}
