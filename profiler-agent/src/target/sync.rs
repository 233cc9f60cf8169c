//! Keeps the kernel's filter equal to the selection as processes and pods
//! come and go.
//!
//! Bounds: the kernel holds at most `MAX_FILTER_PIDS` tgids and
//! `MAX_FILTER_CGROUPS` cgroups; matches beyond that are counted in
//! [`TargetStats::dropped`] (a process in a selected cgroup is still caught
//! by its cgroup for its on-CPU samples). A rescan reads at most
//! [`MAX_SCAN`] processes.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use profiler_common::{MAX_FILTER_CGROUPS, MAX_FILTER_PIDS};

use super::{
    scan::{Match, ProcFacts},
    Selection,
};
use crate::{bpf::target_maps::TargetMaps, metadata::PodCache};

/// How often the `/proc` rescan runs.
pub const RESCAN_EVERY: Duration = Duration::from_secs(2);
/// Processes read per rescan at most.
pub const MAX_SCAN: usize = 65_536;

/// Counters of the targeter, for the summary and `/metrics`.
#[derive(Debug, Default)]
pub struct TargetStats {
    pub scans: AtomicU64,
    /// Selected processes currently in the kernel's pid set.
    pub pids: AtomicU64,
    /// Selected cgroups currently in the kernel's cgroup set.
    pub cgroups: AtomicU64,
    /// Matches not added because a kernel set was full, or a write failed.
    pub dropped: AtomicU64,
}

impl TargetStats {
    /// Appends the Prometheus text of these series.
    pub fn render(&self, s: &mut String) {
        use std::fmt::Write as _;
        let series: [(&str, &str, &str, &AtomicU64); 4] = [
            ("profiler_target_scans_total", "counter", "Rescans of /proc for the target selection.", &self.scans),
            ("profiler_target_pids", "gauge", "Processes selected in the kernel's filter.", &self.pids),
            ("profiler_target_cgroups", "gauge", "Cgroups selected in the kernel's filter.", &self.cgroups),
            (
                "profiler_target_dropped_total",
                "counter",
                "Selected processes or cgroups not added because the kernel's set was full.",
                &self.dropped,
            ),
        ];
        for (name, kind, help, v) in series {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", v.load(Relaxed));
        }
    }
}

/// The selection and what of it is in the kernel.
pub struct Targeter<M: TargetMaps> {
    maps: M,
    selection: Selection,
    proc_root: PathBuf,
    /// Where the v2 hierarchy is mounted (for the cgroups of matched containers).
    cgroup2_root: Option<PathBuf>,
    pods: Option<Arc<Mutex<PodCache>>>,
    pids: BTreeSet<u32>,
    /// Cgroup id -> level; the `--cgroup` ones are never removed.
    cgroups: BTreeMap<u64, u32>,
    fixed_cgroups: BTreeSet<u64>,
    pub stats: Arc<TargetStats>,
}

impl<M: TargetMaps> Targeter<M> {
    /// Writes the fixed part (`--pid`, `--cgroup`) and scans once, so the
    /// selection is complete before sampling starts.
    pub fn new(
        maps: M,
        selection: Selection,
        proc_root: impl Into<PathBuf>,
        cgroup2_root: Option<PathBuf>,
        pods: Option<Arc<Mutex<PodCache>>>,
        stats: Arc<TargetStats>,
    ) -> Self {
        let mut t = Self {
            maps,
            proc_root: proc_root.into(),
            cgroup2_root,
            pods,
            pids: BTreeSet::new(),
            cgroups: BTreeMap::new(),
            fixed_cgroups: selection.cgroups.iter().map(|c| c.id).collect(),
            selection,
            stats,
        };
        let fixed: BTreeMap<u64, u32> = t.selection.cgroups.iter().map(|c| (c.id, c.level)).collect();
        t.apply(t.selection.pids.iter().copied().collect(), fixed);
        t.rescan();
        t
    }

    /// The pids currently selected in the kernel.
    pub fn pids(&self) -> &BTreeSet<u32> {
        &self.pids
    }

    /// The cgroup ids currently selected in the kernel, with their levels.
    pub fn cgroups(&self) -> &BTreeMap<u64, u32> {
        &self.cgroups
    }

    fn pod_uids(&self) -> HashSet<String> {
        let Some(cache) = &self.pods else { return HashSet::new() };
        let cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.selection;
        cache
            .live()
            .filter(|p| s.namespaces.is_empty() || s.namespaces.contains(&p.namespace))
            .filter(|p| s.pod_selector.as_ref().is_none_or(|sel| sel.matches(&p.labels)))
            .filter(|_| s.selects_pods())
            .map(|p| p.uid.clone())
            .collect()
    }

    /// Re-reads every process and brings the kernel's sets up to date.
    pub fn rescan(&mut self) {
        self.stats.scans.fetch_add(1, Relaxed);
        if !self.selection.needs_maintenance() {
            return;
        }
        let pod_uids = self.pod_uids();
        let mut pids: BTreeSet<u32> = self.selection.pids.iter().copied().collect();
        let mut cgroups: BTreeMap<u64, u32> = self.selection.cgroups.iter().map(|c| (c.id, c.level)).collect();
        for pid in list_pids(&self.proc_root).into_iter().take(MAX_SCAN) {
            let Some(facts) = ProcFacts::read(&self.proc_root, pid, &self.selection) else { continue };
            if let Some(m) = self.selection.matches(&facts, &pod_uids) {
                pids.insert(pid);
                if m == Match::Container {
                    if let Some(c) = self.cgroup_of(&facts) {
                        cgroups.insert(c.0, c.1);
                    }
                }
            }
        }
        self.apply(pids, cgroups);
    }

    /// An exec (or a new process) re-evaluates that process now rather than
    /// at the next rescan: its new name may match `--process-name`.
    pub fn on_exec(&mut self, pid: u32) {
        if !self.selection.needs_maintenance() || self.pids.contains(&pid) {
            return;
        }
        let Some(facts) = ProcFacts::read(&self.proc_root, pid, &self.selection) else { return };
        if self.selection.matches(&facts, &self.pod_uids()).is_some() {
            self.add_pid(pid);
            self.stats.pids.store(self.pids.len() as u64, Relaxed);
        }
    }

    /// The v2 cgroup (id, level) a process runs in.
    fn cgroup_of(&self, facts: &ProcFacts) -> Option<(u64, u32)> {
        let root = self.cgroup2_root.as_deref()?;
        let path = facts.cgroup.unified_path.as_deref()?;
        let c = super::resolve_cgroup(root, path).ok()?;
        Some((c.id, c.level))
    }

    fn add_pid(&mut self, pid: u32) {
        if self.pids.len() >= MAX_FILTER_PIDS as usize {
            self.stats.dropped.fetch_add(1, Relaxed);
            return;
        }
        match self.maps.add_pid(pid) {
            Ok(()) => {
                self.pids.insert(pid);
            }
            Err(e) => {
                log::debug!("selecting pid {pid} in the kernel failed: {e}");
                self.stats.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    fn apply(&mut self, pids: BTreeSet<u32>, cgroups: BTreeMap<u64, u32>) {
        let gone: Vec<u32> = self.pids.difference(&pids).copied().collect();
        for pid in gone {
            if self.maps.remove_pid(pid).is_ok() {
                self.pids.remove(&pid);
            }
        }
        for pid in pids {
            if !self.pids.contains(&pid) {
                self.add_pid(pid);
            }
        }
        let gone: Vec<u64> = self
            .cgroups
            .keys()
            .filter(|id| !cgroups.contains_key(id) && !self.fixed_cgroups.contains(id))
            .copied()
            .collect();
        for id in gone {
            if self.maps.remove_cgroup(id).is_ok() {
                self.cgroups.remove(&id);
            }
        }
        for (id, level) in cgroups {
            if self.cgroups.contains_key(&id) {
                continue;
            }
            // Levels above 63 cannot be in the mask; such a cgroup is
            // still selected through its processes' tgids.
            if self.cgroups.len() >= MAX_FILTER_CGROUPS as usize || level > 63 {
                self.stats.dropped.fetch_add(1, Relaxed);
                continue;
            }
            match self.maps.add_cgroup(id) {
                Ok(()) => {
                    self.cgroups.insert(id, level);
                }
                Err(_) => {
                    self.stats.dropped.fetch_add(1, Relaxed);
                }
            }
        }
        let mask = self.cgroups.values().fold(0u64, |m, level| m | (1u64 << level));
        if self.maps.set_levels(mask).is_err() {
            self.stats.dropped.fetch_add(1, Relaxed);
        }
        self.stats.pids.store(self.pids.len() as u64, Relaxed);
        self.stats.cgroups.store(self.cgroups.len() as u64, Relaxed);
    }
}

/// Numeric entries of `/proc`.
fn list_pids(proc_root: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(proc_root) else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// Runs [`Targeter::rescan`] every [`RESCAN_EVERY`] on its own thread until
/// `stop`; returns the shared targeter so exec notifications can reach it.
pub fn spawn_rescans<M: TargetMaps + 'static>(
    targeter: Arc<Mutex<Targeter<M>>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("targets".into()).spawn(move || {
        while !stop.load(Relaxed) {
            // Short sleeps so stopping does not wait a whole period.
            for _ in 0..(RESCAN_EVERY.as_millis() / 100) {
                if stop.load(Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            targeter.lock().unwrap_or_else(|e| e.into_inner()).rescan();
        }
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::{
        bpf::target_maps::FakeTargetMaps,
        config::Targets,
        metadata::kubernetes::{ContainerInfo, PodInfo},
    };

    fn fake_proc(root: &Path, pid: u32, comm: &str, cgroup: &str) {
        let d = root.join(pid.to_string());
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(d.join("cgroup"), cgroup).unwrap();
    }

    fn selection(targets: Targets, kubernetes: bool) -> Selection {
        Selection::build(&[], &targets, None, kubernetes).unwrap()
    }

    #[test]
    fn process_names_are_matched_at_start_by_rescan_and_at_exec() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(dir.path(), 10, "nginx", "0::/\n");
        fake_proc(dir.path(), 11, "bash", "0::/\n");
        let s = selection(Targets { process_names: vec!["^nginx$".into()], ..Default::default() }, false);
        let mut t = Targeter::new(FakeTargetMaps::default(), s, dir.path(), None, None, Default::default());
        assert_eq!(t.pids().iter().copied().collect::<Vec<_>>(), [10], "matched at start");
        assert_eq!(t.maps.pids, *t.pids(), "and written to the kernel");
        // 11 execs nginx: re-evaluated at once.
        fake_proc(dir.path(), 11, "nginx", "0::/\n");
        t.on_exec(11);
        assert!(t.maps.pids.contains(&11));
        // 10 exits, 12 starts: the rescan catches both.
        fs::remove_dir_all(dir.path().join("10")).unwrap();
        fake_proc(dir.path(), 12, "nginx", "0::/\n");
        t.rescan();
        assert_eq!(t.maps.pids.iter().copied().collect::<Vec<_>>(), [11, 12], "no stale entry");
        assert_eq!(t.stats.pids.load(Relaxed), 2);
    }

    #[test]
    fn pods_by_namespace_and_labels_follow_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let uid = "0f9a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b";
        fake_proc(dir.path(), 20, "app", &format!("0::/kubepods/burstable/pod{uid}/{}\n", "a".repeat(64)));
        fake_proc(dir.path(), 21, "app", "0::/system.slice/x.service\n");
        let cache = Arc::new(Mutex::new(PodCache::new(8, Duration::from_secs(30))));
        let s = selection(
            Targets { namespaces: vec!["shop".into()], pod_selector: Some("tier=web".into()), ..Default::default() },
            true,
        );
        let mut t =
            Targeter::new(FakeTargetMaps::default(), s, dir.path(), None, Some(cache.clone()), Default::default());
        assert!(t.maps.pids.is_empty(), "the pod is not known yet");
        let pod = PodInfo {
            uid: uid.into(),
            namespace: "shop".into(),
            labels: [("tier".to_owned(), "web".to_owned())].into(),
            containers: vec![ContainerInfo { id: "a".repeat(64), name: "app".into() }],
            ..Default::default()
        };
        cache.lock().unwrap().upsert(pod.clone(), std::time::Instant::now());
        t.rescan();
        assert_eq!(t.maps.pids.iter().copied().collect::<Vec<_>>(), [20]);
        cache.lock().unwrap().upsert(PodInfo { namespace: "other".into(), ..pod }, std::time::Instant::now());
        t.rescan();
        assert!(t.maps.pids.is_empty(), "a pod outside the namespaces is dropped");
    }

    #[test]
    fn the_kernel_set_is_bounded_and_overflow_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        for pid in 1..=(MAX_FILTER_PIDS + 5) {
            let d = dir.path().join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("comm"), "w\n").unwrap();
        }
        let s = selection(Targets { process_names: vec!["^w$".into()], ..Default::default() }, false);
        let t = Targeter::new(FakeTargetMaps::default(), s, dir.path(), None, None, Default::default());
        assert_eq!(t.maps.pids.len(), MAX_FILTER_PIDS as usize);
        assert_eq!(t.stats.dropped.load(Relaxed), 5);
    }

    #[test]
    fn fixed_cgroups_set_their_levels() {
        let s = Selection {
            cgroups: vec![
                super::super::CgroupTarget { path: "/a".into(), id: 100, level: 1 },
                super::super::CgroupTarget { path: "/a/b/c".into(), id: 200, level: 3 },
            ],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let t = Targeter::new(FakeTargetMaps::default(), s, dir.path(), None, None, Default::default());
        assert_eq!(t.maps.levels, 0b1010);
        assert_eq!(t.maps.cgroups.keys().copied().collect::<Vec<_>>(), [100, 200]);
    }
}
