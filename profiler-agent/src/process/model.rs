//! The process table's model: mapped files, mappings, what a process is
//! known as, the table's counters, and the lookups the symbolizer makes.

use std::{path::PathBuf, sync::Arc};

use super::{MapEntry, ProcessTable};
use crate::runtimes::JitHit;

/// Identity of a mapped file: the GNU build id when the ELF has one (stable
/// across hosts and containers), else device, inode and mtime.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileKey {
    BuildId(Vec<u8>),
    Inode { dev: u64, inode: u64, mtime: i64 },
}

/// A mapped file, shared by every process that maps it.
#[derive(Debug)]
pub struct ModuleInfo {
    /// Path as the process sees it.
    pub path: String,
    /// Path the agent can open (through `/proc/PID/root` for processes in
    /// other mount namespaces), when the file could be found.
    pub open_path: Option<PathBuf>,
    pub build_id: Option<Vec<u8>>,
    pub key: FileKey,
}

impl ModuleInfo {
    /// Build id as lowercase hex.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.as_ref().map(|b| {
            let mut hex = String::with_capacity(2 * b.len());
            for x in b {
                let _ = std::fmt::Write::write_fmt(&mut hex, format_args!("{x:02x}"));
            }
            hex
        })
    }

    /// Last path component, used in `module+0xOFFSET` names.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// One executable mapping with its module resolved.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub entry: MapEntry,
    /// `None` for anonymous or pseudo mappings (`[vdso]`, JIT code).
    pub module: Option<Arc<ModuleInfo>>,
}

/// A process as first seen.
#[derive(Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    /// comm of the thread-group leader.
    pub name: String,
    /// Target of `/proc/PID/exe`.
    pub exe_path: Option<String>,
    /// Container id from `/proc/PID/cgroup`.
    pub container_id: Option<String>,
    /// Kubernetes pod uid from `/proc/PID/cgroup`.
    pub pod_uid: Option<String>,
    /// Executable mappings, sorted by start address.
    pub mappings: Vec<Mapping>,
}

impl ProcessInfo {
    /// The mapping containing `addr`.
    pub fn mapping(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.entry.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.entry.end).then_some(m)
    }
}

/// Counters and gauges of the process table, reported in the summary and
/// metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Processes whose maps could not be read (they exited first).
    pub vanished: u64,
    /// Entries evicted because the table was full.
    pub evicted: u64,
    /// Modules evicted from the module table.
    pub modules_evicted: u64,
    /// Entries removed after their process exited and its samples were
    /// symbolized.
    pub exited_removed: u64,
    /// Images recorded at exec, and processes recorded at fork.
    pub execs: u64,
    pub forks: u64,
    /// Entries in the table now (gauge), and of those, processes that
    /// exited and wait for their last symbolization (gauge).
    pub entries: u64,
    pub exited_pending: u64,
}

/// A generation number meaning "the process's current image": for stacks
/// with no sample time (off-CPU aggregates) and callers that do not track
/// execs.
pub const LATEST_GENERATION: u32 = u32::MAX;

/// Process lookups as the symbolizer needs them; implemented by the table
/// itself and by a mutex around it, so a daemon's sampling thread and its
/// symbolizing thread can share one table.
pub trait ProcessLookup {
    /// See [`ProcessTable::observe`].
    fn observe(&mut self, pid: u32, fallback_name: &str) -> Arc<ProcessInfo>;
    /// See [`ProcessTable::refresh`].
    fn refresh(&mut self, pid: u32) -> Option<Arc<ProcessInfo>>;
    /// The JIT function at `pc`, from the process's perf map or jitdump.
    fn jit(&mut self, pid: u32, pc: u64) -> Option<JitHit>;
    /// The image `generation` of the process (see [`ProcessTable::observe_at`]).
    fn observe_generation(&mut self, pid: u32, generation: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        let _ = generation;
        self.observe(pid, fallback_name)
    }
    /// Re-reads the mappings if `generation` is the process's current image;
    /// `None` for an image an exec has replaced (re-reading would give the
    /// new image's mappings).
    fn refresh_generation(&mut self, pid: u32, generation: u32) -> Option<Arc<ProcessInfo>> {
        let _ = generation;
        self.refresh(pid)
    }
}

impl ProcessLookup for ProcessTable {
    fn observe(&mut self, pid: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        ProcessTable::observe(self, pid, fallback_name)
    }
    fn refresh(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        ProcessTable::refresh(self, pid)
    }
    fn jit(&mut self, pid: u32, pc: u64) -> Option<JitHit> {
        self.jit.lookup(pid, pc)
    }
    fn observe_generation(&mut self, pid: u32, generation: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        ProcessTable::observe_generation(self, pid, generation, fallback_name)
    }
    fn refresh_generation(&mut self, pid: u32, generation: u32) -> Option<Arc<ProcessInfo>> {
        ProcessTable::refresh_generation(self, pid, generation)
    }
}

impl ProcessLookup for &std::sync::Mutex<ProcessTable> {
    // A poisoned lock only means another thread panicked mid-update of a
    // cache; the table is still usable.
    fn observe(&mut self, pid: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        self.lock().unwrap_or_else(|e| e.into_inner()).observe(pid, fallback_name)
    }
    fn refresh(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        self.lock().unwrap_or_else(|e| e.into_inner()).refresh(pid)
    }
    fn jit(&mut self, pid: u32, pc: u64) -> Option<JitHit> {
        self.lock().unwrap_or_else(|e| e.into_inner()).jit.lookup(pid, pc)
    }
    fn observe_generation(&mut self, pid: u32, generation: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        self.lock().unwrap_or_else(|e| e.into_inner()).observe_generation(pid, generation, fallback_name)
    }
    fn refresh_generation(&mut self, pid: u32, generation: u32) -> Option<Arc<ProcessInfo>> {
        self.lock().unwrap_or_else(|e| e.into_inner()).refresh_generation(pid, generation)
    }
}
