//! What the selection needs to know about one process, read from `/proc`,
//! and whether it is selected.

use std::{collections::HashSet, fs, path::Path};

use super::Selection;
use crate::metadata::cgroup::CgroupInfo;

/// The facts of one process the selectors look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcFacts {
    pub pid: u32,
    pub comm: String,
    /// File name of `/proc/PID/exe`.
    pub exe_name: Option<String>,
    pub cgroup: CgroupInfo,
}

impl ProcFacts {
    /// Reads what `selection` needs of process `pid` (only that: a rescan
    /// touches every process). `None` when it is gone.
    pub fn read(proc_root: &Path, pid: u32, selection: &Selection) -> Option<Self> {
        let dir = proc_root.join(pid.to_string());
        let mut facts = ProcFacts { pid, ..Default::default() };
        if !selection.process_names.is_empty() {
            facts.comm = fs::read_to_string(dir.join("comm")).ok()?.trim_end_matches('\n').to_owned();
            facts.exe_name = fs::read_link(dir.join("exe"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().trim_end_matches(" (deleted)").to_owned()));
        }
        if !selection.cgroups.is_empty() || !selection.container_ids.is_empty() || selection.selects_pods() {
            facts.cgroup = CgroupInfo::parse(&fs::read_to_string(dir.join("cgroup")).ok()?);
        }
        Some(facts)
    }
}

/// Why a process is selected; decides whether its cgroup also goes into
/// the kernel's cgroup set (a container's or pod's new processes are then
/// caught at their first sample, before any rescan).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    Pid,
    Cgroup,
    ProcessName,
    /// By container id or pod: its whole cgroup belongs to the selection.
    Container,
}

impl Selection {
    /// Whether `p` is selected; `pod_uids` are the uids of the pods the
    /// namespace and label selectors chose.
    pub fn matches(&self, p: &ProcFacts, pod_uids: &HashSet<String>) -> Option<Match> {
        if self.pids.contains(&p.pid) {
            return Some(Match::Pid);
        }
        if let Some(path) = &p.cgroup.unified_path {
            if self.cgroups.iter().any(|c| in_subtree(path, &c.path)) {
                return Some(Match::Cgroup);
            }
        }
        if let Some(id) = &p.cgroup.container_id {
            if self.container_ids.iter().any(|want| id.starts_with(want.as_str())) {
                return Some(Match::Container);
            }
        }
        if let Some(uid) = &p.cgroup.pod_uid {
            if pod_uids.contains(uid) {
                return Some(Match::Container);
            }
        }
        let names = std::iter::once(p.comm.as_str()).chain(p.exe_name.as_deref());
        let named = names.filter(|n| !n.is_empty()).any(|n| self.process_names.iter().any(|re| re.is_match(n)));
        named.then_some(Match::ProcessName)
    }
}

/// `path` is `root` or below it, at a component boundary.
pub fn in_subtree(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    root.is_empty() || path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::CgroupTarget;

    fn facts(pid: u32, comm: &str, cgroup: &str) -> ProcFacts {
        ProcFacts { pid, comm: comm.into(), exe_name: Some(format!("{comm}-bin")), cgroup: CgroupInfo::parse(cgroup) }
    }

    #[test]
    fn subtrees_end_at_component_boundaries() {
        assert!(in_subtree("/system.slice/a.service", "/system.slice"));
        assert!(in_subtree("/system.slice", "/system.slice"));
        assert!(!in_subtree("/system.slice2/x", "/system.slice"));
        assert!(in_subtree("/anything", "/"));
    }

    #[test]
    fn each_selector_matches_its_processes() {
        let id = "3f6c8a1f0b2d4e5f60718293a4b5c6d7e8f9012345678901234567890abcdef0";
        let uid = "0f9a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b";
        let s = Selection {
            pids: vec![7],
            cgroups: vec![CgroupTarget { path: "/system.slice/web.service".into(), id: 1, level: 2 }],
            container_ids: vec![id[..12].into()],
            process_names: vec![regex::Regex::new("^post(gres|master)$").unwrap()],
            ..Default::default()
        };
        let pods: HashSet<String> = [uid.to_owned()].into();
        let m = |f: &ProcFacts| s.matches(f, &pods);
        assert_eq!(m(&facts(7, "x", "0::/\n")), Some(Match::Pid));
        assert_eq!(m(&facts(8, "x", "0::/system.slice/web.service/child\n")), Some(Match::Cgroup));
        assert_eq!(m(&facts(9, "x", &format!("0::/system.slice/docker-{id}.scope\n"))), Some(Match::Container));
        assert_eq!(
            m(&facts(10, "x", &format!("0::/kubepods/burstable/pod{uid}/{}\n", "a".repeat(64)))),
            Some(Match::Container)
        );
        assert_eq!(m(&facts(11, "postgres", "0::/\n")), Some(Match::ProcessName));
        let by_exe = ProcFacts { exe_name: Some("postmaster".into()), ..facts(12, "worker", "0::/\n") };
        assert_eq!(m(&by_exe), Some(Match::ProcessName), "the executable's name counts too");
        assert_eq!(m(&facts(13, "postgresql", "0::/system.slice/other.service\n")), None);
    }
}
