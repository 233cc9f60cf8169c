//! User-space symbolization of file offsets with blazesym: ELF symbols, and
//! DWARF (with inlined functions and source lines) when the file has it.

use std::{path::Path, sync::Arc};

use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer,
};

use super::cache::{Resolved, SymFrame};

/// Resolves file offsets of one binary to frames. A trait so the profile
/// builder can be tested with canned answers.
pub trait FileResolver {
    /// One result per offset, in order; unknown offsets give an empty result.
    fn resolve(&mut self, path: &Path, offsets: &[u64]) -> Vec<Resolved>;
}

/// The blazesym-backed resolver.
pub struct Blaze {
    symbolizer: Symbolizer,
    /// Files blazesym could not open or parse, counted for the summary.
    pub failed_files: u64,
}

impl Default for Blaze {
    fn default() -> Self {
        let symbolizer =
            Symbolizer::builder().enable_code_info(true).enable_inlined_fns(true).enable_demangling(true).build();
        Self { symbolizer, failed_files: 0 }
    }
}

impl FileResolver for Blaze {
    fn resolve(&mut self, path: &Path, offsets: &[u64]) -> Vec<Resolved> {
        let src = Source::Elf(Elf::new(path));
        match self.symbolizer.symbolize(&src, Input::FileOffset(offsets)) {
            Ok(results) => results.into_iter().map(convert).collect(),
            Err(e) => {
                log::debug!("symbolizing {} failed: {e}", path.display());
                self.failed_files += 1;
                offsets.iter().map(|_| Resolved::from(Vec::new())).collect()
            }
        }
    }
}

fn convert(s: Symbolized<'_>) -> Resolved {
    let Symbolized::Sym(sym) = s else {
        return Arc::from(Vec::new());
    };
    // blazesym lists the function first and then the functions inlined into
    // it, outermost to innermost, each with its own source location. The
    // model wants innermost first, with all but the real function marked.
    let code = |c: Option<&blazesym::symbolize::CodeInfo<'_>>| {
        (c.map(|c| c.to_path().display().to_string()), c.and_then(|c| c.line))
    };
    let mut frames = Vec::with_capacity(1 + sym.inlined.len());
    for f in sym.inlined.iter().rev() {
        let (file, line) = code(f.code_info.as_ref());
        frames.push(SymFrame { name: f.name.to_string(), file, line, inlined: true });
    }
    let (file, line) = code(sym.code_info.as_deref());
    frames.push(SymFrame { name: sym.name.to_string(), file, line, inlined: false });
    Arc::from(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn a_function_to_find() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn resolves_a_function_of_this_test_binary_by_file_offset() {
        let exe = std::env::current_exe().unwrap();
        let addr = a_function_to_find as *const () as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let m = crate::process::maps::parse_executable(&maps)
            .into_iter()
            .find(|m| m.start <= addr && addr < m.end)
            .expect("mapping of our own code");
        let mut blaze = Blaze::default();
        let out = blaze.resolve(&exe, &[m.file_offset(addr), u64::MAX - 1]);
        assert!(out[0].last().unwrap().name.ends_with("a_function_to_find"), "{:?}", out[0]);
        assert!(out[0].last().unwrap().file.as_deref().is_some_and(|f| f.ends_with("elf.rs")));
        assert!(out[1].is_empty());
    }
}
