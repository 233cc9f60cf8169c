//! Container ids and pod uids from `/proc/PID/cgroup`. The paths are chosen
//! by whatever runtime created the cgroup, so the parser accepts the common
//! layouts and never panics on anything else.
//!
//! Recognized (cgroup v1, v2 and hybrid files, any nesting):
//! - container ids: `/docker/<id>`, `/kubepods/<qos>/pod<uid>/<id>` and
//!   `.../crio-<id>` (cgroupfs driver); `docker-<id>.scope`,
//!   `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`
//!   (systemd driver); `...slice:cri-containerd:<id>` (containerd's v1
//!   systemd layout); where `<id>` is 64 lowercase hex digits. The
//!   `conmon` monitor cgroups of cri-o and podman name the container they
//!   watch but are not that container, so they are skipped;
//! - pod uids: `pod<uid>` (cgroupfs) and `kubepods-<qos>-pod<uid_with_underscores>.slice`
//!   (systemd), returned in the API's dashed form.

/// What a process's cgroup file says about where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// 64 lowercase hex digits, as the runtime names the container.
    pub container_id: Option<String>,
    /// The Kubernetes pod uid (`8-4-4-4-12` lowercase hex), when the process
    /// runs in a pod's cgroup.
    pub pod_uid: Option<String>,
    /// The path in the cgroup v2 hierarchy (the `0::` line), which names the
    /// cgroup `bpf_get_current_cgroup_id` reports.
    pub unified_path: Option<String>,
}

impl CgroupInfo {
    /// Parses the text of `/proc/PID/cgroup`.
    pub fn parse(cgroup_file: &str) -> Self {
        Self {
            container_id: container_id(cgroup_file),
            pod_uid: pod_uid(cgroup_file),
            unified_path: unified_path(cgroup_file).map(str::to_owned),
        }
    }
}

/// `hierarchy-id:controllers:path` lines; the path may itself contain ':'.
fn paths(cgroup_file: &str) -> impl Iterator<Item = &str> {
    cgroup_file.lines().filter_map(|line| line.splitn(3, ':').nth(2))
}

/// The container id of a process, from the text of its cgroup file.
pub fn container_id(cgroup_file: &str) -> Option<String> {
    paths(cgroup_file).find_map(|path| path.rsplit('/').find_map(id_in_component))
}

/// The pod uid of a process, from the text of its cgroup file.
pub fn pod_uid(cgroup_file: &str) -> Option<String> {
    paths(cgroup_file).find_map(|path| path.split('/').find_map(uid_in_component))
}

/// The cgroup v2 path (`0::PATH`), e.g. `/system.slice/foo.service`.
pub fn unified_path(cgroup_file: &str) -> Option<&str> {
    cgroup_file.lines().find_map(|line| line.strip_prefix("0::")).filter(|p| p.starts_with('/'))
}

fn id_in_component(component: &str) -> Option<String> {
    if component.contains("conmon") {
        return None;
    }
    let trimmed = component.strip_suffix(".scope").unwrap_or(component);
    let candidate = trimmed.rsplit('-').next().unwrap_or(trimmed);
    let candidate = candidate.rsplit(':').next().unwrap_or(candidate);
    is_container_id(candidate).then(|| candidate.to_owned())
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// `pod<uid>` or `kubepods-<qos>-pod<uid_>.slice`.
fn uid_in_component(component: &str) -> Option<String> {
    // containerd's v1 systemd leaf is `<pod slice>:cri-containerd:<id>`.
    let name = component.split(':').next().unwrap_or(component);
    let name = name.strip_suffix(".slice").unwrap_or(name);
    // The uid follows `pod` at the start of the component or after a `-`.
    let rest = name.strip_prefix("pod").or_else(|| name.rfind("-pod").map(|i| &name[i + 4..]))?;
    let uid: String = rest.chars().map(|c| if c == '_' { '-' } else { c.to_ascii_lowercase() }).collect();
    is_uid(&uid).then_some(uid)
}

/// `8-4-4-4-12` hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5 && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(is_lower_hex))
}

#[cfg(test)]
#[path = "cgroup_tests.rs"]
mod tests;
