//! Which tables are in the kernel, and which processes use them.
//!
//! One table per file (keyed by device and inode, or the vDSO), shared by
//! every process mapping the file, freed when the last such process exits.
//! The kernel's rows array is the memory budget: when a new table does not
//! fit, the tables least recently used by a sampled process are evicted
//! (their processes fall back to frame pointers there) and counted.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use profiler_common::{
    python::PyProcess,
    unwind::{Mapping, UnwindRow, ROWS_ANON},
};

use super::{
    alloc::{Allocator, Range},
    index::page_index,
    table::{Segment, TableError, UnwindTable},
};
use crate::{
    bpf::{BpfError, UnwindMaps},
    process::MapEntry,
    runtimes::python::detect::Unsupported,
};

/// Identity of a mapped file. Device and inode rather than the build id:
/// they are in `/proc/PID/maps` already, so a known file costs no read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileId {
    File { dev: u64, inode: u64 },
    Vdso,
}

impl FileId {
    /// The identity of an executable mapping; `None` for anonymous memory
    /// (JIT code), which has no table.
    pub fn of(m: &MapEntry) -> Option<Self> {
        if m.path == "[vdso]" {
            return Some(FileId::Vdso);
        }
        m.is_file()
            .then(|| FileId::File { dev: (u64::from(m.dev_major) << 32) | u64::from(m.dev_minor), inode: m.inode })
    }
}

/// Where tables come from: the real one reads files through `/proc`; tests
/// hand out prepared tables.
pub trait TableSource: Send {
    fn build(&mut self, tgid: u32, mapping: &MapEntry) -> Result<UnwindTable, TableError>;

    /// The CPython walk's record for a process with these executable
    /// mappings (runtimes/python), `None` when it runs no interpreter, an
    /// error when it runs one the walk does not support. Sources that read
    /// no files know none.
    fn python(&mut self, _tgid: u32, _mappings: &[MapEntry]) -> Result<Option<PyProcess>, Unsupported> {
        Ok(None)
    }

    /// Size in bytes of the mapped file, when cheaply known.
    fn file_size(&mut self, _tgid: u32, _mapping: &MapEntry) -> Option<u64> {
        None
    }
}

/// Files larger than this are not built by background loads: their tables
/// take seconds to build (64 ms per MB of CFI measured on a busy 2-CPU VM),
/// during which the table thread serves no process that needs one now.
/// They load when their process is seen.
pub const BACKGROUND_MAX_FILE: u64 = 8 << 20;

/// What a process looks like now: its executable mappings and its start
/// time (which tells a reused pid from the process it replaced).
pub trait ProcessReader: Send {
    /// `None` when the process is gone.
    fn read(&mut self, tgid: u32) -> Option<(u64, Vec<MapEntry>)>;
    /// The start time, `None` when gone (cheaper than `read`).
    fn start_time(&mut self, tgid: u32) -> Option<u64>;
}

/// Counters and gauges, for the summary and the agent's metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// Files with a table in the kernel.
    pub tables: u64,
    /// Rows in the kernel, and their bytes.
    pub rows: u64,
    pub table_bytes: u64,
    /// Size of the rows array (the budget).
    pub budget_bytes: u64,
    /// Processes with mappings in the kernel.
    pub processes: u64,
    /// Tables evicted to make room, since start.
    pub evicted: u64,
    /// Files whose table could not be built (no CFI, unreadable, malformed).
    pub build_errors: u64,
    /// Tables that did not fit the budget even after evicting every other
    /// table (their frames unwind by frame pointer).
    pub too_big: u64,
    /// Tables built, the CFI bytes they came from, and the time it took.
    pub built: u64,
    pub cfi_bytes_built: u64,
    pub build_time: Duration,
    /// Requests dropped because the table thread's queue was full.
    pub requests_dropped: u64,
    /// Processes whose CPython frames the kernel walks.
    pub python_processes: u64,
    /// Python processes left with native frames: an interpreter version
    /// or build the walk does not support (warned once per reason).
    pub python_unsupported: u64,
}

#[derive(Debug)]
struct Table {
    /// `None` when not in the kernel (no CFI, build failed, evicted, too big).
    rows: Option<Range>,
    /// Of `rows`, how many are table rows; the rest is the page index.
    table_rows: u32,
    base: u64,
    segments: Vec<Segment>,
    /// Processes mapping the file.
    users: u32,
    /// Tick of the last sample of one of those processes.
    last_used: u64,
}

#[derive(Debug)]
struct Process {
    start_time: u64,
    /// Executable mappings (sorted) and their files.
    mappings: Vec<(MapEntry, Option<FileId>)>,
    files: HashSet<FileId>,
    refreshed: Instant,
}

/// A process asks again for its mappings at most this often: a process
/// executing JIT code it has no mapping for would otherwise re-read maps
/// on every sample.
const REFRESH_INTERVAL: Duration = Duration::from_millis(250);

pub struct Registry<M, T, P> {
    maps: M,
    tables_from: T,
    procs_from: P,
    alloc: Allocator,
    tables: HashMap<FileId, Table>,
    processes: HashMap<u32, Process>,
    tick: u64,
    stats: UnwindStats,
    /// Processes with a CPython record in the kernel.
    python: HashSet<u32>,
    /// Processes found running an unsupported interpreter (counted once).
    python_unsupported: HashSet<u32>,
    /// Reasons already warned about, bounded.
    python_warned: HashSet<String>,
    /// Loading in the background: tables that do not fit are deferred
    /// rather than evicting others.
    no_evict: bool,
    /// Set when a table was deferred for that reason.
    deferred: bool,
}

/// Errors that stop the table thread (the kernel maps cannot be written).
#[derive(Debug, thiserror::Error)]
#[error("updating the unwinder's kernel maps failed: {0}")]
pub struct RegistryError(#[from] pub BpfError);

impl<M: UnwindMaps, T: TableSource, P: ProcessReader> Registry<M, T, P> {
    pub fn new(maps: M, tables_from: T, procs_from: P) -> Self {
        let capacity = maps.capacity();
        let stats = UnwindStats {
            budget_bytes: u64::from(capacity) * std::mem::size_of::<profiler_common::unwind::UnwindRow>() as u64,
            ..Default::default()
        };
        Self {
            maps,
            tables_from,
            procs_from,
            alloc: Allocator::new(capacity),
            tables: HashMap::new(),
            processes: HashMap::new(),
            tick: 0,
            stats,
            python: HashSet::new(),
            python_unsupported: HashSet::new(),
            python_warned: HashSet::new(),
            no_evict: false,
            deferred: false,
        }
    }

    /// Loads `tgid` (the off-CPU start scan) with the tables that fit in
    /// the free rows only: loading every process at the start must not
    /// evict the tables processes are using. Tables left out load, with
    /// eviction, when the process is next seen.
    pub fn load_without_evicting(&mut self, tgid: u32) -> Result<(), RegistryError> {
        if self.processes.contains_key(&tgid) {
            return Ok(());
        }
        self.no_evict = true;
        let r = self.load(tgid);
        self.no_evict = false;
        r?;
        // All or nothing: a process with a deferred table stays unknown to
        // the kernel, whose switch program then announces it when it blocks
        // (a known process with a file left out would unwind by frame
        // pointer there with no one asking for it).
        let deferred = self
            .processes
            .get(&tgid)
            .is_some_and(|p| p.files.iter().any(|f| self.tables.get(f).is_some_and(|t| t.rows.is_none())));
        if deferred {
            self.forget(tgid)?;
        }
        Ok(())
    }

    pub fn stats(&self) -> UnwindStats {
        let rows = u64::from(self.alloc.capacity()) - self.alloc.free_rows();
        UnwindStats {
            tables: self.tables.values().filter(|t| t.rows.is_some_and(|r| r.len > 0)).count() as u64,
            rows,
            table_bytes: rows * std::mem::size_of::<profiler_common::unwind::UnwindRow>() as u64,
            processes: self.processes.len() as u64,
            python_processes: self.python.len() as u64,
            ..self.stats.clone()
        }
    }

    /// A sample of `tgid` arrived: load the process on first sight, and
    /// mark its tables as recently used.
    pub fn seen(&mut self, tgid: u32) -> Result<(), RegistryError> {
        self.tick += 1;
        let Some(p) = self.processes.get(&tgid) else { return self.load(tgid) };
        if p.files.iter().any(|f| self.tables.get(f).is_some_and(|t| t.rows.is_none())) {
            return self.load(tgid); // some were deferred
        }
        let p = &self.processes[&tgid];
        for f in &p.files {
            if let Some(t) = self.tables.get_mut(f) {
                t.last_used = self.tick;
            }
        }
        Ok(())
    }

    /// The unwinder met a pc in no known mapping of `tgid` (a `dlopen`, an
    /// exec, or a process not loaded yet): read its mappings again.
    pub fn refresh(&mut self, tgid: u32) -> Result<(), RegistryError> {
        if let Some(p) = self.processes.get(&tgid) {
            if p.refreshed.elapsed() < REFRESH_INTERVAL {
                return Ok(());
            }
        }
        self.tick += 1;
        self.load(tgid)
    }

    /// `tgid` exec'd: its old mappings are gone from the kernel (the exec
    /// program dropped them); load the new image now, whatever the refresh
    /// rate limit says.
    pub fn exec(&mut self, tgid: u32) -> Result<(), RegistryError> {
        self.tick += 1;
        self.load(tgid)
    }

    /// `child` was forked from `parent` and maps what the parent maps:
    /// copy the parent's mappings without reading `/proc` (the child may
    /// exec or exit before a read would finish). An unknown parent is not
    /// loaded here: building its tables (a big test harness, a shell) held
    /// up the child's exec behind it; the child is loaded at its exec or
    /// first sample instead.
    pub fn fork(&mut self, child: u32, parent: u32) -> Result<(), RegistryError> {
        let Some(p) = self.processes.get(&parent) else { return Ok(()) };
        let Some(start_time) = self.procs_from.start_time(child) else { return Ok(()) };
        let (mappings, files) = (p.mappings.clone(), p.files.clone());
        self.forget(child)?; // a reused pid
        for f in &files {
            if let Some(t) = self.tables.get_mut(f) {
                t.users += 1;
            }
        }
        self.processes.insert(child, Process { start_time, mappings, files, refreshed: Instant::now() });
        self.write_process(child)
    }

    /// `tgid` exited: free its mappings now rather than at the next sweep
    /// (under churn of thousands of processes a second, a second's worth
    /// of dead processes would fill the mappings array).
    pub fn exited(&mut self, tgid: u32) -> Result<(), RegistryError> {
        self.forget(tgid)
    }

    /// Reads the process's mappings, builds the tables it lacks, and writes
    /// its mappings into the kernel.
    pub fn load(&mut self, tgid: u32) -> Result<(), RegistryError> {
        let Some((start_time, maps)) = self.procs_from.read(tgid) else {
            return self.forget(tgid);
        };
        if self.processes.get(&tgid).is_some_and(|p| p.start_time != start_time) {
            self.forget(tgid)?; // the pid was reused
        }
        let mappings: Vec<(MapEntry, Option<FileId>)> = maps
            .into_iter()
            .map(|m| {
                let id = FileId::of(&m);
                (m, id)
            })
            .collect();
        let files: HashSet<FileId> = mappings.iter().filter_map(|(_, f)| *f).collect();
        let old_files = self.processes.get(&tgid).map(|p| p.files.clone()).unwrap_or_default();
        // Take references before building, so eviction for this process's
        // own tables cannot pick its other tables.
        for f in files.difference(&old_files) {
            self.tables
                .entry(*f)
                .or_insert_with(|| Table {
                    rows: None,
                    table_rows: 0,
                    base: 0,
                    segments: Vec::new(),
                    users: 0,
                    last_used: 0,
                })
                .users += 1;
        }
        for f in &files {
            if let Some(t) = self.tables.get_mut(f) {
                t.last_used = self.tick;
            }
        }
        let mut built = HashSet::new();
        for (m, f) in &mappings {
            let Some(f) = f else { continue };
            // Not built yet: new, or deferred by a background load.
            if built.insert(*f) && self.tables.get(f).is_some_and(|t| t.rows.is_none()) {
                self.build(tgid, m, *f)?;
            }
        }
        for f in old_files.difference(&files) {
            self.release(*f);
        }
        let exec: Vec<MapEntry> = mappings.iter().map(|(m, _)| m.clone()).collect();
        let python = match self.tables_from.python(tgid, &exec) {
            Ok(p) => p,
            Err(e) => {
                if self.python_unsupported.insert(tgid) {
                    self.stats.python_unsupported += 1;
                }
                if self.python_warned.len() < 64 && self.python_warned.insert(e.to_string()) {
                    log::warn!("pid {tgid}: {e}");
                }
                None
            }
        };
        if python.is_some() {
            self.python.insert(tgid);
        } else {
            self.python.remove(&tgid);
        }
        self.maps.set_python(tgid, python.as_ref())?;
        self.processes.insert(tgid, Process { start_time, mappings, files, refreshed: Instant::now() });
        self.write_process(tgid)
    }

    /// Forgets processes that exited (or whose pid now names another
    /// process), freeing tables no one uses any more.
    pub fn sweep(&mut self) -> Result<(), RegistryError> {
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(tgid, p)| self.procs_from.start_time(**tgid) != Some(p.start_time))
            .map(|(tgid, _)| *tgid)
            .collect();
        for tgid in gone {
            self.forget(tgid)?;
        }
        Ok(())
    }

    fn forget(&mut self, tgid: u32) -> Result<(), RegistryError> {
        let Some(p) = self.processes.remove(&tgid) else { return Ok(()) };
        self.maps.remove_process(tgid)?;
        self.maps.set_python(tgid, None)?;
        self.python.remove(&tgid);
        self.python_unsupported.remove(&tgid);
        for f in p.files {
            self.release(f);
        }
        Ok(())
    }

    fn release(&mut self, f: FileId) {
        let Some(t) = self.tables.get_mut(&f) else { return };
        t.users = t.users.saturating_sub(1);
        if t.users == 0 {
            if let Some(r) = t.rows {
                self.alloc.free(r);
            }
            self.tables.remove(&f);
        }
    }

    fn build(&mut self, tgid: u32, m: &MapEntry, f: FileId) -> Result<(), RegistryError> {
        if self.no_evict && self.tables_from.file_size(tgid, m).is_some_and(|n| n > BACKGROUND_MAX_FILE) {
            return Ok(()); // deferred: built when the process is next seen
        }
        let started = Instant::now();
        let table = match self.tables_from.build(tgid, m) {
            Ok(t) => t,
            Err(e) => {
                log::debug!("no unwind table for {} (pid {tgid}): {e}", m.path);
                self.stats.build_errors += 1;
                // Keep an empty entry so the next process mapping the file
                // does not try again.
                if let Some(t) = self.tables.get_mut(&f) {
                    t.rows = Some(Range { start: 0, len: 0 });
                }
                return Ok(());
            }
        };
        self.stats.built += 1;
        self.stats.cfi_bytes_built += table.stats.cfi_bytes as u64;
        self.stats.build_time += started.elapsed();
        let index: Vec<UnwindRow> =
            page_index(&table.rows).into_iter().map(|row| UnwindRow { pc: row, ..Default::default() }).collect();
        let table_rows = u32::try_from(table.rows.len()).unwrap_or(u32::MAX);
        let len = table_rows.saturating_add(index.len() as u32);
        let Some(range) = self.allocate(len, f)? else {
            if std::mem::take(&mut self.deferred) {
                return Ok(()); // tried again when the process is next seen
            }
            log::debug!("unwind table of {} ({len} rows) does not fit the budget", m.path);
            self.stats.too_big += 1;
            // Not retried for other processes mapping the file.
            if let Some(t) = self.tables.get_mut(&f) {
                t.rows = Some(Range { start: 0, len: 0 });
            }
            return Ok(());
        };
        self.maps.write_rows(range.start, &table.rows)?;
        self.maps.write_rows(range.start + table_rows, &index)?;
        if let Some(t) = self.tables.get_mut(&f) {
            t.rows = Some(range);
            t.table_rows = table_rows;
            t.base = table.base;
            t.segments = table.exec_segments;
        }
        Ok(())
    }

    /// Rows for a new table of `f`, evicting the least recently used other
    /// tables when the array is full.
    fn allocate(&mut self, len: u32, f: FileId) -> Result<Option<Range>, RegistryError> {
        if len > self.alloc.capacity() {
            return Ok(None);
        }
        loop {
            if let Some(r) = self.alloc.alloc(len) {
                return Ok(Some(r));
            }
            if self.no_evict {
                self.deferred = true;
                return Ok(None);
            }
            let victim = self
                .tables
                .iter()
                .filter(|(id, t)| **id != f && t.rows.is_some_and(|r| r.len > 0))
                .min_by_key(|(_, t)| t.last_used)
                .map(|(id, _)| *id);
            let Some(victim) = victim else { return Ok(None) };
            self.evict(victim)?;
        }
    }

    fn evict(&mut self, f: FileId) -> Result<(), RegistryError> {
        let Some(t) = self.tables.get_mut(&f) else { return Ok(()) };
        let Some(r) = t.rows.take() else { return Ok(()) };
        self.alloc.free(r);
        // An evicted table stays out until its file is mapped anew; marking
        // it empty keeps a busy process from rebuilding it on every refresh.
        t.rows = Some(Range { start: 0, len: 0 });
        self.stats.evicted += 1;
        // Its processes must stop pointing into rows that will be reused.
        let users: Vec<u32> = self.processes.iter().filter(|(_, p)| p.files.contains(&f)).map(|(t, _)| *t).collect();
        for tgid in users {
            self.write_process(tgid)?;
        }
        Ok(())
    }

    fn write_process(&mut self, tgid: u32) -> Result<(), RegistryError> {
        let Some(p) = self.processes.get(&tgid) else { return Ok(()) };
        let mut out = Vec::with_capacity(p.mappings.len());
        for (m, f) in &p.mappings {
            let mut entry = Mapping { start: m.start, end: m.end, ..Default::default() };
            if f.is_none() && crate::runtimes::is_jit_candidate(m) {
                entry.rows_start = ROWS_ANON;
            }
            if let Some(t) = f.and_then(|f| self.tables.get(&f)) {
                if let (Some(r), Some(vaddr)) = (t.rows, vaddr_of(&t.segments, m.offset)) {
                    entry.rows_start = r.start;
                    entry.rows_len = t.table_rows.min(r.len);
                    entry.index_start = r.start + entry.rows_len;
                    entry.index_len = r.len - entry.rows_len;
                    // pc - bias = pc - (start - vaddr) - base: the row pc.
                    entry.bias = m.start.wrapping_sub(vaddr).wrapping_add(t.base);
                }
            }
            out.push(entry);
        }
        match self.maps.set_process(tgid, &out) {
            // Full: this process unwinds by frame pointer; others go on.
            Err(e @ BpfError::MappingsFull(_)) => {
                log::warn!("pid {tgid}: {e}");
                Ok(())
            }
            other => Ok(other?),
        }
    }
}

/// The ELF virtual address of a mapping's file offset, through the
/// executable segment it maps. The kernel maps whole pages, so the offset
/// can be up to a page below the segment's own.
fn vaddr_of(segments: &[Segment], offset: u64) -> Option<u64> {
    const PAGE: u64 = 4096;
    segments
        .iter()
        .find(|s| offset >= s.offset & !(PAGE - 1) && offset < s.offset + s.filesz.max(1))
        .map(|s| s.vaddr.wrapping_add(offset).wrapping_sub(s.offset))
}

#[cfg(test)]
mod tests;
