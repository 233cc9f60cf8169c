//! What the agent knows about the processes it profiles: name and
//! executable mappings, read from `/proc` on first sight so a process that
//! exits before its samples are symbolized still gets its frames.

pub mod maps;

pub use crate::metadata::cgroup;

use std::{
    fs,
    num::NonZeroUsize,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use lru::LruCache;

pub use maps::MapEntry;

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
        self.build_id.as_ref().map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
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

/// Counters of the process table, reported in the summary and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Processes whose maps could not be read (they exited first).
    pub vanished: u64,
    /// Entries evicted because the table was full.
    pub evicted: u64,
    /// Modules evicted from the module table.
    pub modules_evicted: u64,
}

/// Process lookups as the symbolizer needs them; implemented by the table
/// itself and by a mutex around it, so a daemon's sampling thread and its
/// symbolizing thread can share one table.
pub trait ProcessLookup {
    /// See [`ProcessTable::observe`].
    fn observe(&mut self, pid: u32, fallback_name: &str) -> Arc<ProcessInfo>;
    /// See [`ProcessTable::refresh`].
    fn refresh(&mut self, pid: u32) -> Option<Arc<ProcessInfo>>;
}

impl ProcessLookup for ProcessTable {
    fn observe(&mut self, pid: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        ProcessTable::observe(self, pid, fallback_name)
    }
    fn refresh(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        ProcessTable::refresh(self, pid)
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
}

/// Bounded table of processes and the modules they map.
pub struct ProcessTable {
    proc_root: PathBuf,
    processes: LruCache<u32, Arc<ProcessInfo>>,
    modules: LruCache<(u64, u64), Arc<ModuleInfo>>,
    stats: ProcessStats,
}

impl ProcessTable {
    /// A table reading from `proc_root` (normally `/proc`), holding at most
    /// `capacity` processes (least recently seen evicted first) and four times
    /// as many modules.
    pub fn new(proc_root: impl Into<PathBuf>, capacity: NonZeroUsize) -> Self {
        let modules = NonZeroUsize::new(capacity.get().saturating_mul(4)).unwrap_or(capacity);
        Self {
            proc_root: proc_root.into(),
            processes: LruCache::new(capacity),
            modules: LruCache::new(modules),
            stats: ProcessStats::default(),
        }
    }

    pub fn stats(&self) -> ProcessStats {
        self.stats
    }

    /// The process, reading `/proc` on first sight. `fallback_name` (the
    /// sample's thread name) is used when the process is already gone.
    pub fn observe(&mut self, pid: u32, fallback_name: &str) -> Arc<ProcessInfo> {
        if let Some(p) = self.processes.get(&pid) {
            return p.clone();
        }
        let info = Arc::new(self.read(pid, fallback_name));
        if let Some((old, _)) = self.processes.push(pid, info.clone()) {
            if old != pid {
                self.stats.evicted += 1;
            }
        }
        info
    }

    /// Re-reads a process's mappings, e.g. after an address fell outside all
    /// known ones (dlopen, exec). Keeps the old entry if the process is gone.
    pub fn refresh(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        let old = self.processes.peek(&pid)?.clone();
        let dir = self.proc_root.join(pid.to_string());
        let maps = fs::read_to_string(dir.join("maps")).ok()?;
        // An exec also changes the name: a child seen between fork and exec
        // was first recorded under its parent's name.
        let name = fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim_end_matches('\n').to_owned())
            .unwrap_or_else(|_| old.name.clone());
        let info = Arc::new(ProcessInfo {
            pid,
            name,
            exe_path: exe_path(&dir).or_else(|| old.exe_path.clone()),
            container_id: old.container_id.clone(),
            pod_uid: old.pod_uid.clone(),
            mappings: self.mappings(pid, &maps),
        });
        self.processes.put(pid, info.clone());
        Some(info)
    }

    /// A process already in the table, without reading `/proc`.
    pub fn get(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        self.processes.get(&pid).cloned()
    }

    fn read(&mut self, pid: u32, fallback_name: &str) -> ProcessInfo {
        let dir = self.proc_root.join(pid.to_string());
        let name = fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim_end_matches('\n').to_owned())
            .unwrap_or_else(|_| fallback_name.to_owned());
        let mappings = match fs::read_to_string(dir.join("maps")) {
            Ok(text) => self.mappings(pid, &text),
            Err(_) => {
                self.stats.vanished += 1;
                Vec::new()
            }
        };
        let cgroup = fs::read_to_string(dir.join("cgroup")).map(|t| cgroup::CgroupInfo::parse(&t)).unwrap_or_default();
        let (container_id, pod_uid) = (cgroup.container_id, cgroup.pod_uid);
        ProcessInfo { pid, name, exe_path: exe_path(&dir), container_id, pod_uid, mappings }
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
            .and_then(|p| blazesym::helper::read_elf_build_id(p).ok().flatten())
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

/// The executable's path, without the ` (deleted)` suffix the kernel adds
/// after an upgrade replaced the file.
fn exe_path(proc_dir: &Path) -> Option<String> {
    let target = fs::read_link(proc_dir.join("exe")).ok()?;
    let s = target.to_string_lossy();
    Some(s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(dir: &Path, pid: u32, comm: &str, maps: &str) {
        let p = dir.join(pid.to_string());
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(p.join("maps"), maps).unwrap();
    }

    #[test]
    fn reads_exe_and_container_id() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(dir.path(), 9, "svc", "");
        let p = dir.path().join("9");
        std::os::unix::fs::symlink("/usr/bin/svc", p.join("exe")).unwrap();
        let id = "3f6c8a1f0b2d4e5f60718293a4b5c6d7e8f9012345678901234567890abcdef0";
        fs::write(p.join("cgroup"), format!("0::/system.slice/docker-{id}.scope\n")).unwrap();
        let mut table = ProcessTable::new(dir.path(), NonZeroUsize::new(4).unwrap());
        let info = table.observe(9, "");
        assert_eq!(info.exe_path.as_deref(), Some("/usr/bin/svc"));
        assert_eq!(info.container_id.as_deref(), Some(id));
    }

    #[test]
    fn reads_on_first_sight_and_remembers_after_exit() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let ino = fs::metadata(&exe).unwrap().ino();
        let maps = format!("400000-500000 r-xp 00001000 fe:01 {ino} {}\n", exe.display());
        fake_proc(dir.path(), 42, "worker", &maps);
        let mut table = ProcessTable::new(dir.path(), NonZeroUsize::new(8).unwrap());
        let p = table.observe(42, "thread");
        assert_eq!(p.name, "worker");
        assert_eq!(p.mappings.len(), 1);
        let m = p.mapping(0x400010).unwrap();
        assert_eq!(m.entry.file_offset(0x400010), 0x1010);
        assert_eq!(m.module.as_ref().unwrap().open_path.as_deref(), Some(exe.as_path()));
        // The process exits: the table still knows it.
        fs::remove_dir_all(dir.path().join("42")).unwrap();
        assert_eq!(table.observe(42, "thread").mappings.len(), 1);
        assert_eq!(table.stats().vanished, 0);
    }

    #[test]
    fn refresh_picks_up_new_mappings_and_the_name_after_exec() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(dir.path(), 5, "sh", "");
        let mut table = ProcessTable::new(dir.path(), NonZeroUsize::new(8).unwrap());
        assert!(table.observe(5, "").mappings.is_empty());
        fake_proc(dir.path(), 5, "rustc", "1000-2000 r-xp 00000000 00:00 0 [vdso]\n");
        let p = table.refresh(5).unwrap();
        assert_eq!(p.name, "rustc");
        assert!(p.mapping(0x1800).is_some());
        assert_eq!(table.observe(5, "").name, "rustc");
    }

    #[test]
    fn a_process_gone_before_first_sight_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = ProcessTable::new(dir.path(), NonZeroUsize::new(8).unwrap());
        let p = table.observe(7, "short");
        assert_eq!(p.name, "short");
        assert!(p.mappings.is_empty());
        assert_eq!(table.stats().vanished, 1);
    }

    #[test]
    fn evicts_least_recently_seen_beyond_capacity() {
        let dir = tempfile::tempdir().unwrap();
        for pid in 1..=3 {
            fake_proc(dir.path(), pid, &format!("p{pid}"), "");
        }
        let mut table = ProcessTable::new(dir.path(), NonZeroUsize::new(2).unwrap());
        table.observe(1, "");
        table.observe(2, "");
        table.observe(1, "");
        table.observe(3, "");
        assert_eq!(table.stats().evicted, 1);
        assert!(table.get(2).is_none());
        assert!(table.get(1).is_some());
    }

    #[test]
    fn modules_are_shared_between_processes() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let ino = fs::metadata(&exe).unwrap().ino();
        let maps = format!("400000-500000 r-xp 00000000 fe:01 {ino} {}\n", exe.display());
        fake_proc(dir.path(), 1, "a", &maps);
        fake_proc(dir.path(), 2, "b", &maps);
        let mut table = ProcessTable::new(dir.path(), NonZeroUsize::new(8).unwrap());
        let a = table.observe(1, "");
        let b = table.observe(2, "");
        let (ma, mb) = (a.mappings[0].module.as_ref().unwrap(), b.mappings[0].module.as_ref().unwrap());
        assert!(Arc::ptr_eq(ma, mb));
    }
}
