//! Names for JIT-compiled code, from the files the runtimes write for
//! profilers: perf maps (`/tmp/perf-<pid>.map`) and jitdump files
//! (`jit-<pid>.dump`).
//!
//! Both are read inside the process's mount namespace, under the pid the
//! process sees (a containerized process writes `/tmp/perf-1.map` into its
//! own `/tmp`), incrementally as they grow, into one interval table per
//! process. Tables are bounded per process (oldest entries evicted) and in
//! total (least recently used processes evicted), and every eviction is
//! counted.
//!
//! CPython's interpreted frames (`python`) are named from the interpreter's
//! own code objects instead, read from the process's memory.

pub mod jitdump;
pub mod names;
pub mod perfmap;
pub mod python;
pub mod table;

use std::{
    fs, io,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::bounded::GrowingLru;

use crate::{
    process::{MapEntry, ProcessInfo},
    profile::JitRuntime,
};
use jitdump::JitDumpFile;
use perfmap::PerfMapFile;
pub use table::{JitSymbol, JitTable};

/// A pc resolved to a JIT function.
#[derive(Clone, Debug)]
pub struct JitHit {
    /// Start address of the function (all pcs in it share this).
    pub start: u64,
    pub symbol: Arc<JitSymbol>,
    pub runtime: JitRuntime,
}

/// Memory bounds of the JIT tables.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Per process: a V8 service with 150k compiled functions is ~16 MiB.
    pub per_process_bytes: usize,
    pub total_bytes: usize,
    /// Processes with a table.
    pub processes: NonZeroUsize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_process_bytes: 32 << 20,
            total_bytes: 256 << 20,
            processes: NonZeroUsize::new(4096).expect("non-zero"),
        }
    }
}

/// Counters for the summary and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Processes with JIT code (anonymous executable memory or a jitdump).
    pub processes: u64,
    /// Of those, processes with a perf map or jitdump read.
    pub with_map: u64,
    /// Functions and approximate bytes in the tables now.
    pub entries: u64,
    pub bytes: u64,
    /// Perf map lines and jitdump records read, and those skipped as malformed.
    pub lines: u64,
    pub records: u64,
    pub malformed_lines: u64,
    pub malformed_records: u64,
    /// jitdump files abandoned because they cannot be framed.
    pub broken_dumps: u64,
    /// Entries evicted by the per-process bound, processes by the total bound.
    pub entries_evicted: u64,
    pub processes_evicted: u64,
    /// Reads that failed for a reason other than the file not existing.
    pub read_errors: u64,
}

/// How often a process's files are checked for growth. Appends between
/// checks are picked up by the next one, before its frames are named.
const REFRESH: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct ProcessJit {
    runtime: JitRuntime,
    /// `None` until the pid the process sees is known.
    perf_map: Option<PerfMapFile>,
    dumps: Vec<JitDumpFile>,
    table: JitTable,
    checked: Option<Instant>,
    found: bool,
}

/// The JIT tables of every process with JIT code.
pub struct Runtimes {
    proc_root: PathBuf,
    limits: Limits,
    procs: GrowingLru<u32, ProcessJit>,
    total_bytes: usize,
    stats: RuntimeStats,
}

impl Runtimes {
    pub fn new(proc_root: impl Into<PathBuf>, limits: Limits) -> Self {
        Self {
            proc_root: proc_root.into(),
            procs: GrowingLru::new(limits.processes),
            limits,
            total_bytes: 0,
            stats: RuntimeStats::default(),
        }
    }

    pub fn stats(&self) -> RuntimeStats {
        RuntimeStats {
            processes: self.procs.len() as u64,
            with_map: self.procs.iter().filter(|(_, p)| p.found).count() as u64,
            entries: self.procs.iter().map(|(_, p)| p.table.len() as u64).sum(),
            bytes: self.total_bytes as u64,
            ..self.stats
        }
    }

    /// The process's runtime and whether a perf map or jitdump was found,
    /// if it has JIT code.
    pub fn status(&self, pid: u32) -> Option<(JitRuntime, bool)> {
        self.procs.peek(&pid).map(|p| (p.runtime, p.found))
    }

    /// Notes a process as (re)read from `/proc`: if it has JIT code, its
    /// files are found and read now, while the process still exists.
    pub fn observe(&mut self, info: &ProcessInfo) {
        let dumps: Vec<PathBuf> =
            info.mappings.iter().filter_map(|m| jitdump_path(&self.proc_root, info.pid, m)).collect();
        let jit = !dumps.is_empty() || info.mappings.iter().any(|m| m.module.is_none() && is_jit_candidate(&m.entry));
        if !jit && !self.procs.contains(&info.pid) {
            return;
        }
        let runtime = names::runtime_of(info.exe_path.as_deref(), &info.name);
        let entry = self.entry(info.pid, runtime);
        for path in dumps {
            if !entry.dumps.iter().any(|d| d.path() == path) {
                entry.dumps.push(JitDumpFile::new(path));
            }
        }
        self.refresh(info.pid, true);
    }

    /// A sample of `pid` arrived: re-reads its files if they are due.
    pub fn tick(&mut self, pid: u32) {
        if self.procs.peek(&pid).is_some_and(|p| p.checked.is_none_or(|t| t.elapsed() >= REFRESH)) {
            self.refresh(pid, false);
        }
    }

    /// The JIT function containing `pc` in process `pid`.
    pub fn lookup(&mut self, pid: u32, pc: u64) -> Option<JitHit> {
        self.tick(pid);
        let p = self.procs.get(&pid)?;
        let (start, symbol) = p.table.lookup(pc)?;
        Some(JitHit { start, symbol: symbol.clone(), runtime: p.runtime })
    }

    fn entry(&mut self, pid: u32, runtime: JitRuntime) -> &mut ProcessJit {
        if !self.procs.contains(&pid) {
            let new = ProcessJit {
                runtime,
                perf_map: None,
                dumps: Vec::new(),
                table: JitTable::default(),
                checked: None,
                found: false,
            };
            if let Some((old_pid, old)) = self.procs.push(pid, new) {
                if old_pid != pid {
                    self.total_bytes -= old.table.bytes();
                    self.stats.processes_evicted += 1;
                }
            }
        }
        self.procs.get_mut(&pid).expect("just inserted")
    }

    fn refresh(&mut self, pid: u32, force: bool) {
        let proc_root = self.proc_root.clone();
        let limits = self.limits;
        let Some(p) = self.procs.get_mut(&pid) else { return };
        if !force && p.checked.is_some_and(|t| t.elapsed() < REFRESH) {
            return;
        }
        p.checked = Some(Instant::now());
        let before = p.table.bytes();
        if p.perf_map.is_none() {
            // Unknown once the process is gone: keep what was read.
            if let Some(ns_pid) = ns_pid(&proc_root, pid) {
                let path = proc_root.join(pid.to_string()).join("root/tmp").join(format!("perf-{ns_pid}.map"));
                p.perf_map = Some(PerfMapFile::new(path));
            }
        }
        let mut errors = 0;
        if let Some(map) = &mut p.perf_map {
            match map.read_new(&mut p.table) {
                Ok(o) => {
                    p.found = true;
                    self.stats.lines += o.lines;
                    self.stats.malformed_lines += o.malformed;
                }
                Err(e) => errors += u64::from(counts_as_error(&e)),
            }
        }
        for d in &mut p.dumps {
            let was_broken = d.broken().is_some();
            match d.read_new(&mut p.table) {
                Ok(o) => {
                    p.found = true;
                    self.stats.records += o.loads + o.moves + o.debug_infos;
                    self.stats.malformed_records += o.malformed;
                }
                Err(e) => errors += u64::from(counts_as_error(&e)),
            }
            if !was_broken {
                if let Some(e) = d.broken() {
                    log::debug!("pid {pid}: {}: {e}", d.path().display());
                    self.stats.broken_dumps += 1;
                }
            }
        }
        self.stats.read_errors += errors;
        if p.table.bytes() > limits.per_process_bytes {
            self.stats.entries_evicted += p.table.evict_to(limits.per_process_bytes / 4 * 3);
        }
        // The total includes `before`, so this cannot underflow.
        self.total_bytes = self.total_bytes - before + p.table.bytes();
        self.enforce_total(pid);
    }

    /// Evicts the least recently used processes (not `keep`) until the
    /// tables fit the total bound.
    fn enforce_total(&mut self, keep: u32) {
        while self.total_bytes > self.limits.total_bytes {
            let Some((&victim, _)) = self.procs.iter().rev().find(|(&pid, p)| pid != keep && !p.table.is_empty())
            else {
                break;
            };
            if let Some(p) = self.procs.pop(&victim) {
                self.total_bytes -= p.table.bytes();
                self.stats.processes_evicted += 1;
            }
        }
    }
}

fn counts_as_error(e: &io::Error) -> bool {
    // No map (the runtime was not asked for one) or a process that exited
    // are normal.
    !matches!(e.kind(), io::ErrorKind::NotFound) && e.raw_os_error() != Some(libc::ESRCH)
}

/// Anonymous executable memory that may hold JIT code: no file, not one of
/// the kernel's pseudo mappings (`[vdso]`, `[vsyscall]`, `[uprobes]`).
pub fn is_jit_candidate(m: &MapEntry) -> bool {
    m.executable && (m.path.is_empty() || m.path.starts_with("[anon") || m.path.starts_with("/memfd:"))
}

/// The path to read a jitdump mapped by the process, if `m` is one.
fn jitdump_path(proc_root: &Path, pid: u32, m: &crate::process::Mapping) -> Option<PathBuf> {
    let name = m.entry.path.rsplit('/').next()?;
    let digits = name.strip_prefix("jit-")?.strip_suffix(".dump")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match m.module.as_ref().and_then(|module| module.open_path.clone()) {
        Some(p) => Some(p),
        None => Some(proc_root.join(pid.to_string()).join("root").join(m.entry.path.trim_start_matches('/'))),
    }
}

/// The pid the process sees itself as: the last `NStgid` field of its
/// status (the innermost pid namespace).
fn ns_pid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    parse_ns_pid(&status)
}

pub fn parse_ns_pid(status: &str) -> Option<u32> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("NStgid:"))
        .or_else(|| status.lines().find_map(|l| l.strip_prefix("NSpid:")))?;
    line.split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests;
