//! Finding CPython in a process: the binary or `libpython3.x.so` that
//! holds the interpreter loop, its version, and where its symbols landed.
//!
//! Debian's python3 and libpython are stripped, but `_PyRuntime`,
//! `_PyEval_EvalFrameDefault` and (3.11+) `Py_Version` are exported, so
//! `.dynsym` serves; `.symtab`, when present, adds the loop's `.cold` part.

use std::collections::HashMap;

use object::{Object, ObjectSegment, ObjectSymbol};
use profiler_common::python::PyProcess;

use super::{
    memory::{u64_at, Memory},
    offsets::{self, Layout, Version, DEBUG_OFFSETS_LEN},
};
use crate::process::MapEntry;

/// What one interpreter file says about itself (addresses are ELF virtual
/// addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interpreter {
    pub version: Version,
    pub eval: (u64, u64),
    pub cold: Option<(u64, u64)>,
    pub runtime: u64,
    /// Loadable segments: (vaddr, file offset, file size).
    pub segments: Vec<(u64, u64, u64)>,
}

/// Why a Python process gets native frames only.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unsupported {
    #[error("CPython {0}.{1} is not supported (3.10 to 3.13 are); its frames stay native")]
    Version(u8, u8),
    #[error("the CPython version of {0} could not be told (no Py_Version, no version in the name)")]
    NoVersion(String),
    #[error("CPython 3.13's _Py_DebugOffsets could not be used: {0}")]
    DebugOffsets(#[from] offsets::DebugOffsetsError),
    #[error("_PyRuntime of pid {0} could not be read")]
    Unreadable(u32),
}

/// Reads `data` (an ELF file named `file_name`); `None` when it holds no
/// interpreter loop (python3 linked to libpython, any other file).
pub fn inspect(data: &[u8], file_name: &str) -> Result<Option<Interpreter>, Unsupported> {
    let Ok(elf) = object::read::elf::ElfFile64::<object::LittleEndian>::parse(data) else { return Ok(None) };
    let (mut eval, mut cold, mut runtime, mut py_version) = (None, None, None, None);
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        match sym.name() {
            Ok("_PyEval_EvalFrameDefault") if sym.size() > 0 => {
                eval = Some((sym.address(), sym.address() + sym.size()))
            }
            Ok("_PyEval_EvalFrameDefault.cold") if sym.size() > 0 => {
                cold = Some((sym.address(), sym.address() + sym.size()))
            }
            Ok("_PyRuntime") => runtime = Some(sym.address()),
            Ok("Py_Version") => py_version = Some(sym.address()),
            _ => {}
        }
    }
    let (Some(eval), Some(runtime)) = (eval, runtime) else { return Ok(None) };
    let segments: Vec<(u64, u64, u64)> = elf
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (s.address(), offset, size)
        })
        .collect();
    // Py_Version is PY_VERSION_HEX (0x030b02f0 for 3.11.2), an unsigned
    // long in .rodata.
    let from_symbol = py_version.and_then(|addr| {
        let (vaddr, offset, size) = *segments.iter().find(|(v, _, s)| addr >= *v && addr + 8 <= v + s)?;
        let _ = size;
        let at = usize::try_from(offset + (addr - vaddr)).ok()?;
        let hex = u64_at(data, at);
        (hex >> 24 == 3).then_some((3u8, ((hex >> 16) & 0xff) as u8))
    });
    let version = from_symbol.or_else(|| version_from_name(file_name));
    let Some(version) = version else { return Err(Unsupported::NoVersion(file_name.to_owned())) };
    Ok(Some(Interpreter { version, eval, cold, runtime, segments }))
}

/// `python3.11`, `libpython3.11.so.1.0`, `libpython3.12d.so` -> the version.
pub fn version_from_name(name: &str) -> Option<Version> {
    let rest = name.strip_prefix("lib").unwrap_or(name).strip_prefix("python")?;
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether a mapped file may be an interpreter, by name (cheap, before
/// any file is read).
pub fn looks_like_python(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("python") || name.starts_with("libpython")
}

/// The interpreter's layout, from the tables or (3.13) from the process.
pub fn layout(version: Version, runtime: u64, pid: u32, mem: &impl Memory) -> Result<Layout, Unsupported> {
    if let Some(l) = offsets::table(version) {
        return Ok(l);
    }
    if version == (3, 13) {
        let mut block = vec![0u8; DEBUG_OFFSETS_LEN];
        if !mem.read(pid, runtime, &mut block) {
            return Err(Unsupported::Unreadable(pid));
        }
        return Ok(offsets::parse_debug_offsets(&block)?);
    }
    Err(Unsupported::Version(version.0, version.1))
}

/// Where a mapping's file offset lands: the load bias (runtime address
/// minus ELF virtual address) of the file, through the segment it maps.
pub fn load_bias(segments: &[(u64, u64, u64)], m: &MapEntry) -> Option<u64> {
    const PAGE: u64 = 4096;
    let (vaddr, offset, _) =
        *segments.iter().find(|(_, off, size)| m.offset >= off & !(PAGE - 1) && m.offset < off + (*size).max(1))?;
    let vaddr_at_start = vaddr.wrapping_add(m.offset).wrapping_sub(offset);
    Some(m.start.wrapping_sub(vaddr_at_start))
}

/// A Python process found: what the kernel gets, and what the namer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub record: PyProcess,
    pub layout: Layout,
    /// The interpreter file, for messages.
    pub path: String,
}

/// Parsed interpreter files, keyed by (device, inode), so each binary is
/// read once however many processes run it. Bounded: cleared when full.
#[derive(Default)]
pub struct Detector {
    files: HashMap<(u64, u64), Option<Interpreter>>,
}

const FILES_REMEMBERED: usize = 256;

impl Detector {
    /// The Python interpreter in process `pid`, given its executable
    /// mappings; `Ok(None)` when it runs none.
    pub fn find(&mut self, pid: u32, maps: &[MapEntry], mem: &impl Memory) -> Result<Option<Found>, Unsupported> {
        for m in maps.iter().filter(|m| m.executable && m.is_file() && looks_like_python(&m.path)) {
            let key = ((u64::from(m.dev_major) << 32) | u64::from(m.dev_minor), m.inode);
            if !self.files.contains_key(&key) {
                if self.files.len() >= FILES_REMEMBERED {
                    self.files.clear();
                }
                let name = m.path.rsplit('/').next().unwrap_or(&m.path);
                let via_map_files = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                let data =
                    std::fs::read(&via_map_files).or_else(|_| std::fs::read(format!("/proc/{pid}/root{}", m.path)));
                let parsed = match data {
                    Ok(data) => inspect(&data, name)?,
                    Err(e) => {
                        log::debug!("pid {pid}: reading {} failed: {e}", m.path);
                        None
                    }
                };
                self.files.insert(key, parsed);
            }
            let Some(Some(interp)) = self.files.get(&key) else { continue };
            let Some(bias) = load_bias(&interp.segments, m) else { continue };
            let runtime = interp.runtime.wrapping_add(bias);
            let layout = layout(interp.version, runtime, pid, mem)?;
            let (cold_start, cold_end) = interp.cold.map_or((0, 0), |(s, e)| (s + bias, e + bias));
            let record = PyProcess {
                eval_start: interp.eval.0 + bias,
                eval_end: interp.eval.1 + bias,
                cold_start,
                cold_end,
                runtime,
                version: (u32::from(layout.version.0) << 8) | u32::from(layout.version.1),
                _pad: 0,
                offsets: layout.kernel,
            };
            return Ok(Some(Found { record, layout, path: m.path.clone() }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_names() {
        assert_eq!(version_from_name("python3.11"), Some((3, 11)));
        assert_eq!(version_from_name("libpython3.12d.so.1.0"), Some((3, 12)));
        assert_eq!(version_from_name("libpython3.10.so"), Some((3, 10)));
        assert_eq!(version_from_name("python3"), None);
        assert_eq!(version_from_name("perl5.36"), None);
        assert!(looks_like_python("/usr/bin/python3.11"));
        assert!(!looks_like_python("/usr/lib/libc.so.6"));
    }

    #[test]
    fn bias_of_a_pie_text_mapping() {
        // python3.11's text: vaddr 0x420f10.. at file offset 0x20f10, mapped
        // from offset 0x20000 at 0x55550020000.
        let segs = [(0, 0, 0x20000), (0x420000, 0x20000, 0x3f0000)];
        let m = MapEntry {
            start: 0x5555_0042_0000,
            end: 0x5555_0081_0000,
            offset: 0x20000,
            dev_major: 8,
            dev_minor: 1,
            inode: 1,
            executable: true,
            path: "/usr/bin/python3.11".into(),
            deleted: false,
        };
        assert_eq!(load_bias(&segs, &m), Some(0x5555_0000_0000));
    }

    /// Debian 12's python3: its version
    /// from `Py_Version` and its loop from `.dynsym`.
    #[test]
    fn debian_python3_is_found_by_its_dynamic_symbols() {
        let data = std::fs::read("/usr/bin/python3.11").expect("Debian python3.11 (CI installs python3)");
        let i = inspect(&data, "python3.11").unwrap().expect("an interpreter");
        assert_eq!(i.version, (3, 11));
        assert!(i.eval.1 > i.eval.0 + 1000);
        assert!(i.runtime != 0);
        assert_eq!(inspect(b"not an elf", "python3.11"), Ok(None));
    }
}
