//! The unwind bench's two programs: built from the sources next to this file,
//! checked (no frame pointers; libstdc++ mapped), and killed on drop.

use std::{
    collections::BTreeSet,
    env, fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::step;

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

/// Compiles `source` with `$<env>` (default `default`) and `flags` into `dir/name`.
pub fn build(
    dir: &Path,
    name: &str,
    ext: &str,
    source: &str,
    (env_var, default): (&str, &str),
    flags: &[&str],
) -> Result<PathBuf> {
    let src = dir.join(format!("{name}.{ext}"));
    fs::write(&src, source).with_context(|| format!("cannot write {}", src.display()))?;
    let bin = dir.join(name);
    let cc = env::var(env_var).unwrap_or_else(|_| default.into());
    let out = Command::new(&cc)
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .with_context(|| format!("cannot run {cc} to build the {name} workload (apt-get install {default})"))?;
    ensure!(
        out.status.success(),
        "{cc} {} failed to build the {name} workload ({}):\n{}",
        flags.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(bin)
}

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

/// A running workload, killed and reaped on drop.
pub struct Workload {
    child: Child,
    pub name: &'static str,
}

impl Workload {
    pub fn start(bin: &Path, name: &'static str, args: &[String]) -> Result<Workload> {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start the {name} workload ({})", bin.display()))?;
        let mut w = Workload { child, name };
        thread::sleep(Duration::from_millis(500)); // hot, with its mappings in place
        w.check()?;
        Ok(w)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the workload has exited.
    pub fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("waiting for a workload")? {
            bail!("the {} workload exited early: {status}", self.name);
        }
        Ok(())
    }

    /// The files mapped executable into the workload, in /proc/PID/maps order.
    pub fn code_files(&self) -> Result<Vec<PathBuf>> {
        let path = format!("/proc/{}/maps", self.pid());
        let maps = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let perms = f.nth(1).unwrap_or_default();
            let Some(file) = f.nth(3).filter(|p| p.starts_with('/')) else { continue };
            let file = PathBuf::from(file);
            if perms.contains('x') && !files.contains(&file) {
                files.push(file);
            }
        }
        Ok(files)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        let exe = env::current_exe().unwrap();
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
