use super::*;

fn targets(f: impl FnOnce(&mut Targets)) -> Targets {
    let mut t = Targets::default();
    f(&mut t);
    t
}

#[test]
fn cgroups_resolve_to_their_inode_and_level() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("system.slice/web.service");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup.procs"), "").unwrap();
    let t = targets(|t| t.cgroups = vec!["/system.slice//web.service/".into()]);
    let s = Selection::build(&[], &t, Some(root.path()), false).unwrap();
    let ino = std::fs::metadata(&dir).unwrap().ino();
    assert_eq!(s.cgroups, [CgroupTarget { path: "/system.slice/web.service".into(), id: ino, level: 2 }]);
    assert!(s.is_active() && s.needs_maintenance());
}

#[test]
fn bad_selectors_are_named_before_anything_runs() {
    let root = tempfile::tempdir().unwrap();
    let err = |t: Targets, k8s: bool| Selection::build(&[], &t, Some(root.path()), k8s).unwrap_err().to_string();
    let e = err(targets(|t| t.cgroups = vec!["/no/such.slice".into()]), false);
    assert!(e.contains("--cgroup /no/such.slice") && e.contains("No such file"), "{e}");
    let e = err(targets(|t| t.cgroups = vec!["system.slice".into()]), false);
    assert!(e.contains("starting with `/`"), "{e}");
    let e = err(targets(|t| t.cgroups = vec!["/a/../b".into()]), false);
    assert!(e.contains("`..`"), "{e}");
    std::fs::create_dir_all(root.path().join("plain")).unwrap();
    let e = err(targets(|t| t.cgroups = vec!["/plain".into()]), false);
    assert!(e.contains("not a cgroup v2 directory"), "{e}");
    let e = err(targets(|t| t.process_names = vec!["post(gres".into()]), false);
    assert!(e.contains("--process-name post(gres") && e.contains("regular expression"), "{e}");
    let e = err(targets(|t| t.container_ids = vec!["xyz".into()]), false);
    assert!(e.contains("--container-id xyz"), "{e}");
    let e = err(targets(|t| t.namespaces = vec!["Kube_System".into()]), true);
    assert!(e.contains("Kube_System") && e.contains("namespace"), "{e}");
    let e = err(targets(|t| t.pod_selector = Some("app in web".into())), true);
    assert!(e.contains("pod_selector") && e.contains("app in web"), "{e}");
    let e = err(targets(|t| t.namespaces = vec!["shop".into()]), false);
    assert!(e.contains("[kubernetes]"), "{e}");
    let e = Selection::build(&[], &targets(|t| t.cgroups = vec!["/x".into()]), None, false).unwrap_err().to_string();
    assert!(e.contains("cgroup v2"), "{e}");
}

#[test]
fn container_ids_accept_runtime_prefixes_and_short_ids() {
    let id = "3f6c8a1f0b2d4e5f60718293a4b5c6d7e8f9012345678901234567890abcdef0";
    let t = targets(|t| t.container_ids = vec![format!("containerd://{id}"), id[..12].into()]);
    let s = Selection::build(&[], &t, None, false).unwrap();
    assert_eq!(s.container_ids, [id.to_owned(), id[..12].to_owned()]);
    let plain = Selection::build(&[1], &Targets::default(), None, false).unwrap();
    assert!(plain.is_active() && !plain.needs_maintenance(), "a --pid list is fixed at load");
    assert!(!Selection::build(&[], &Targets::default(), None, false).unwrap().is_active());
}
