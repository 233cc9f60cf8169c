//! Container ids from `/proc/PID/cgroup`. The paths are chosen by whatever
//! runtime created the cgroup, so the parser accepts the common layouts and
//! never panics on anything else.
//!
//! Recognized (cgroup v1 or v2, any nesting):
//! - `/docker/<id>`, `/kubepods/.../<id>` (cgroupfs driver);
//! - `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
//!   `libpod-<id>.scope` (systemd driver);
//!
//! where `<id>` is 64 lowercase hex digits.

/// The container id of a process, from the text of its cgroup file.
pub fn container_id(cgroup_file: &str) -> Option<String> {
    cgroup_file.lines().find_map(|line| {
        // hierarchy-id:controllers:path; the path may itself contain ':'.
        let path = line.splitn(3, ':').nth(2)?;
        path.rsplit('/').find_map(id_in_component)
    })
}

fn id_in_component(component: &str) -> Option<String> {
    let trimmed = component.strip_suffix(".scope").unwrap_or(component);
    let candidate = trimmed.rsplit('-').next().unwrap_or(trimmed);
    let candidate = candidate.rsplit(':').next().unwrap_or(candidate);
    is_container_id(candidate).then(|| candidate.to_owned())
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "3f6c8a1f0b2d4e5f60718293a4b5c6d7e8f9012345678901234567890abcdef0";

    #[test]
    fn recognizes_runtime_layouts() {
        for text in [
            format!("0::/system.slice/docker-{ID}.scope\n"),
            format!("12:cpu,cpuacct:/docker/{ID}\n0::/\n"),
            format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope\n"),
            format!("0::/kubepods/besteffort/pod0f9a/{ID}\n"),
            format!("0::/machine.slice/libpod-{ID}.scope/container\n"),
            format!("0::/system.slice/crio-{ID}.scope\n"),
        ] {
            assert_eq!(container_id(&text).as_deref(), Some(ID), "{text}");
        }
    }

    #[test]
    fn host_processes_have_none() {
        assert_eq!(container_id("0::/user.slice/user-0.slice/session-1.scope\n"), None);
        assert_eq!(container_id("0::/\n"), None);
        assert_eq!(container_id(""), None);
        // Uppercase or short hex is not a container id.
        assert_eq!(container_id(&format!("0::/docker/{}\n", ID.to_uppercase())), None);
        assert_eq!(container_id("0::/docker/abc123\n"), None);
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = container_id(&s);
        }

        #[test]
        fn finds_an_id_under_any_prefix(prefix in "(/[a-z0-9._-]{1,12}){0,4}") {
            let text = format!("0::{prefix}/docker-{ID}.scope\n");
            let found = container_id(&text);
            prop_assert_eq!(found.as_deref(), Some(ID));
        }
    }
}
