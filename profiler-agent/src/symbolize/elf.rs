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
    /// Marks the end of one pass (an interval's symbolization): files the
    /// resolver keeps parsed may be dropped here.
    fn end_pass(&mut self) {}
    /// Parsed files the resolver dropped to stay bounded, since it started.
    fn files_evicted(&self) -> u64 {
        0
    }
}

/// Files, and bytes of files, blazesym keeps parsed at most. It caches every
/// file it has opened (the mapping, symbol tables and DWARF indexes, and a
/// compressed debug file's sections inflated on the heap) until told to
/// evict it; the mapped pages it touched count in the agent's RSS, and paths
/// through `/proc/PID/root` differ per process. System-wide on a host
/// running big debug binaries (180 MB each, a new one per build) the daemon
/// grew by ~10 MB a minute, mostly file pages of binaries long gone
/// (`cargo xtask bench churn`: 591 MB RSS of which 144 MB anonymous). Past
/// either bound the least recently used files go.
const MAX_CACHED_FILES: usize = 64;
const MAX_CACHED_BYTES: u64 = 64 << 20;
/// Passes a file stays parsed without a lookup. Lookups only reach blazesym
/// on an address cache miss, so a file idle this long has its hot addresses
/// cached already; dropping it costs a re-parse when a new address comes.
/// In `cargo xtask bench churn` the debug build of the bench's own driver
/// kept 14 MB of file pages resident in the daemon after its stacks were
/// symbolized once, and libc's compressed debug file ~10 MB of heap.
const IDLE_PASSES: u32 = 2;
/// Passes a file stays parsed however busy it is. blazesym parses DWARF
/// lazily and keeps what it parsed (units, abbreviations, line programs):
/// a file looked up every pass, as libc is on a busy host, gains parsed
/// state with each new address and is never idle. With Debian's libc6-dbg
/// installed that was the daemon's whole remaining growth under `cargo
/// xtask bench churn` (600 s soak: +0.21 MB/min over the second half;
/// heaptrack put the live growth in gimli's units under blazesym; with
/// /usr/lib/debug hidden the slope was -0.01). Dropping a busy file every
/// 12 passes (2 minutes at the default 10 s interval) costs one re-parse
/// (libc's debug file: ~11 MB inflated again) per file per 2 minutes and
/// bounds that growth to what 12 passes add: the soak's second half went
/// to -0.04 MB/min, peak 59.4 MB, daemon CPU 53.7 % of a core (54.8 %
/// before; the driver's achieved rate varies between runs).
const MAX_PARSED_PASSES: u32 = 12;

struct Cached {
    bytes: u64,
    /// Passes ended since the file was parsed.
    age: u32,
    /// Whole passes without a lookup in this file.
    idle: u32,
    /// Looked up in the current pass.
    looked_up: bool,
    /// Lookup order, for evicting the least recently used past the bounds.
    used: u64,
}

/// The blazesym-backed resolver.
pub struct Blaze {
    symbolizer: Symbolizer,
    /// Files blazesym has parsed and not been told to evict.
    cached: std::collections::HashMap<std::path::PathBuf, Cached>,
    cached_bytes: u64,
    clock: u64,
    /// Files blazesym could not open or parse, counted for the summary.
    pub failed_files: u64,
    /// Files evicted from blazesym's cache: idle, or past the bounds.
    pub evicted: u64,
    /// Whether each pass ends by dropping the resident pages of the files
    /// kept parsed ([`Blaze::releasing_file_pages`]).
    release_pages: bool,
    /// A lookup reached blazesym since the last release: only lookups touch
    /// the pages of its files, so a pass without one has nothing to release.
    touched: bool,
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
            clock: 0,
            failed_files: 0,
            evicted: 0,
            release_pages: false,
            touched: false,
        }
    }
}

impl Blaze {
    /// A resolver whose passes end by handing back the pages the files it
    /// keeps parsed have resident (`process::residency`): for the daemon,
    /// whose passes are an interval apart. Only for a resolver that runs
    /// on one thread with no other blazesym user beside it, since blazesym's
    /// own mappings are not under `residency::MAPPING`.
    pub fn releasing_file_pages() -> Self {
        Self { release_pages: true, ..Self::default() }
    }

    fn evict(&mut self, path: &Path) {
        if let Some(c) = self.cached.remove(path) {
            self.cached_bytes = self.cached_bytes.saturating_sub(c.bytes);
            let evict = blazesym::symbolize::evict::Evict::Elf(blazesym::symbolize::evict::Elf::new(path));
            if let Err(e) = self.symbolizer.evict(&evict) {
                // Best effort by blazesym's contract; the file is re-parsed
                // on demand either way.
                log::debug!("evicting {} from the symbolizer failed: {e}", path.display());
            }
            self.evicted += 1;
        }
    }

    /// Paths parsed now, for tests.
    #[cfg(test)]
    fn cached_paths(&self) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = self.cached.keys().cloned().collect();
        v.sort();
        v
    }
}

impl FileResolver for Blaze {
    fn files_evicted(&self) -> u64 {
        self.evicted
    }

    fn end_pass(&mut self) {
        let idle: Vec<std::path::PathBuf> = self
            .cached
            .iter_mut()
            .filter_map(|(p, c)| {
                c.idle = if std::mem::take(&mut c.looked_up) { 0 } else { c.idle + 1 };
                c.age += 1;
                (c.idle >= IDLE_PASSES || c.age >= MAX_PARSED_PASSES).then(|| p.clone())
            })
            .collect();
        for p in idle {
            self.evict(&p);
        }
        if self.release_pages && self.touched {
            match crate::process::residency::release_file_pages() {
                Ok(r) if r.busy => log::debug!("file pages kept this pass: a table build has a file mapped"),
                Ok(r) => {
                    self.touched = false;
                    log::debug!("released {} kB of file pages in {} mappings", r.bytes >> 10, r.ranges);
                }
                Err(e) => log::debug!("reading /proc/self/smaps failed: {e}"),
            }
        }
    }

    fn resolve(&mut self, path: &Path, offsets: &[u64]) -> Vec<Resolved> {
        self.clock += 1;
        self.touched = true;
        if let Some(c) = self.cached.get_mut(path) {
            c.looked_up = true;
            c.used = self.clock;
        } else {
            let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
            while !self.cached.is_empty()
                && (self.cached.len() >= MAX_CACHED_FILES || self.cached_bytes + bytes > MAX_CACHED_BYTES)
            {
                let Some(oldest) = self.cached.iter().min_by_key(|(_, c)| c.used).map(|(p, _)| p.clone()) else {
                    break;
                };
                self.evict(&oldest);
            }
            self.cached
                .insert(path.to_path_buf(), Cached { bytes, age: 0, idle: 0, looked_up: true, used: self.clock });
            self.cached_bytes += bytes;
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

    /// This test binary and the file offset of `a_function_to_find` in it.
    fn own_function() -> (std::path::PathBuf, u64) {
        let exe = std::env::current_exe().unwrap();
        let addr = a_function_to_find as *const () as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let m = crate::process::maps::parse_executable(&maps)
            .into_iter()
            .find(|m| m.start <= addr && addr < m.end)
            .expect("mapping of our own code");
        (exe, m.file_offset(addr))
    }

    #[test]
    fn resolves_a_function_of_this_test_binary_by_file_offset() {
        let (exe, offset) = own_function();
        let mut blaze = Blaze::default();
        let out = blaze.resolve(&exe, &[offset, u64::MAX - 1]);
        assert!(out[0].last().unwrap().name.ends_with("a_function_to_find"), "{:?}", out[0]);
        assert!(out[0].last().unwrap().file.as_deref().is_some_and(|f| f.ends_with("elf.rs")));
        assert!(out[1].is_empty());
    }

    #[test]
    fn files_idle_for_two_passes_are_evicted_and_resolve_again() {
        let (exe, offset) = own_function();
        let mut blaze = Blaze::default();
        let name = |b: &mut Blaze| b.resolve(&exe, &[offset])[0].last().map(|f| f.name.clone());
        assert!(name(&mut blaze).is_some_and(|n| n.ends_with("a_function_to_find")));
        blaze.end_pass();
        // Looked up in the second pass too: kept through one idle pass.
        assert!(name(&mut blaze).is_some());
        blaze.end_pass();
        blaze.end_pass();
        assert_eq!(blaze.cached_paths(), vec![exe.clone()]);
        assert_eq!(blaze.files_evicted(), 0);
        blaze.end_pass();
        assert!(blaze.cached_paths().is_empty(), "idle for {IDLE_PASSES} passes");
        assert_eq!(blaze.files_evicted(), 1);
        assert!(name(&mut blaze).is_some_and(|n| n.ends_with("a_function_to_find")), "parsed again on demand");
        assert_eq!(blaze.cached_paths(), vec![exe]);
    }

    #[test]
    fn busy_files_are_parsed_afresh_every_max_parsed_passes() {
        let (exe, offset) = own_function();
        let mut blaze = Blaze::default();
        for pass in 1..MAX_PARSED_PASSES {
            assert!(!blaze.resolve(&exe, &[offset])[0].is_empty(), "pass {pass}");
            blaze.end_pass();
            assert_eq!(blaze.cached_paths(), vec![exe.clone()], "kept after pass {pass}");
        }
        assert!(!blaze.resolve(&exe, &[offset])[0].is_empty());
        blaze.end_pass();
        assert!(blaze.cached_paths().is_empty(), "dropped after {MAX_PARSED_PASSES} passes though busy");
        assert_eq!(blaze.files_evicted(), 1);
        assert!(blaze.resolve(&exe, &[offset])[0].last().is_some_and(|f| f.name.ends_with("a_function_to_find")));
        blaze.end_pass();
        assert_eq!(blaze.cached_paths(), vec![exe], "parsed again, its age counting from zero");
    }
}
