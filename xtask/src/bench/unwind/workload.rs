//! The unwind bench's two programs: built from the sources next to this file,
//! checked (no frame pointers; libstdc++ mapped), and killed on drop.

use std::{collections::BTreeSet, fs, path::Path, process::Command};

use anyhow::{bail, ensure, Result};

use crate::step;

pub use crate::bench::workload::{build, Workload};

/// Recursion depth of `deep.c` (its `DEPTH`): frames of `level_*` per stack.
pub const DEPTH: usize = 64;
/// Frames of a `deep` stack besides the levels: burn, worker, start_thread, clone3.
pub const DEEP_EXTRA: usize = 4;
pub const DEEP_C: &str = include_str!("deep.c");
pub const DEEP_FLAGS: &[&str] = &["-O2", "-fomit-frame-pointer", "-pthread"];
pub const SERVICE_CPP: &str = include_str!("service.cpp");
pub const SERVICE_FLAGS: &[&str] = &["-O2"];
/// The functions of `deep.c` a sample's stack is made of.
const DEEP_FUNCTIONS: [&str; 6] = ["burn", "level_a", "level_b", "level_c", "level_d", "worker"];

/// Fails if any function of the deep workload sets up a frame pointer
/// (`mov %rsp,%rbp`): then the frame-pointer baseline would walk it too and
/// the comparison would be meaningless. Skipped (with a note) without objdump.
pub fn check_no_frame_pointer(bin: &Path) -> Result<()> {
    let out = match Command::new("objdump").args(["-d", "--no-show-raw-insn"]).arg(bin).output() {
        Ok(out) if out.status.success() => out,
        _ => {
            step("bench: objdump is not available; not checking that the workload has no frame pointers");
            return Ok(());
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut current: Option<&str> = None;
    let mut seen = BTreeSet::new();
    for line in text.lines() {
        if let Some(name) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")).map(|(_, n)| n) {
            current = DEEP_FUNCTIONS.iter().copied().find(|f| *f == name);
            seen.extend(current);
            continue;
        }
        if let Some(f) = current {
            let insn: Vec<&str> = line.split_whitespace().collect();
            if insn.windows(2).any(|w| w == ["mov", "%rsp,%rbp"]) {
                bail!(
                    "the deep workload's {f} sets up a frame pointer ({}); it must be built without \
                     (-fomit-frame-pointer), or the frame-pointer baseline walks it too",
                    line.trim()
                );
            }
        }
    }
    let missing: Vec<&str> = DEEP_FUNCTIONS.iter().copied().filter(|f| !seen.contains(f)).collect();
    ensure!(missing.is_empty(), "objdump shows no {} in the deep workload: was it inlined?", missing.join(", "));
    Ok(())
}

/// The size of section `name` of the ELF64 little-endian file at `path`, if
/// it is one and has it.
pub fn section_size(path: &Path, name: &str) -> Option<u64> {
    let b = fs::read(path).ok()?;
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    // ELFCLASS64, ELFDATA2LSB
    if b.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let (shentsize, shnum, shstrndx) =
        (usize::from(u16_at(0x3a)?), usize::from(u16_at(0x3c)?), usize::from(u16_at(0x3e)?));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = usize::try_from(u64_at(header(shstrndx) + 0x18)?).ok()?;
    (0..shnum).find_map(|i| {
        let h = header(i);
        let start = strtab + usize::try_from(u32_at(h)?).ok()?;
        let end = start + b.get(start..)?.iter().position(|&c| c == 0)?;
        (b.get(start..end)? == name.as_bytes()).then(|| u64_at(h + 0x20)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_section_sizes() {
        let exe = std::env::current_exe().unwrap();
        let text = section_size(&exe, ".text").expect("the test binary has a .text");
        assert!(text > 0);
        assert_eq!(section_size(&exe, ".no-such-section"), None);
        assert_eq!(section_size(Path::new("/proc/self/status"), ".text"), None);
    }

    #[test]
    fn the_sources_match_the_constants() {
        assert!(DEEP_C.contains(&format!("#define DEPTH {DEPTH}\n")));
        for f in DEEP_FUNCTIONS {
            assert!(DEEP_C.contains(&format!("{f}(")), "{f}");
        }
    }
}
