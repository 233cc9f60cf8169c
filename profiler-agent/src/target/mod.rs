//! Which processes are profiled, compiled into the kernel's filter maps so
//! a process outside the selection costs one map lookup and no unwinding.
//!
//! Selectors (any match selects a process; none at all means every
//! process): `--pid`, `--cgroup PATH` (a cgroup v2 subtree), `--container-id
//! ID`, `--process-name REGEX` (comm or executable name, at start and at
//! exec), and in the daemon's config Kubernetes namespaces and a pod label
//! selector.
//!
//! In the kernel (`profiler-ebpf/src/filter.rs`), a sample or switch is
//! kept when its tgid is in `TARGET_PIDS`, or, for the running task, when
//! one of its cgroup ancestors is in `TARGET_CGROUPS`. The agent keeps both
//! current ([`sync::Targeter`]): the `--cgroup` ids are fixed at start;
//! matching tgids (and the cgroups of matched containers and pods) are
//! found by a bounded periodic `/proc` scan, and an exec re-evaluates its
//! process at once through [`sync::Targeter::on_exec`].

pub mod mountinfo;
pub mod scan;
pub mod sync;

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use regex::Regex;

use crate::{
    config::Targets,
    metadata::kubernetes::selector::{check_namespace, LabelSelector},
};

/// Command-line selectors shared by `record` and `run`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TargetArgs {
    /// Only profile processes in this cgroup v2 subtree (repeatable), a path
    /// relative to the v2 root as `/proc/PID/cgroup` shows it, e.g.
    /// `/system.slice/nginx.service` or `/kubepods.slice`.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,
    /// Only profile this container (repeatable): its id, or a unique prefix
    /// of at least 12 hex digits as `docker ps` shows it.
    #[arg(long = "container-id", value_name = "ID")]
    pub container_ids: Vec<String>,
    /// Only profile processes whose name (comm) or executable file name
    /// matches this regular expression (repeatable), e.g. `^nginx$`. Checked
    /// at start, at exec, and by a rescan every 2 s.
    #[arg(long = "process-name", value_name = "REGEX")]
    pub process_names: Vec<String>,
}

impl TargetArgs {
    /// Adds the flags to the config file's `[targets]`.
    pub fn merge_into(&self, targets: &mut Targets) {
        targets.cgroups.extend(self.cgroups.iter().cloned());
        targets.container_ids.extend(self.container_ids.iter().cloned());
        targets.process_names.extend(self.process_names.iter().cloned());
    }
}

/// A selector that cannot work, reported before anything is attached.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("--cgroup {path}: {why}")]
    Cgroup { path: String, why: String },
    #[error("--container-id {id}: expected 12 to 64 lowercase hex digits (optionally after `containerd://`)")]
    ContainerId { id: String },
    #[error("--process-name {pattern}: invalid regular expression: {source}")]
    Regex {
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("targets.namespaces: {0}")]
    Namespace(String),
    #[error("targets.pod_selector: {0}")]
    Selector(String),
    #[error("targets.namespaces and targets.pod_selector need Kubernetes metadata ([kubernetes] enabled)")]
    NeedsKubernetes,
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); --cgroup needs one")]
    NoCgroup2,
}

/// A `--cgroup` resolved to the id the kernel reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupTarget {
    /// Normalized path relative to the v2 root (`/a/b`, `/` for the root).
    pub path: String,
    /// The cgroup id (the directory's inode on cgroup2).
    pub id: u64,
    /// Depth below the root (the root is 0), for `bpf_get_current_ancestor_cgroup_id`.
    pub level: u32,
}

/// Validated selectors.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub pids: Vec<u32>,
    pub cgroups: Vec<CgroupTarget>,
    pub container_ids: Vec<String>,
    pub process_names: Vec<Regex>,
    pub namespaces: Vec<String>,
    pub pod_selector: Option<LabelSelector>,
}

impl Selection {
    /// Checks every selector. `cgroup2_root` is where the v2 hierarchy is
    /// mounted (`None`: not mounted); `kubernetes` whether pod metadata is on.
    pub fn build(
        pids: &[u32],
        targets: &Targets,
        cgroup2_root: Option<&Path>,
        kubernetes: bool,
    ) -> Result<Self, TargetError> {
        let mut s = Selection { pids: pids.to_vec(), ..Default::default() };
        for path in &targets.cgroups {
            let root = cgroup2_root.ok_or(TargetError::NoCgroup2)?;
            s.cgroups.push(resolve_cgroup(root, path)?);
        }
        for id in &targets.container_ids {
            let bare = crate::metadata::kubernetes::strip_runtime_prefix(id.trim());
            let hex = bare.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !(12..=64).contains(&bare.len()) || !hex {
                return Err(TargetError::ContainerId { id: id.clone() });
            }
            s.container_ids.push(bare.to_owned());
        }
        for pattern in &targets.process_names {
            let re = Regex::new(pattern)
                .map_err(|e| TargetError::Regex { pattern: pattern.clone(), source: Box::new(e) })?;
            s.process_names.push(re);
        }
        for ns in &targets.namespaces {
            check_namespace(ns).map_err(TargetError::Namespace)?;
            s.namespaces.push(ns.clone());
        }
        if let Some(text) = &targets.pod_selector {
            s.pod_selector = Some(LabelSelector::parse(text).map_err(TargetError::Selector)?);
        }
        if (!s.namespaces.is_empty() || s.pod_selector.is_some()) && !kubernetes {
            return Err(TargetError::NeedsKubernetes);
        }
        Ok(s)
    }

    /// Whether anything narrows the selection (else every process is profiled).
    pub fn is_active(&self) -> bool {
        !self.pids.is_empty() || self.needs_maintenance()
    }

    /// Whether the selection changes as processes come and go (anything
    /// beyond a fixed `--pid` list).
    pub fn needs_maintenance(&self) -> bool {
        !self.cgroups.is_empty()
            || !self.container_ids.is_empty()
            || !self.process_names.is_empty()
            || self.selects_pods()
    }

    /// Whether pods are selected by namespace or labels.
    pub fn selects_pods(&self) -> bool {
        !self.namespaces.is_empty() || self.pod_selector.is_some()
    }
}

/// The cgroup v2 mount point of this host.
pub fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo::cgroup2_mount(&text).map(PathBuf::from)
}

/// `/a//b/` -> `/a/b`; `..` and `.` are refused (a selector names one cgroup).
fn normalize(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err("expected a path from the cgroup v2 root, starting with `/` (as /proc/PID/cgroup shows it)".into());
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err("`.` and `..` are not allowed".into());
    }
    Ok(format!("/{}", parts.join("/")))
}

/// The id and level of the cgroup at `path` under `root`.
pub fn resolve_cgroup(root: &Path, path: &str) -> Result<CgroupTarget, TargetError> {
    let err = |why: String| TargetError::Cgroup { path: path.to_owned(), why };
    let normal = normalize(path).map_err(err)?;
    let dir = root.join(normal.trim_start_matches('/'));
    let meta = std::fs::metadata(&dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    if !meta.is_dir() || !dir.join("cgroup.procs").exists() {
        return Err(err(format!("{} is not a cgroup v2 directory", dir.display())));
    }
    let level = normal.split('/').filter(|p| !p.is_empty()).count() as u32;
    Ok(CgroupTarget { path: normal, id: meta.ino(), level })
}

#[cfg(test)]
mod tests;

/// A running selection: the targeter and its rescan thread, stopped on drop.
pub struct Running<M: crate::bpf::target_maps::TargetMaps + 'static> {
    /// Shared so an exec notification can call [`sync::Targeter::on_exec`].
    pub targeter: std::sync::Arc<std::sync::Mutex<sync::Targeter<M>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<M: crate::bpf::target_maps::TargetMaps + 'static> Running<M> {
    /// Fills the kernel's filter (before sampling starts) and starts the
    /// periodic rescan.
    pub fn start(
        maps: M,
        selection: Selection,
        cgroup2_root: Option<PathBuf>,
        pods: Option<std::sync::Arc<std::sync::Mutex<crate::metadata::PodCache>>>,
        stats: std::sync::Arc<sync::TargetStats>,
    ) -> std::io::Result<Self> {
        let targeter = sync::Targeter::new(maps, selection, "/proc", cgroup2_root, pods, stats);
        log::info!(
            "target selection: {} processes and {} cgroups selected in the kernel",
            targeter.pids().len(),
            targeter.cgroups().len()
        );
        let targeter = std::sync::Arc::new(std::sync::Mutex::new(targeter));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = sync::spawn_rescans(targeter.clone(), stop.clone())?;
        Ok(Self { targeter, stop, thread: Some(thread) })
    }
}

impl<M: crate::bpf::target_maps::TargetMaps + 'static> Drop for Running<M> {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
