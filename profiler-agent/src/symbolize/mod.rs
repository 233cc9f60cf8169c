//! Aggregated address-level stacks -> the symbolized [`Profile`].
//!
//! User addresses are translated to (file, file offset) through the mappings
//! captured on first sight of each process, looked up in a bounded cache, and
//! the misses of each file resolved in one batch. Kernel addresses are looked
//! up in kallsyms. A pc in anonymous executable memory (JIT code) is named
//! from the process's perf map or jitdump, every pc of one function as one
//! frame. What cannot be resolved is named `module+0xOFFSET`, or
//! `[unknown]` without even a mapping, and counted.

pub mod cache;
pub mod elf;
pub mod kallsyms;

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroUsize,
    sync::Arc,
};

use crate::{
    aggregate::Aggregate,
    process::{ModuleInfo, ProcessLookup},
    profile::{Frame, FrameKind, JitRuntime, Module, ProcessMeta, Profile, ProfileBuilder, Sample},
    runtimes::{
        is_jit_candidate,
        python::{self, NamerStats},
        JitHit,
    },
};
use cache::{CacheStats, Resolved, SymbolCache};
use elf::FileResolver;
use kallsyms::KernelSymbols;
use profiler_common::python::decode_py_frame;

/// Frame counters across the agent's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolizeStats {
    /// Frames emitted (after inline expansion).
    pub frames: u64,
    /// Frames with no symbol (named `module+0x..` or `[unknown]`).
    pub unsymbolized: u64,
    /// Of those, frames without even a known mapping.
    pub unknown_mapping: u64,
    /// Frames named from a perf map or jitdump.
    pub jit: u64,
    /// Frames in anonymous executable memory (JIT code) no map named.
    pub jit_unnamed: u64,
}

/// Processes remembered in [`Symbolizer::jit_unnamed`].
const MAX_UNNAMED_PIDS: usize = 256;

/// Turns aggregates into profiles.
pub struct Symbolizer<R: FileResolver> {
    resolver: R,
    cache: SymbolCache,
    kernel: KernelSymbols,
    stats: SymbolizeStats,
    /// Unnamed JIT frames by process, for the summary's hints.
    jit_unnamed: BTreeMap<u32, u64>,
}

/// Where a user address points once translated.
enum Target {
    File {
        module: Arc<ModuleInfo>,
        offset: u64,
    },
    /// An executable mapping with no file behind it (`[vdso]`, JIT code).
    Anon {
        name: String,
        offset: u64,
        jit: bool,
    },
    /// JIT code named by the runtime; `pc` is the looked-up address.
    Jit {
        hit: JitHit,
        pc: u64,
    },
    Unknown,
}

impl<R: FileResolver> Symbolizer<R> {
    /// `cache_capacity` bounds the number of cached addresses.
    pub fn new(resolver: R, kernel: KernelSymbols, cache_capacity: NonZeroUsize) -> Self {
        Self {
            resolver,
            cache: SymbolCache::new(cache_capacity),
            kernel,
            stats: SymbolizeStats::default(),
            jit_unnamed: BTreeMap::new(),
        }
    }

    /// The Python code object cache's counters.
    pub fn python_stats(&self) -> NamerStats {
        python::shared().lock().unwrap_or_else(|e| e.into_inner()).stats()
    }

    pub fn stats(&self) -> SymbolizeStats {
        self.stats
    }

    /// Frames in JIT code that no perf map or jitdump named, by process
    /// (at most 256 processes).
    pub fn jit_unnamed(&self) -> &BTreeMap<u32, u64> {
        &self.jit_unnamed
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Addresses cached now.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    pub fn resolver(&self) -> &R {
        &self.resolver
    }

    pub fn resolver_mut(&mut self) -> &mut R {
        &mut self.resolver
    }

    /// Adds every stack of `agg` to `profile`, symbolized.
    pub fn symbolize(&mut self, agg: &Aggregate, procs: &mut impl ProcessLookup, profile: &mut Profile) {
        // Pass 1: translate every user address; collect cache misses per file.
        // Keyed by (pid, image generation, address): the same address means
        // different code before and after an exec.
        let mut targets: HashMap<(u32, u32, u64), Target> = HashMap::new();
        let mut refreshed: Vec<(u32, u32)> = Vec::new();
        for key in agg.stacks.keys() {
            for (i, &addr) in key.user.iter().enumerate() {
                if decode_py_frame(addr).is_some() {
                    continue; // named in pass 2
                }
                let lookup = lookup_addr(i, addr);
                if targets.contains_key(&(key.pid, key.generation, lookup)) {
                    continue;
                }
                let target =
                    self.translate(procs, &mut refreshed, (key.pid, key.generation), &key.thread_name(), lookup);
                targets.insert((key.pid, key.generation, lookup), target);
            }
        }
        let resolved = self.resolve_all(&targets);

        // Pass 2: build the samples.
        let mut b = ProfileBuilder::default();
        // Each (process, code object, instruction) is named once per pass.
        let mut python_frames: HashMap<(u32, u64), Frame> = HashMap::new();
        let mut file_frames: HashMap<(*const ModuleInfo, u64), Vec<usize>> = HashMap::new();
        let kernel_module = b.module(profile, Module { path: "[kernel.kallsyms]".into(), build_id: None });
        for (key, &value) in &agg.stacks {
            let process = procs.observe_generation(key.pid, key.generation, &key.thread_name());
            let mut frames = Vec::with_capacity(key.kernel.len() + key.user.len());
            let kernel: Vec<Frame> = key
                .kernel
                .iter()
                .enumerate()
                .map(|(i, &addr)| self.kernel_frame(lookup_addr(i, addr), kernel_module))
                .collect();
            for frame in without_bpf_glue(kernel) {
                frames.push(b.frame(profile, frame));
            }
            // CPython's `-X perf` trampolines name the Python function
            // that the interpreter frame read from the process names too:
            // where the stack has those, the trampolines are dropped, so
            // each function is there once and the stack is the same with
            // or without the flag (tests/tests/jit_python.rs). Unnamed ones
            // go too: 3.13's `-X perf_jit` buffers its jitdump records, so
            // its trampolines stay `[anon]` while the process runs, and a
            // CPython process has no other anonymous code worth a frame.
            let python_read = key.user.iter().any(|&a| decode_py_frame(a).is_some())
                && crate::runtimes::names::runtime_of(process.exe_path.as_deref(), &process.name)
                    == JitRuntime::CPython;
            for (i, &addr) in key.user.iter().enumerate() {
                if let Some((code, lasti)) = decode_py_frame(addr) {
                    let frame = python_frames
                        .entry((key.pid, addr))
                        .or_insert_with(|| self.python_frame(key.pid, code, lasti))
                        .clone();
                    self.stats.frames += 1;
                    self.stats.unsymbolized += u64::from(frame.unsymbolized);
                    frames.push(b.frame(profile, frame));
                    continue;
                }
                let lookup = lookup_addr(i, addr);
                let target = &targets[&(key.pid, key.generation, lookup)];
                if python_read && is_cpython_trampoline(target) {
                    continue;
                }
                // A file address names the same frames in every stack and
                // process: built once per pass, not per stack (formatting and
                // hashing them per stack was a third of the daemon's CPU at
                // 99 Hz system-wide, profiled with perf on 2 busy CPUs).
                if let Target::File { module, offset } = target {
                    let memo = (Arc::as_ptr(module), *offset);
                    if let Some(ids) = file_frames.get(&memo) {
                        self.stats.frames += ids.len() as u64;
                        self.stats.unsymbolized +=
                            ids.iter().filter(|&&i| profile.frames[i].unsymbolized).count() as u64;
                        frames.extend_from_slice(ids);
                        continue;
                    }
                    let ids: Vec<usize> = self
                        .user_frames(key.pid, target, &resolved, &mut b, profile)
                        .into_iter()
                        .map(|f| b.frame(profile, f))
                        .collect();
                    frames.extend_from_slice(&ids);
                    file_frames.insert(memo, ids);
                    continue;
                }
                for frame in self.user_frames(key.pid, target, &resolved, &mut b, profile) {
                    frames.push(b.frame(profile, frame));
                }
            }
            profile.processes.entry(key.pid).or_insert_with(|| ProcessMeta {
                pid: key.pid,
                name: process.name.clone(),
                exe_path: process.exe_path.clone(),
                container_id: process.container_id.clone(),
                pod_uid: process.pod_uid.clone(),
                pod: None,
            });
            profile.samples.push(Sample {
                pid: key.pid,
                tid: key.tid,
                process_name: process.name.clone(),
                thread_name: key.thread_name(),
                cpu: (key.cpu != crate::aggregate::NO_CPU).then_some(key.cpu),
                frames,
                value,
                labels: if key.still_blocked {
                    vec![(crate::profile::STILL_BLOCKED_LABEL.0.into(), crate::profile::STILL_BLOCKED_LABEL.1.into())]
                } else {
                    Vec::new()
                },
            });
        }
    }

    fn translate(
        &mut self,
        procs: &mut impl ProcessLookup,
        refreshed: &mut Vec<(u32, u32)>,
        (pid, generation): (u32, u32),
        name: &str,
        addr: u64,
    ) -> Target {
        let mut process = procs.observe_generation(pid, generation, name);
        if process.mapping(addr).is_none() && !refreshed.contains(&(pid, generation)) {
            // Mapped after first sight (dlopen): re-read once per pass; a
            // dead process, or an image an exec replaced, keeps what we had.
            refreshed.push((pid, generation));
            if let Some(p) = procs.refresh_generation(pid, generation) {
                process = p;
            }
        }
        match process.mapping(addr) {
            // memfd code (.NET's double mapping) is a file only in name.
            Some(m) if m.module.is_none() || m.entry.path.starts_with("/memfd:") => {
                let jit = is_jit_candidate(&m.entry);
                match jit.then(|| procs.jit(pid, addr)).flatten() {
                    Some(hit) => Target::Jit { hit, pc: addr },
                    None => match &m.module {
                        Some(module) => Target::File { module: module.clone(), offset: m.entry.file_offset(addr) },
                        None => Target::Anon { name: m.entry.path.clone(), offset: addr - m.entry.start, jit },
                    },
                }
            }
            Some(m) => {
                let module = m.module.clone().expect("matched above");
                Target::File { module, offset: m.entry.file_offset(addr) }
            }
            // JIT code mapped after the process was read may still be in
            // its map.
            None => match procs.jit(pid, addr) {
                Some(hit) => Target::Jit { hit, pc: addr },
                None => Target::Unknown,
            },
        }
    }

    /// Resolves every file target through the cache, batching misses per file.
    fn resolve_all(
        &mut self,
        targets: &HashMap<(u32, u32, u64), Target>,
    ) -> HashMap<(*const ModuleInfo, u64), Resolved> {
        let mut out = HashMap::new();
        let mut misses: HashMap<*const ModuleInfo, (Arc<ModuleInfo>, Vec<u64>)> = HashMap::new();
        for t in targets.values() {
            let Target::File { module, offset } = t else { continue };
            let id = (Arc::as_ptr(module), *offset);
            if out.contains_key(&id) || misses.get(&id.0).is_some_and(|(_, v)| v.contains(offset)) {
                continue;
            }
            match self.cache.get(&module.key, *offset) {
                Some(r) => {
                    out.insert(id, r);
                }
                None => misses.entry(id.0).or_insert_with(|| (module.clone(), Vec::new())).1.push(*offset),
            }
        }
        for (ptr, (module, offsets)) in misses {
            let results = match &module.open_path {
                Some(path) => self.resolver.resolve(path, &offsets),
                None => offsets.iter().map(|_| Resolved::from(Vec::new())).collect(),
            };
            for (offset, r) in offsets.into_iter().zip(results) {
                self.cache.insert(module.key.clone(), offset, r.clone());
                out.insert((ptr, offset), r);
            }
        }
        out
    }

    /// A CPython frame; one that cannot be read (the process exited, the
    /// code object is gone) is `[python]`, never a guessed name.
    fn python_frame(&mut self, pid: u32, code: u64, lasti: u64) -> Frame {
        let named = python::shared().lock().unwrap_or_else(|e| e.into_inner()).frame(pid, code, lasti);
        match named {
            Some(f) => Frame {
                function: f.name,
                file: Some(f.file),
                line: f.line,
                module: None,
                address: 0,
                kind: FrameKind::Python { start_line: f.first_line },
                unsymbolized: false,
            },
            None => Frame { kind: FrameKind::Python { start_line: 0 }, ..Frame::named("[python]", true) },
        }
    }

    fn kernel_frame(&mut self, addr: u64, module: usize) -> Frame {
        self.stats.frames += 1;
        let (function, unsymbolized) = match self.kernel.lookup(addr) {
            Some(name) => (name.to_owned(), false),
            None => {
                self.stats.unsymbolized += 1;
                (format!("[kernel.kallsyms]+0x{addr:x}"), true)
            }
        };
        Frame {
            function,
            file: None,
            line: None,
            module: Some(module),
            address: addr,
            kind: FrameKind::Kernel,
            unsymbolized,
        }
    }

    fn user_frames(
        &mut self,
        pid: u32,
        target: &Target,
        resolved: &HashMap<(*const ModuleInfo, u64), Resolved>,
        b: &mut ProfileBuilder,
        profile: &mut Profile,
    ) -> Vec<Frame> {
        let unknown = |function: String, module, address| Frame {
            function,
            file: None,
            line: None,
            module,
            address,
            kind: FrameKind::User,
            unsymbolized: true,
        };
        let frames = match target {
            Target::File { module, offset } => {
                let m = b.module(profile, Module { path: module.path.clone(), build_id: module.build_id_hex() });
                let syms = &resolved[&(Arc::as_ptr(module), *offset)];
                if syms.is_empty() {
                    vec![unknown(format!("{}+0x{offset:x}", module.file_name()), Some(m), *offset)]
                } else {
                    syms.iter()
                        .map(|s| Frame {
                            function: s.name.clone(),
                            file: s.file.clone(),
                            line: s.line,
                            module: Some(m),
                            address: *offset,
                            kind: if s.inlined { FrameKind::Inlined } else { FrameKind::User },
                            unsymbolized: false,
                        })
                        .collect()
                }
            }
            Target::Anon { name, offset, jit } => {
                if *jit {
                    self.stats.jit_unnamed += 1;
                    if self.jit_unnamed.len() < MAX_UNNAMED_PIDS || self.jit_unnamed.contains_key(&pid) {
                        *self.jit_unnamed.entry(pid).or_default() += 1;
                    }
                }
                let label = if name.is_empty() { "[anon]" } else { name.as_str() };
                vec![unknown(format!("{label}+0x{offset:x}"), None, *offset)]
            }
            Target::Jit { hit, pc } => {
                self.stats.jit += 1;
                let (file, line) = hit.symbol.line_at(pc - hit.start);
                // Keyed by the function's start, not the pc, so every pc of
                // the function is one frame.
                vec![Frame {
                    function: hit.symbol.name.clone(),
                    file: file.map(|f| f.to_string()),
                    line,
                    module: None,
                    address: hit.start,
                    kind: FrameKind::Jit(hit.runtime),
                    unsymbolized: false,
                }]
            }
            Target::Unknown => {
                self.stats.unknown_mapping += 1;
                vec![unknown("[unknown]".into(), None, 0)]
            }
        };
        self.stats.frames += frames.len() as u64;
        self.stats.unsymbolized += frames.iter().filter(|f| f.unsymbolized).count() as u64;
        frames
    }
}

/// A frame of a CPython process in one of its perf trampolines: named
/// from its perf map (`py::qualname:file`), or anonymous JIT code.
fn is_cpython_trampoline(target: &Target) -> bool {
    match target {
        Target::Jit { hit, .. } => hit.runtime == JitRuntime::CPython && hit.symbol.name.starts_with("py::"),
        Target::Anon { jit, .. } => *jit,
        _ => false,
    }
}

/// Stacks captured from a tracepoint begin inside the profiler's own
/// program and the glue that ran it (`bpf_trace_runN`, and
/// `__traceiter_<tracepoint>` when several probes share the tracepoint),
/// which are not the profiled code's time. The program itself may be
/// unloaded by the time its address is symbolized, so everything up to the
/// outermost glue frame is dropped.
fn without_bpf_glue(mut frames: Vec<Frame>) -> Vec<Frame> {
    let is_glue = |f: &Frame| {
        let n = f.function.as_str();
        n.starts_with("bpf_trace_run") || n.starts_with("__bpf_trace_") || n.starts_with("__traceiter_")
    };
    if let Some(i) = frames.iter().take(6).rposition(is_glue) {
        frames.drain(..=i);
    } else {
        let own = frames.iter().take_while(|f| f.function.starts_with("bpf_prog_")).count();
        frames.drain(..own);
    }
    frames
}

/// Return addresses point after the call; step back one byte so the lookup
/// lands in the calling instruction (and in the right function and inline
/// scope when the call is a function's last instruction). Index 0 is the
/// sampled instruction pointer itself.
fn lookup_addr(index: usize, addr: u64) -> u64 {
    if index == 0 {
        addr
    } else {
        addr.saturating_sub(1)
    }
}

#[cfg(test)]
mod tests;
