use std::{fs, num::NonZeroUsize, path::Path};

use super::*;
use crate::process::ProcessTable;

/// A fake `/proc/PID` whose process sees itself as `ns_pid` and has one
/// anonymous executable mapping at 0x10000.
fn fake(root: &Path, pid: u32, ns_pid: u32, comm: &str) -> PathBuf {
    let dir = root.join(pid.to_string());
    fs::create_dir_all(dir.join("root/tmp")).unwrap();
    fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
    fs::write(dir.join("status"), format!("Name:\t{comm}\nNStgid:\t{pid}\t{ns_pid}\nNSpid:\t{pid}\t{ns_pid}\n"))
        .unwrap();
    fs::write(dir.join("maps"), "10000-20000 rwxp 00000000 00:00 0 \n").unwrap();
    dir.join("root/tmp").join(format!("perf-{ns_pid}.map"))
}

fn info(root: &Path, pid: u32) -> Arc<ProcessInfo> {
    ProcessTable::new(root, NonZeroUsize::new(4).unwrap()).observe(pid, "")
}

#[test]
fn reads_the_map_under_the_pid_the_process_sees() {
    let dir = tempfile::tempdir().unwrap();
    let map = fake(dir.path(), 4242, 7, "node");
    fs::write(&map, "10000 100 JS:*hot /app/w.js:3:13\nnot a line\n").unwrap();
    let mut rt = Runtimes::new(dir.path(), Limits::default());
    rt.observe(&info(dir.path(), 4242));
    let hit = rt.lookup(4242, 0x10040).expect("named");
    assert_eq!((hit.start, hit.symbol.name.as_str(), hit.runtime), (0x10000, "JS:*hot", JitRuntime::V8));
    assert_eq!(hit.symbol.file.as_deref(), Some("/app/w.js"));
    assert!(rt.lookup(4242, 0x10100).is_none());
    let s = rt.stats();
    assert_eq!((s.processes, s.with_map, s.lines, s.malformed_lines), (1, 1, 1, 1));
    assert_eq!(rt.status(4242), Some((JitRuntime::V8, true)));
}

#[test]
fn processes_without_jit_code_are_not_tracked() {
    let dir = tempfile::tempdir().unwrap();
    fake(dir.path(), 5, 5, "cat");
    fs::write(dir.path().join("5/maps"), "").unwrap();
    let mut rt = Runtimes::new(dir.path(), Limits::default());
    rt.observe(&info(dir.path(), 5));
    assert_eq!(rt.stats().processes, 0);
    assert!(rt.lookup(5, 0x10000).is_none());
}

#[test]
fn a_process_without_a_map_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    fake(dir.path(), 9, 9, "java");
    let mut rt = Runtimes::new(dir.path(), Limits::default());
    rt.observe(&info(dir.path(), 9));
    assert_eq!(rt.status(9), Some((JitRuntime::Jvm, false)));
    assert_eq!(rt.stats().read_errors, 0, "a missing map is not an error");
}

#[test]
fn growth_is_picked_up_after_the_refresh_interval() {
    let dir = tempfile::tempdir().unwrap();
    let map = fake(dir.path(), 11, 11, "node");
    fs::write(&map, "10000 10 first\n").unwrap();
    let mut rt = Runtimes::new(dir.path(), Limits::default());
    rt.observe(&info(dir.path(), 11));
    fs::write(&map, "10000 10 first\n10010 10 second\n").unwrap();
    std::thread::sleep(REFRESH + Duration::from_millis(20));
    assert_eq!(rt.lookup(11, 0x10014).unwrap().symbol.name, "second");
    assert_eq!(rt.stats().lines, 2, "only the appended line was parsed again");
}

#[test]
fn names_survive_the_process_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let map = fake(dir.path(), 12, 12, "node");
    fs::write(&map, "10000 10 f\n").unwrap();
    let mut rt = Runtimes::new(dir.path(), Limits::default());
    rt.observe(&info(dir.path(), 12));
    fs::remove_dir_all(dir.path().join("12")).unwrap();
    std::thread::sleep(REFRESH + Duration::from_millis(20));
    assert_eq!(rt.lookup(12, 0x10004).unwrap().symbol.name, "f");
    assert_eq!(rt.stats().read_errors, 0);
}

#[test]
fn memory_is_bounded_per_process_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..2000u64 {
        text.push_str(&format!("{:x} 10 function_number_{i}\n", 0x10000 + i * 0x10));
    }
    for pid in [21, 22, 23] {
        fs::write(fake(dir.path(), pid, pid, "node"), &text).unwrap();
    }
    let limits = Limits { per_process_bytes: 100_000, total_bytes: 150_000, processes: NonZeroUsize::new(8).unwrap() };
    let mut rt = Runtimes::new(dir.path(), limits);
    for pid in [21, 22, 23] {
        rt.observe(&info(dir.path(), pid));
    }
    let s = rt.stats();
    assert!(s.entries_evicted > 3 * 1000, "{s:?}");
    assert!(s.processes_evicted >= 1, "{s:?}");
    assert!(s.bytes <= 150_000, "{s:?}");
    // The newest entries of the latest process survive.
    assert_eq!(rt.lookup(23, 0x10000 + 1999 * 0x10).unwrap().symbol.name, "function_number_1999");
    assert!(rt.lookup(23, 0x10000).is_none(), "the oldest entries went first");
}

#[test]
fn jitdumps_are_found_through_the_mappings() {
    let dir = tempfile::tempdir().unwrap();
    fake(dir.path(), 31, 31, "gen");
    let dump = dir.path().join("31/root/tmp/jit-31.dump");
    let mut bytes = jitdump::write::header(31);
    bytes.extend(jitdump::write::debug_info(0x10000, &[(0x10000, 42, Some("gen.js"))]));
    bytes.extend(jitdump::write::code_load(0x10000, 0x40, "jit_spin"));
    fs::write(&dump, bytes).unwrap();
    fs::write(
        dir.path().join("31/maps"),
        "10000-20000 rwxp 00000000 00:00 0 \n7f0000000000-7f0000001000 r-xp 00000000 fe:01 99 /tmp/jit-31.dump\n",
    )
    .unwrap();
    let mut rt = Runtimes::new(dir.path(), Limits::default());
    rt.observe(&info(dir.path(), 31));
    let hit = rt.lookup(31, 0x10010).expect("named from the jitdump");
    assert_eq!(hit.symbol.name, "jit_spin");
    assert_eq!(hit.symbol.line_at(0x10), (Some(Arc::from("gen.js")), Some(42)));
    assert_eq!(rt.stats().records, 2);
}

#[test]
fn parses_ns_pid() {
    assert_eq!(parse_ns_pid("Name:\tx\nNStgid:\t900\t1\nNSpid:\t900\t1\n"), Some(1));
    assert_eq!(parse_ns_pid("NSpid:\t900\n"), Some(900));
    assert_eq!(parse_ns_pid("Name: x\n"), None);
}
