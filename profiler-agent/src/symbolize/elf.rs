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
    /// Times the resolver dropped its per-file caches to stay bounded.
    fn cache_resets(&self) -> u64 {
        0
    }
}

/// Files, and bytes of files, blazesym keeps parsed at most. It caches every
/// file it has opened (the mapping, symbol tables and DWARF indexes) for the
/// symbolizer's life; the mapped pages it touched count in the agent's RSS,
/// and paths through `/proc/PID/root` differ per process. System-wide on a
/// host running big debug binaries (180 MB each, a new one per build) the
/// daemon grew by ~10 MB a minute, mostly file pages of binaries long gone
/// (`cargo xtask bench churn`: 591 MB RSS of which 144 MB anonymous). Past
/// either bound the cache is dropped and rebuilt on demand, which costs
/// re-parsing files still in use; the address cache in front of it keeps
/// hot addresses resolved without blazesym.
const MAX_CACHED_FILES: usize = 64;
const MAX_CACHED_BYTES: u64 = 64 << 20;

/// The blazesym-backed resolver.
pub struct Blaze {
    symbolizer: Symbolizer,
    /// Paths blazesym has cached since its last reset, and their sizes.
    cached: std::collections::HashSet<std::path::PathBuf>,
    cached_bytes: u64,
    /// Files blazesym could not open or parse, counted for the summary.
    pub failed_files: u64,
    /// Times the file cache was dropped for exceeding `MAX_CACHED_FILES`.
    pub cache_resets: u64,
}

fn new_symbolizer() -> Symbolizer {
    Symbolizer::builder().enable_code_info(true).enable_inlined_fns(true).enable_demangling(true).build()
}

impl Default for Blaze {
    fn default() -> Self {
        Self {
            symbolizer: new_symbolizer(),
            cached: Default::default(),
            cached_bytes: 0,
            failed_files: 0,
            cache_resets: 0,
        }
    }
}

impl FileResolver for Blaze {
    fn cache_resets(&self) -> u64 {
        self.cache_resets
    }

    fn resolve(&mut self, path: &Path, offsets: &[u64]) -> Vec<Resolved> {
        if !self.cached.contains(path) {
            let size = std::fs::metadata(path).map_or(0, |m| m.len());
            let full = self.cached.len() >= MAX_CACHED_FILES || self.cached_bytes + size > MAX_CACHED_BYTES;
            if full && !self.cached.is_empty() {
                self.symbolizer = new_symbolizer();
                self.cached.clear();
                self.cached_bytes = 0;
                self.cache_resets += 1;
            }
            self.cached.insert(path.to_path_buf());
            self.cached_bytes += size;
        }
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
