//! What the agent knows about the processes it profiles: name and
//! executable mappings, read from `/proc` on first sight so a process that
//! exits before its samples are symbolized still gets its frames.

pub mod maps;
pub mod residency;

pub use crate::metadata::cgroup;

use std::{
    fs,
    num::NonZeroUsize,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use crate::bounded::GrowingLru;

use crate::runtimes::{Limits as JitLimits, Runtimes};
pub use maps::MapEntry;

mod model;
pub use model::{FileKey, Mapping, ModuleInfo, ProcessInfo, ProcessLookup, ProcessStats, LATEST_GENERATION};

/// Images kept per process: samples of an image older than these are
/// symbolized against the oldest one kept. A process that execs in a loop
/// (a shell `exec` chain) cannot grow its entry without bound.
const MAX_GENERATIONS: usize = 4;

/// One image of a process, from an exec (or first sight) to the next exec.
#[derive(Debug)]
struct Generation {
    /// `bpf_ktime_get_ns()` of the exec that started it; 0 for the image a
    /// process had when first seen.
    since_ns: u64,
    info: Arc<ProcessInfo>,
}

/// A process: its images, oldest first, and whether it has exited.
#[derive(Debug)]
struct Entry {
    /// Generation number of `images[0]`.
    first: u32,
    images: Vec<Generation>,
    /// Kernel time of the exit, and when the agent learnt of it.
    exited: Option<(u64, Instant)>,
    /// An on-CPU sample of the process was added to an aggregate, so the
    /// entry must outlive the exit until that aggregate is symbolized.
    sampled: bool,
}

impl Entry {
    fn new(info: Arc<ProcessInfo>) -> Self {
        Entry { first: 0, images: vec![Generation { since_ns: 0, info }], exited: None, sampled: false }
    }

    fn latest(&self) -> &Arc<ProcessInfo> {
        &self.images[self.images.len() - 1].info
    }

    fn latest_generation(&self) -> u32 {
        self.first + self.images.len() as u32 - 1
    }

    fn generation(&self, generation: u32) -> &Arc<ProcessInfo> {
        let i = generation.saturating_sub(self.first) as usize;
        &self.images[i.min(self.images.len() - 1)].info
    }

    /// The generation running at kernel time `t`.
    fn at(&self, t: u64) -> u32 {
        let i = self.images.partition_point(|g| g.since_ns <= t);
        self.first + i.saturating_sub(1) as u32
    }

    fn push(&mut self, since_ns: u64, info: Arc<ProcessInfo>) {
        if self.images.len() >= MAX_GENERATIONS {
            self.images.remove(0);
            self.first += 1;
        }
        self.images.push(Generation { since_ns, info });
    }
}

/// What `/proc/PID` said about a process, read without holding the table
/// (reads are the slow part, and the sampling thread shares the table).
#[derive(Debug, Default)]
pub struct ProcRead {
    pub pid: u32,
    pub name: Option<String>,
    pub exe_path: Option<String>,
    pub cgroup: Option<String>,
    /// `None` when the process was already gone.
    pub maps: Option<String>,
}

impl ProcRead {
    /// Reads `proc_root/PID`'s comm, exe, cgroup and maps.
    pub fn read(proc_root: &Path, pid: u32) -> Self {
        let dir = proc_root.join(pid.to_string());
        ProcRead {
            pid,
            name: fs::read_to_string(dir.join("comm")).ok().map(|s| s.trim_end_matches('\n').to_owned()),
            exe_path: exe_path(&dir),
            cgroup: fs::read_to_string(dir.join("cgroup")).ok(),
            maps: fs::read_to_string(dir.join("maps")).ok(),
        }
    }
}

/// Bounded table of processes and the modules they map.
///
/// Processes enter on first sight (a sample) or from lifecycle events
/// (fork, exec), which capture the mappings while the process is alive.
/// Each exec starts a new generation, so samples taken before it are
/// symbolized against the old image. Exited processes stay until
/// [`sweep_exited`](Self::sweep_exited) once their samples are symbolized;
/// the LRU bound applies to everything else.
pub struct ProcessTable {
    proc_root: PathBuf,
    processes: GrowingLru<u32, Entry>,
    modules: GrowingLru<(u64, u64), Arc<ModuleInfo>>,
    /// Processes found gone, until the next sweep of exited processes.
    gone: GrowingLru<u32, Arc<ProcessInfo>>,
    stats: ProcessStats,
    /// Perf maps and jitdumps of the processes with JIT code, read on first
    /// sight (the process may be gone when its frames are named) and as
    /// they grow.
    pub jit: Runtimes,
}

/// Gone processes remembered between sweeps.
const GONE_REMEMBERED: usize = 1024;

impl ProcessTable {
    /// A table reading from `proc_root` (normally `/proc`), holding at most
    /// `capacity` processes (least recently seen evicted first) and four times
    /// as many modules.
    pub fn new(proc_root: impl Into<PathBuf>, capacity: NonZeroUsize) -> Self {
        let modules = NonZeroUsize::new(capacity.get().saturating_mul(4)).unwrap_or(capacity);
        let proc_root = proc_root.into();
        Self {
            jit: Runtimes::new(proc_root.clone(), JitLimits::default()),
            proc_root,
            processes: GrowingLru::new(capacity),
            modules: GrowingLru::new(modules),
            gone: GrowingLru::new(NonZeroUsize::new(GONE_REMEMBERED).expect("non-zero")),
            stats: ProcessStats::default(),
        }
    }

    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    pub fn stats(&self) -> ProcessStats {
        ProcessStats {
            entries: self.processes.len() as u64,
            exited_pending: self.processes.iter().filter(|(_, e)| e.exited.is_some()).count() as u64,
            ..self.stats
        }
    }

    /// Number of processes in the table.
    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    /// The process's current image, reading `/proc` on first sight.
    /// `fallback_name` (the sample's thread name) is used when the process
    /// is already gone.
    pub fn observe(&mut self, pid: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        if let Some(e) = self.processes.get(&pid) {
            self.jit.tick(pid);
            return e.latest().clone();
        }
        if let Some(info) = self.gone.get(&pid) {
            return info.clone();
        }
        let read = ProcRead::read(&self.proc_root, pid);
        let alive = read.maps.is_some();
        let info = Arc::new(self.info_from(read, fallback_name, None));
        self.jit.observe(&info);
        if alive {
            self.insert(pid, Entry::new(info.clone()));
        } else {
            // Gone before first sight (or swept after its exit, and asked
            // for by late off-CPU data): remembered apart, until the next
            // sweep, so it neither re-reads /proc for every stack nor
            // lingers in the table as a live process.
            self.gone.put(pid, info.clone());
        }
        info
    }

    /// Records a sample of `pid` taken at kernel time `time_ns` and returns
    /// the generation (image) it belongs to, for [`observe_generation`](Self::observe_generation).
    /// A sample after the recorded exit of `pid` belongs to a new process
    /// that reused the pid.
    pub fn observe_at(&mut self, pid: u32, time_ns: u64, fallback_name: &str) -> u32 {
        if let Some(e) = self.processes.get_mut(&pid) {
            match e.exited {
                Some((exit_ns, _)) if time_ns > exit_ns => {}
                _ => {
                    e.sampled = true;
                    return e.at(time_ns);
                }
            }
            self.processes.pop(&pid);
        }
        self.observe(pid, fallback_name);
        if let Some(e) = self.processes.peek_mut(&pid) {
            e.sampled = true;
        }
        0
    }

    /// Image `generation` of the process (the oldest kept when that one is
    /// gone, the current one for [`LATEST_GENERATION`]).
    pub fn observe_generation(&mut self, pid: u32, generation: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        match self.processes.get(&pid) {
            Some(e) => e.generation(generation).clone(),
            None => self.observe(pid, fallback_name),
        }
    }

    /// Re-reads a process's mappings, e.g. after an address fell outside all
    /// known ones (dlopen, exec). Keeps the old entry if the process is gone.
    pub fn refresh(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        let e = self.processes.peek(&pid)?;
        if e.exited.is_some() {
            return None;
        }
        let old = e.latest().clone();
        let read = ProcRead::read(&self.proc_root, pid);
        read.maps.as_ref()?;
        // An exec also changes the name: a child seen between fork and exec
        // was first recorded under its parent's name.
        let info = Arc::new(self.info_from(read, &old.name, Some(&old)));
        self.jit.observe(&info);
        let e = self.processes.get_mut(&pid)?;
        let last = e.images.len() - 1;
        e.images[last].info = info.clone();
        Some(info)
    }

    /// [`refresh`](Self::refresh), only if `generation` is the current image.
    pub fn refresh_generation(&mut self, pid: u32, generation: u32) -> Option<Arc<ProcessInfo>> {
        let e = self.processes.peek(&pid)?;
        if generation != LATEST_GENERATION && generation != e.latest_generation() {
            return None;
        }
        self.refresh(pid)
    }

    /// A process already in the table (its current image), without reading
    /// `/proc`.
    pub fn get(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        self.processes.get(&pid).map(|e| e.latest().clone())
    }

    /// `pid` replaced its image at kernel time `time_ns`; `read` is its
    /// `/proc` entry read after the exec. A pid not in the table (or
    /// exited: reused) starts with this image.
    pub fn exec(&mut self, pid: u32, time_ns: u64, comm: &str, read: ProcRead) {
        self.stats.execs += 1;
        let live = self.processes.peek(&pid).is_some_and(|e| e.exited.is_none());
        let info = Arc::new(self.info_from(read, comm, None));
        // A new image may be a JIT runtime (node, java) with a perf map.
        self.jit.observe(&info);
        if live {
            if let Some(e) = self.processes.get_mut(&pid) {
                e.push(time_ns, info);
            }
        } else {
            self.processes.pop(&pid);
            let mut e = Entry::new(info);
            e.images[0].since_ns = 0;
            self.insert(pid, e);
        }
    }

    /// `child` was forked from `parent`: it runs the parent's image (read
    /// from `/proc` if the parent is not known yet) until it execs.
    pub fn fork(&mut self, child: u32, parent: u32) {
        self.stats.forks += 1;
        let from = self.observe(parent, "");
        let info = Arc::new(ProcessInfo {
            pid: child,
            name: from.name.clone(),
            exe_path: from.exe_path.clone(),
            container_id: from.container_id.clone(),
            pod_uid: from.pod_uid.clone(),
            mappings: from.mappings.clone(),
        });
        self.processes.pop(&child);
        self.insert(child, Entry::new(info));
    }

    /// `pid` exited at kernel time `time_ns`. Its entry stays for the
    /// samples still to be symbolized.
    pub fn exit(&mut self, pid: u32, time_ns: u64) {
        if let Some(e) = self.processes.peek_mut(&pid) {
            e.exited.get_or_insert((time_ns, Instant::now()));
        }
    }

    /// Removes processes that exited before `cutoff`: call it once every
    /// sample taken before `cutoff` has been symbolized. Returns how many.
    pub fn sweep_exited(&mut self, cutoff: Instant) -> usize {
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, e)| e.exited.is_some_and(|(_, at)| at < cutoff))
            .map(|(p, _)| *p)
            .collect();
        for pid in &gone {
            self.processes.pop(pid);
        }
        self.stats.exited_removed += gone.len() as u64;
        // A pid found gone may name a new process by now.
        self.gone.clear();
        // Modules no process maps any more are only held by this cache:
        // drop them with their processes so churn of distinct binaries
        // does not keep their paths and build ids.
        if !gone.is_empty() {
            self.modules.retain_referenced();
        }
        gone.len()
    }

    /// Removes processes that exited before `cutoff` without a single
    /// on-CPU sample: nothing waits to be symbolized against them. Under
    /// churn (thousands of processes a second, most living a millisecond)
    /// this keeps the table at about a second's worth of exits instead of
    /// an export interval's. Call it once samples taken before `cutoff`
    /// have surely been drained (a poll period).
    pub fn sweep_unsampled(&mut self, cutoff: Instant) -> usize {
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, e)| !e.sampled && e.exited.is_some_and(|(_, at)| at < cutoff))
            .map(|(p, _)| *p)
            .collect();
        for pid in &gone {
            self.processes.pop(pid);
        }
        self.stats.exited_removed += gone.len() as u64;
        self.gone.clear();
        gone.len()
    }

    fn insert(&mut self, pid: u32, e: Entry) {
        if let Some((old, _)) = self.processes.push(pid, e) {
            if old != pid {
                self.stats.evicted += 1;
            }
        }
    }

    fn info_from(&mut self, read: ProcRead, fallback_name: &str, old: Option<&ProcessInfo>) -> ProcessInfo {
        let pid = read.pid;
        let mappings = match &read.maps {
            Some(text) => self.mappings(pid, text),
            None => {
                self.stats.vanished += 1;
                Vec::new()
            }
        };
        let cgroup = read.cgroup.as_deref().map(cgroup::CgroupInfo::parse).unwrap_or_default();
        let container_id = cgroup.container_id.or_else(|| old.and_then(|o| o.container_id.clone()));
        let pod_uid = cgroup.pod_uid.or_else(|| old.and_then(|o| o.pod_uid.clone()));
        ProcessInfo {
            pid,
            name: read.name.unwrap_or_else(|| fallback_name.to_owned()),
            exe_path: read.exe_path.or_else(|| old.and_then(|o| o.exe_path.clone())),
            container_id,
            pod_uid,
            mappings,
        }
    }

    fn mappings(&mut self, pid: u32, maps_text: &str) -> Vec<Mapping> {
        maps::parse_executable(maps_text)
            .into_iter()
            .map(|entry| {
                let module = entry.is_file().then(|| self.module(pid, &entry));
                Mapping { entry, module }
            })
            .collect()
    }

    fn module(&mut self, pid: u32, entry: &MapEntry) -> Arc<ModuleInfo> {
        let dev = (u64::from(entry.dev_major) << 32) | u64::from(entry.dev_minor);
        let id = (dev, entry.inode);
        if let Some(m) = self.modules.get(&id) {
            return m.clone();
        }
        let open_path = self.open_path(pid, entry);
        let build_id = open_path
            .as_deref()
            .and_then(|p| {
                // blazesym maps the file to read its notes.
                let _mapping = residency::MAPPING.read().unwrap_or_else(|e| e.into_inner());
                blazesym::helper::read_elf_build_id(p).ok().flatten()
            })
            .map(|b| b.into_owned());
        let mtime = open_path.as_deref().and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.mtime());
        let key = match &build_id {
            Some(b) => FileKey::BuildId(b.clone()),
            None => FileKey::Inode { dev, inode: entry.inode, mtime },
        };
        let module = Arc::new(ModuleInfo { path: entry.path.clone(), open_path, build_id, key });
        if let Some((old, _)) = self.modules.push(id, module.clone()) {
            if old != id {
                self.stats.modules_evicted += 1;
            }
        }
        module
    }

    /// Prefer the host path when it is the very file mapped (same inode), so
    /// symbolization keeps working after the process exits; otherwise go
    /// through the process's root (containers).
    fn open_path(&self, pid: u32, entry: &MapEntry) -> Option<PathBuf> {
        if entry.deleted {
            return None;
        }
        let host = Path::new(&entry.path);
        if fs::metadata(host).is_ok_and(|m| m.ino() == entry.inode) {
            return Some(host.to_path_buf());
        }
        let via_root = self.proc_root.join(pid.to_string()).join("root").join(entry.path.trim_start_matches('/'));
        via_root.exists().then_some(via_root)
    }
}

/// Dropping cache entries nothing else references.
trait RetainReferenced {
    fn retain_referenced(&mut self);
}

impl RetainReferenced for GrowingLru<(u64, u64), Arc<ModuleInfo>> {
    fn retain_referenced(&mut self) {
        let unused: Vec<(u64, u64)> = self.iter().filter(|(_, m)| Arc::strong_count(m) == 1).map(|(k, _)| *k).collect();
        for k in unused {
            self.pop(&k);
        }
    }
}

/// The executable's path, without the ` (deleted)` suffix the kernel adds
/// after an upgrade replaced the file.
fn exe_path(proc_dir: &Path) -> Option<String> {
    let target = fs::read_link(proc_dir.join("exe")).ok()?;
    let s = target.to_string_lossy();
    Some(s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned())
}

#[cfg(test)]
mod tests;
