//! The few ELF facts the table needs: where the CFI sections are, the
//! addresses gimli needs to resolve pointers, and the executable segments.

use object::elf::{self, FileHeader64};
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, SectionTable};
use object::LittleEndian;

use super::{Segment, TableError};

/// A CFI section's bytes and its virtual address.
#[derive(Clone, Copy, Debug)]
pub(super) struct CfiData<'a> {
    pub data: &'a [u8],
    pub addr: u64,
}

#[derive(Debug)]
pub(super) struct ElfInfo<'a> {
    pub eh_frame: Option<CfiData<'a>>,
    pub debug_frame: Option<CfiData<'a>>,
    pub text_addr: u64,
    pub got_addr: Option<u64>,
    pub exec_segments: Vec<Segment>,
    /// `[p_vaddr, p_vaddr + p_memsz)` of the executable segments: FDEs
    /// outside these describe no code that can ever run (discarded sections,
    /// whose FDEs linkers leave at address 0 in `.debug_frame`).
    pub exec_ranges: Vec<(u64, u64)>,
}

pub(super) fn parse(bytes: &[u8]) -> Result<ElfInfo<'_>, TableError> {
    // Checked by hand first so a 32-bit, big-endian or foreign-architecture
    // file gets a precise error rather than object's generic parse failure.
    if bytes.len() < 4 || bytes[..4] != elf::ELFMAG {
        return Err(TableError::NotElf);
    }
    if bytes.len() > 5 && (bytes[4] != elf::ELFCLASS64 || bytes[5] != elf::ELFDATA2LSB) {
        return Err(TableError::NotX86_64 { machine: None });
    }
    if let Some(&[lo, hi]) = bytes.get(18..20) {
        let machine = u16::from_le_bytes([lo, hi]);
        if machine != elf::EM_X86_64 {
            return Err(TableError::NotX86_64 { machine: Some(machine) });
        }
    }

    let header = FileHeader64::<LittleEndian>::parse(bytes).map_err(TableError::MalformedElf)?;
    let endian = LittleEndian;
    let sections = header.sections(endian, bytes).map_err(TableError::MalformedElf)?;
    let phdrs = header.program_headers(endian, bytes).map_err(TableError::MalformedElf)?;

    let mut exec_segments = Vec::new();
    let mut exec_ranges = Vec::new();
    for ph in phdrs {
        if ph.p_type(endian) != elf::PT_LOAD || ph.p_flags(endian) & elf::PF_X == 0 {
            continue;
        }
        let vaddr = ph.p_vaddr(endian);
        exec_segments.push(Segment { offset: ph.p_offset(endian), vaddr, filesz: ph.p_filesz(endian) });
        exec_ranges.push((vaddr, vaddr.saturating_add(ph.p_memsz(endian))));
    }
    exec_segments.sort_by_key(|s| s.offset);

    let addr_of = |name: &[u8]| sections.section_by_name(endian, name).map(|(_, sh)| sh.sh_addr(endian));
    Ok(ElfInfo {
        eh_frame: cfi_section(&sections, bytes, b".eh_frame")?,
        debug_frame: cfi_section(&sections, bytes, b".debug_frame")?,
        text_addr: addr_of(b".text").unwrap_or(0),
        got_addr: addr_of(b".got"),
        exec_segments,
        exec_ranges,
    })
}

fn cfi_section<'a>(
    sections: &SectionTable<'a, FileHeader64<LittleEndian>>,
    bytes: &'a [u8],
    name: &[u8],
) -> Result<Option<CfiData<'a>>, TableError> {
    let endian = LittleEndian;
    let Some((_, sh)) = sections.section_by_name(endian, name) else { return Ok(None) };
    // Compressed `.debug_frame` (SHF_COMPRESSED) would need zlib/zstd for
    // a section only unstripped, non-eh binaries use: treat it as absent.
    if sh.sh_flags(endian) & u64::from(elf::SHF_COMPRESSED) != 0 {
        return Ok(None);
    }
    let data = sh.data(endian, bytes).map_err(TableError::MalformedElf)?;
    if data.is_empty() {
        return Ok(None);
    }
    Ok(Some(CfiData { data, addr: sh.sh_addr(endian) }))
}

/// Bounds the copy: a real vDSO is two to four pages; anything larger means
/// the headers are not what we think they are.
const MAX_VDSO_SIZE: u64 = 1 << 20;

pub(super) fn vdso_image() -> Option<Vec<u8>> {
    // SAFETY: getauxval has no preconditions.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    if base == 0 {
        return None;
    }
    // The kernel maps the whole vDSO file, so every byte its headers
    // describe is readable; the [vdso] line of our own maps, when present,
    // caps that in case the headers lie.
    let mapped = vdso_mapping_len(base).unwrap_or(MAX_VDSO_SIZE);
    let read = |off: u64, len: usize| -> Option<&'static [u8]> {
        if off.checked_add(len as u64)? > mapped {
            return None;
        }
        // SAFETY: within the vDSO mapping (checked above), which is
        // readable and stays mapped for the life of the process.
        Some(unsafe { std::slice::from_raw_parts((base + off) as *const u8, len) })
    };
    let ehdr = read(0, 64)?;
    if ehdr[..4] != elf::ELFMAG || ehdr[4] != elf::ELFCLASS64 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(ehdr, 32), u16_at(ehdr, 54), u16_at(ehdr, 56));
    let (shoff, shentsize, shnum) = (u64_at(ehdr, 40), u16_at(ehdr, 58), u16_at(ehdr, 60));

    let mut size = shoff.checked_add(shentsize.checked_mul(shnum)?)?;
    if phentsize >= 56 {
        for i in 0..phnum {
            let ph = read(phoff.checked_add(i * phentsize)?, 56)?;
            if u32::from_le_bytes(ph[..4].try_into().unwrap()) == elf::PT_LOAD {
                size = size.max(u64_at(ph, 8).checked_add(u64_at(ph, 32))?);
            }
        }
    }
    if size > MAX_VDSO_SIZE {
        return None;
    }
    read(0, size as usize).map(<[u8]>::to_vec)
}

/// Length of the mapping starting at `start` in /proc/self/maps.
fn vdso_mapping_len(start: u64) -> Option<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let range = line.split_whitespace().next()?;
        let (lo, hi) = range.split_once('-')?;
        let (lo, hi) = (u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?);
        (lo == start).then(|| hi.saturating_sub(lo))
    })
}
