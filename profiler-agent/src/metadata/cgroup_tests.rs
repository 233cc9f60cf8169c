//! A corpus of whole `/proc/PID/cgroup` files as the runtimes write them,
//! and property tests that the parsers never panic.

use super::*;
use proptest::prelude::*;

const ID: &str = "3f6c8a1f0b2d4e5f60718293a4b5c6d7e8f9012345678901234567890abcdef0";
const UID: &str = "0f9a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b";
const UID_: &str = "0f9a2b3c_4d5e_4f60_8a7b_9c0d1e2f3a4b";

struct Case {
    what: &'static str,
    text: String,
    container: Option<&'static str>,
    pod: Option<&'static str>,
    unified: Option<String>,
}

fn corpus() -> Vec<Case> {
    let case = |what, text: String, container, pod, unified: Option<&str>| Case {
        what,
        text,
        container,
        pod,
        unified: unified.map(str::to_owned),
    };
    let k8s_systemd_v2 = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
    );
    vec![
        // containerd, systemd driver, pure cgroup v2 (GKE, EKS AL2023, kubeadm defaults).
        case("containerd systemd v2", format!("0::{k8s_systemd_v2}\n"), Some(ID), Some(UID), Some(&k8s_systemd_v2)),
        // Guaranteed QoS has no QoS slice.
        case(
            "containerd systemd v2 guaranteed",
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n"),
            Some(ID),
            Some(UID),
            Some(&format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope")),
        ),
        // cgroupfs driver (k3s, kind, older kubeadm): bare id under pod<uid>.
        case(
            "containerd cgroupfs v2",
            format!("0::/kubepods/besteffort/pod{UID}/{ID}\n"),
            Some(ID),
            Some(UID),
            Some(&format!("/kubepods/besteffort/pod{UID}/{ID}")),
        ),
        case(
            "cri-o cgroupfs v2",
            format!("0::/kubepods/besteffort/pod{UID}/crio-{ID}\n"),
            Some(ID),
            Some(UID),
            Some(&format!("/kubepods/besteffort/pod{UID}/crio-{ID}")),
        ),
        case(
            "cri-o systemd v2",
            format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope\n"),
            Some(ID),
            Some(UID),
            Some(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
            )),
        ),
        // The conmon monitor is in the pod but is not the container.
        case(
            "cri-o conmon",
            format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope\n"),
            None,
            Some(UID),
            Some(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope"
            )),
        ),
        // containerd on a cgroup v1 host with the systemd driver: the leaf is
        // `slice:runtime:id` in every controller's hierarchy.
        case(
            "containerd systemd v1",
            [
                format!("12:cpuset:/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"),
                format!("11:cpu,cpuacct:/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"),
                format!("4:memory:/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"),
                "1:name=systemd:/system.slice/containerd.service".to_owned(),
            ]
            .join("\n")
                + "\n",
            Some(ID),
            Some(UID),
            None,
        ),
        // Docker, cgroupfs driver, cgroup v1 (a full file).
        case(
            "docker cgroupfs v1",
            [
                "12:pids:/docker/ID",
                "11:hugetlb:/docker/ID",
                "10:net_cls,net_prio:/docker/ID",
                "9:perf_event:/docker/ID",
                "8:blkio:/docker/ID",
                "7:freezer:/docker/ID",
                "6:devices:/docker/ID",
                "5:memory:/docker/ID",
                "4:cpuset:/docker/ID",
                "3:cpu,cpuacct:/docker/ID",
                "2:rdma:/",
                "1:name=systemd:/docker/ID",
                "0::/system.slice/containerd.service",
            ]
            .join("\n")
            .replace("ID", ID)
                + "\n",
            Some(ID),
            None,
            Some("/system.slice/containerd.service"),
        ),
        // Docker, systemd driver, cgroup v2; the entrypoint moved itself to a
        // child cgroup (`init`), as docker-in-docker images do.
        case(
            "docker systemd v2 nested",
            format!("0::/system.slice/docker-{ID}.scope/init\n"),
            Some(ID),
            None,
            Some(&format!("/system.slice/docker-{ID}.scope/init")),
        ),
        // Podman (root) on cgroup v2, and its conmon.
        case(
            "podman v2",
            format!("0::/machine.slice/libpod-{ID}.scope/container\n"),
            Some(ID),
            None,
            Some(&format!("/machine.slice/libpod-{ID}.scope/container")),
        ),
        case(
            "podman conmon",
            format!("0::/machine.slice/libpod-conmon-{ID}.scope\n"),
            None,
            None,
            Some(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
        ),
        // Rootless podman under the user's systemd.
        case(
            "podman rootless",
            format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope\n"),
            Some(ID),
            None,
            Some(&format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope")),
        ),
        // A hybrid host (v1 controllers, v2 at /sys/fs/cgroup/unified) as
        // systemd sets it up: the `0::` line is the unified hierarchy.
        case(
            "hybrid systemd host session",
            [
                "12:memory:/user.slice/user-0.slice/session-3.scope",
                "11:pids:/user.slice/user-0.slice/session-3.scope",
                "3:cpu,cpuacct:/user.slice",
                "1:name=systemd:/user.slice/user-0.slice/session-3.scope",
                "0::/user.slice/user-0.slice/session-3.scope",
            ]
            .join("\n")
                + "\n",
            None,
            None,
            Some("/user.slice/user-0.slice/session-3.scope"),
        ),
        case(
            "hybrid kubelet pod",
            [
                format!("11:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                format!("1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                format!("0::{k8s_systemd_v2}"),
            ]
            .join("\n")
                + "\n",
            Some(ID),
            Some(UID),
            Some(&k8s_systemd_v2),
        ),
        // Host processes.
        case("systemd service", "0::/system.slice/sshd.service\n".into(), None, None, Some("/system.slice/sshd.service")),
        case("root cgroup", "0::/\n".into(), None, None, Some("/")),
        case("init.scope", "0::/init.scope\n".into(), None, None, Some("/init.scope")),
        case("empty", String::new(), None, None, None),
        // Kernel threads of a v1-only host list no `0::` line.
        case("v1 only", "1:name=systemd:/\n".into(), None, None, None),
        // Lookalikes that are neither ids nor uids.
        case(
            "uppercase id",
            format!("0::/docker/{}\n", ID.to_uppercase()),
            None,
            None,
            Some(&format!("/docker/{}", ID.to_uppercase())),
        ),
        case("short id", "0::/docker/abc123\n".into(), None, None, Some("/docker/abc123")),
        case("podcast.service", "0::/system.slice/podcast.service\n".into(), None, None, Some("/system.slice/podcast.service")),
        case(
            "kubepods QoS slice only",
            "0::/kubepods.slice/kubepods-burstable.slice\n".into(),
            None,
            None,
            Some("/kubepods.slice/kubepods-burstable.slice"),
        ),
    ]
}

#[test]
fn corpus_of_runtime_layouts() {
    for c in corpus() {
        let info = CgroupInfo::parse(&c.text);
        assert_eq!(info.container_id.as_deref(), c.container, "container id of {}: {}", c.what, c.text);
        assert_eq!(info.pod_uid.as_deref(), c.pod, "pod uid of {}: {}", c.what, c.text);
        assert_eq!(info.unified_path, c.unified, "v2 path of {}: {}", c.what, c.text);
    }
}

#[test]
fn pod_uids_come_out_dashed_and_lowercase() {
    let text = format!("0::/kubepods.slice/kubepods-pod{}.slice/x\n", UID_.to_uppercase());
    assert_eq!(pod_uid(&text).as_deref(), Some(UID));
}

proptest! {
    #[test]
    fn never_panics(s in "\\PC*") {
        let _ = CgroupInfo::parse(&s);
    }

    #[test]
    fn never_panics_on_cgroup_shaped_lines(
        lines in prop::collection::vec(("[0-9]{1,2}", "[a-z,=_]{0,12}", "(/[a-zA-Z0-9._:@-]{0,70}){0,6}"), 0..6)
    ) {
        let text: String = lines.iter().map(|(h, c, p)| format!("{h}:{c}:{p}\n")).collect();
        let _ = CgroupInfo::parse(&text);
    }

    #[test]
    fn finds_the_ids_under_any_prefix(prefix in "(/[a-z0-9._-]{1,12}){0,4}", systemd: bool) {
        let text = if systemd {
            format!("0::{prefix}/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n")
        } else {
            format!("0::{prefix}/pod{UID}/{ID}\n")
        };
        let info = CgroupInfo::parse(&text);
        prop_assert_eq!(info.container_id.as_deref(), Some(ID));
        prop_assert_eq!(info.pod_uid.as_deref(), Some(UID));
    }
}
