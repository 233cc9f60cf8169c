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
