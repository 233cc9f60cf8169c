//! CPython frames: finding interpreters in processes ([`detect`]), their
//! struct layouts per version ([`offsets`]), and naming the (code object,
//! instruction) pairs the kernel's walk emits ([`code`], [`lines`]).
//!
//! The kernel side is `profiler-ebpf/src/python.rs`; the encoding of a
//! Python frame among a stack's pcs is `profiler_common::python`.

pub mod code;
pub mod detect;
pub mod lines;
pub mod memory;
pub mod offsets;

use std::{
    num::NonZeroUsize,
    sync::{Mutex, OnceLock},
};

use crate::bounded::GrowingLru;

pub use code::{NamerStats, PyFrame};
use memory::{Memory, ProcessMemory};
use offsets::Layout;

/// Code objects cached across all processes.
const CODE_CACHE: usize = 16_384;
/// Processes whose layout is remembered.
const PROCESSES: usize = 1024;

/// Names Python frames of any process, finding each process's interpreter
/// on first sight.
pub struct Namer<M: Memory = ProcessMemory> {
    mem: M,
    detector: detect::Detector,
    layouts: GrowingLru<u32, Option<Layout>>,
    codes: code::CodeCache,
}

impl Default for Namer<ProcessMemory> {
    fn default() -> Self {
        Self::new(ProcessMemory)
    }
}

impl<M: Memory> Namer<M> {
    pub fn new(mem: M) -> Self {
        Self {
            mem,
            detector: detect::Detector::default(),
            layouts: GrowingLru::new(NonZeroUsize::new(PROCESSES).expect("non-zero")),
            codes: code::CodeCache::new(NonZeroUsize::new(CODE_CACHE).expect("non-zero")),
        }
    }

    pub fn stats(&self) -> NamerStats {
        self.codes.stats()
    }

    /// Tells the namer the layout of a process (tests; the agent finds it
    /// itself from `/proc`).
    pub fn set_layout(&mut self, pid: u32, layout: Option<Layout>) {
        self.layouts.put(pid, layout);
    }

    /// Caches the code objects of a stack's Python frames (see
    /// [`code::CodeCache::warm`]); one syscall per code object not cached.
    pub fn warm(&mut self, pid: u32, user_stack: &[u64]) {
        let mut frames = user_stack.iter().filter_map(|&e| profiler_common::python::decode_py_frame(e)).peekable();
        if frames.peek().is_none() {
            return;
        }
        let Some(layout) = self.layout(pid) else { return };
        for (code, _) in frames {
            self.codes.warm(&self.mem, &layout.code, pid, code);
        }
    }

    fn layout(&mut self, pid: u32) -> Option<Layout> {
        if !self.layouts.contains(&pid) {
            let layout = self.find_layout(pid);
            self.layouts.put(pid, layout);
        }
        *self.layouts.get(&pid)?
    }

    /// The frame running `code` at instruction `lasti` in `pid`; `None`
    /// when it cannot be named (never a guess).
    pub fn frame(&mut self, pid: u32, code: u64, lasti: u64) -> Option<PyFrame> {
        let layout = self.layout(pid)?;
        self.codes.frame(&self.mem, &layout.code, pid, code, lasti)
    }

    fn find_layout(&mut self, pid: u32) -> Option<Layout> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let maps = crate::process::maps::parse_executable(&maps);
        match self.detector.find(pid, &maps, &self.mem) {
            Ok(found) => found.map(|f| f.layout),
            Err(e) => {
                log::debug!("pid {pid}: {e}");
                None
            }
        }
    }
}

/// The agent's one namer: warmed by the sampling loop as samples arrive and
/// read by the symbolizer when a profile is written, which `record` and
/// `run` build apart; one bounded cache serves both.
pub fn shared() -> &'static Mutex<Namer> {
    static NAMER: OnceLock<Mutex<Namer>> = OnceLock::new();
    NAMER.get_or_init(|| Mutex::new(Namer::default()))
}
