use std::collections::HashMap;

use profiler_common::unwind::{UnwindRow, ROW_CFA_RSP};

use super::*;
use crate::bpf::fake::FakeUnwindMaps;

/// Tables of `rows` rows per file path; counts builds.
#[derive(Default)]
struct Tables {
    sizes: HashMap<String, usize>,
    builds: Vec<String>,
}

impl TableSource for &mut Tables {
    fn file_size(&mut self, _tgid: u32, m: &MapEntry) -> Option<u64> {
        // Paths naming "big" stand for files over the background limit.
        m.path.contains("big").then_some(BACKGROUND_MAX_FILE + 1)
    }

    fn build(&mut self, _tgid: u32, m: &MapEntry) -> Result<UnwindTable, TableError> {
        self.builds.push(m.path.clone());
        let Some(&n) = self.sizes.get(&m.path) else {
            return Err(TableError::Io(std::io::Error::other("no such file")));
        };
        let rows = (0..n).map(|i| UnwindRow { pc: i as u32 * 16, cfa_offset: 8, rbp_offset: 0, kind: ROW_CFA_RSP });
        Ok(UnwindTable {
            base: 0x1000,
            rows: rows.collect(),
            exec_segments: vec![Segment { offset: 0x1000, vaddr: 0x1000, filesz: 0x10000 }],
            stats: Default::default(),
        })
    }
}

/// Processes as (start time, mappings); removing one makes it exit.
#[derive(Default)]
struct Procs(HashMap<u32, (u64, Vec<MapEntry>)>);

impl ProcessReader for &mut Procs {
    fn read(&mut self, tgid: u32) -> Option<(u64, Vec<MapEntry>)> {
        self.0.get(&tgid).cloned()
    }
    fn start_time(&mut self, tgid: u32) -> Option<u64> {
        self.0.get(&tgid).map(|p| p.0)
    }
}

fn file(start: u64, path: &str, inode: u64) -> MapEntry {
    MapEntry {
        start,
        end: start + 0x10000,
        offset: 0x1000,
        dev_major: 8,
        dev_minor: 1,
        inode,
        executable: true,
        path: path.into(),
        deleted: false,
    }
}

fn libc(start: u64) -> MapEntry {
    file(start, "/lib/libc.so.6", 2)
}

#[test]
fn one_table_per_file_shared_by_processes_and_freed_with_the_last() {
    let mut tables = Tables::default();
    tables.sizes.insert("/bin/a".into(), 100);
    tables.sizes.insert("/bin/b".into(), 50);
    tables.sizes.insert("/lib/libc.so.6".into(), 1000);
    let mut procs = Procs::default();
    procs.0.insert(10, (1, vec![file(0x40_0000, "/bin/a", 1), libc(0x7f00_0000)]));
    procs.0.insert(11, (1, vec![file(0x50_0000, "/bin/b", 3), libc(0x7e00_0000)]));
    let mut maps = FakeUnwindMaps::new(10_000);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.seen(10).unwrap();
    r.seen(11).unwrap();
    r.seen(10).unwrap(); // known: no rebuild
    let s = r.stats();
    // Each table also carries its page index: 2 slots for a table within
    // one 4 KiB page, 5 for libc's 1000 rows 16 bytes apart (4 pages).
    assert_eq!((s.tables, s.rows, s.processes), (3, 102 + 52 + 1005, 2));
    assert_eq!(s.table_bytes, (102 + 52 + 1005) * 8);

    // Both processes point at the same libc rows, each with its own bias.
    let a = r.maps.processes[&10][1];
    let b = r.maps.processes[&11][1];
    assert_eq!((a.rows_start, a.rows_len), (b.rows_start, b.rows_len));
    // A pc at vaddr 0x1010 of libc maps to row pc 0x10 (base 0x1000).
    assert_eq!(0x7f00_0000 + 0x10 - a.bias, 0x10);
    assert_eq!(0x7e00_0000 + 0x10 - b.bias, 0x10);
    assert_eq!(r.maps.rows[a.rows_start as usize + 1].pc, 16);
    // libc's index follows its rows: slot 1 is the row covering 0x1000.
    assert_eq!((a.rows_len, a.index_start, a.index_len), (1000, a.rows_start + 1000, 5));
    assert_eq!(r.maps.rows[a.index_start as usize + 1].pc, 0x1000 / 16);

    // Process 10 exits: its executable's table goes, libc stays for 11.
    r.procs_from.0.remove(&10);
    r.sweep().unwrap();
    let s = r.stats();
    assert_eq!((s.tables, s.rows, s.processes), (2, 52 + 1005, 1));
    assert!(!r.maps.processes.contains_key(&10));
    drop(r);
    assert_eq!(tables.builds, ["/bin/a", "/lib/libc.so.6", "/bin/b"]);
}

#[test]
fn exited_and_reused_pids_release_their_tables() {
    let mut tables = Tables::default();
    tables.sizes.insert("/bin/a".into(), 10);
    tables.sizes.insert("/lib/libc.so.6".into(), 20);
    let mut procs = Procs::default();
    procs.0.insert(10, (1, vec![file(0x40_0000, "/bin/a", 1), libc(0x7f00_0000)]));
    let mut maps = FakeUnwindMaps::new(100);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.seen(10).unwrap();
    assert_eq!(r.stats().rows, 12 + 22);
    // Same pid, new process (different start time) mapping only libc.
    r.procs_from.0.insert(10, (2, vec![libc(0x7f00_0000)]));
    r.sweep().unwrap();
    assert_eq!(r.stats().processes, 0);
    assert_eq!(r.stats().rows, 0);
    assert!(r.maps.processes.is_empty());
    r.seen(10).unwrap();
    assert_eq!(r.stats().rows, 22);
}

#[test]
fn refresh_picks_up_dlopened_files_and_drops_unmapped_ones() {
    let mut tables = Tables::default();
    tables.sizes.insert("/bin/a".into(), 10);
    tables.sizes.insert("/lib/plugin.so".into(), 5);
    let mut procs = Procs::default();
    procs.0.insert(10, (1, vec![file(0x40_0000, "/bin/a", 1)]));
    let mut maps = FakeUnwindMaps::new(100);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.load(10).unwrap();
    r.procs_from.0.get_mut(&10).unwrap().1.push(file(0x7000_0000, "/lib/plugin.so", 9));
    r.load(10).unwrap();
    assert_eq!(r.stats().rows, 12 + 7);
    assert_eq!(r.maps.processes[&10].len(), 2);
    r.procs_from.0.get_mut(&10).unwrap().1.truncate(1);
    r.load(10).unwrap();
    assert_eq!(r.stats().rows, 12);
}

#[test]
fn eviction_keeps_the_budget_and_points_users_away_from_reused_rows() {
    let mut tables = Tables::default();
    for (p, n) in [("/bin/a", 40), ("/bin/b", 40), ("/bin/c", 40)] {
        tables.sizes.insert(p.into(), n);
    }
    let mut procs = Procs::default();
    procs.0.insert(1, (1, vec![file(0x40_0000, "/bin/a", 1)]));
    procs.0.insert(2, (1, vec![file(0x40_0000, "/bin/b", 2)]));
    procs.0.insert(3, (1, vec![file(0x40_0000, "/bin/c", 3)]));
    let mut maps = FakeUnwindMaps::new(100);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.seen(1).unwrap();
    r.seen(2).unwrap();
    r.seen(1).unwrap(); // a is now more recent than b
    r.seen(3).unwrap(); // does not fit: b (least recently used) goes
    let s = r.stats();
    assert_eq!((s.rows, s.evicted, s.tables), (84, 1, 2));
    assert_eq!(r.maps.processes[&2][0].rows_len, 0, "b's process must not use freed rows");
    assert_ne!(r.maps.processes[&1][0].rows_len, 0);
    assert_ne!(r.maps.processes[&3][0].rows_len, 0);
}

#[test]
fn files_without_cfi_are_tried_once_and_anonymous_code_has_no_table() {
    let mut tables = Tables::default();
    let mut procs = Procs::default();
    let mut jit = file(0x1000_0000, "", 0);
    jit.dev_major = 0;
    procs.0.insert(1, (1, vec![file(0x40_0000, "/bin/go", 1), jit]));
    procs.0.insert(2, (1, vec![file(0x40_0000, "/bin/go", 1)]));
    let mut maps = FakeUnwindMaps::new(100);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.seen(1).unwrap();
    r.seen(2).unwrap();
    assert_eq!(r.stats().build_errors, 1);
    let m = r.maps.processes[&1].to_vec();
    assert_eq!(m.len(), 2, "JIT code is a known mapping (so it does not ask for refreshes)");
    assert!(m.iter().all(|m| m.rows_len == 0));
    drop(r);
    assert_eq!(tables.builds, ["/bin/go"]);
}

#[test]
fn a_table_larger_than_the_budget_is_not_loaded() {
    let mut tables = Tables::default();
    tables.sizes.insert("/bin/huge".into(), 500);
    let mut procs = Procs::default();
    procs.0.insert(1, (1, vec![file(0x40_0000, "/bin/huge", 1)]));
    let mut maps = FakeUnwindMaps::new(100);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.seen(1).unwrap();
    assert_eq!((r.stats().rows, r.stats().too_big), (0, 1));
    assert_eq!(r.maps.processes[&1][0].rows_len, 0);
}

#[test]
fn vaddr_of_handles_page_rounded_mapping_offsets() {
    // lld-style layout: the text segment's p_offset is not page aligned, so
    // the kernel maps from the page below it.
    let segs = [Segment { offset: 0x1a40, vaddr: 0x2a40, filesz: 0x5000 }];
    assert_eq!(vaddr_of(&segs, 0x1000), Some(0x2000));
    assert_eq!(vaddr_of(&segs, 0x1a40), Some(0x2a40));
    assert_eq!(vaddr_of(&segs, 0x0), None, "a page further down is another segment");
    assert_eq!(vaddr_of(&segs, 0x7000), None);
}

#[test]
fn fork_copies_the_parents_mappings_exec_reloads_and_exit_frees() {
    let mut tables = Tables::default();
    tables.sizes.insert("/bin/sh".into(), 10);
    tables.sizes.insert("/bin/burn".into(), 30);
    tables.sizes.insert("/lib/libc.so.6".into(), 20);
    let mut procs = Procs::default();
    procs.0.insert(10, (1, vec![file(0x40_0000, "/bin/sh", 1), libc(0x7f00_0000)]));
    // The child's /proc entry already shows its post-exec image: the fork
    // must not read it, and the exec must.
    procs.0.insert(11, (5, vec![file(0x50_0000, "/bin/burn", 4), libc(0x7e00_0000)]));
    let mut maps = FakeUnwindMaps::new(1000);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.fork(11, 10).unwrap();
    assert_eq!(r.stats().processes, 0, "an unknown parent is not loaded for its child");
    r.seen(10).unwrap();
    r.fork(11, 10).unwrap();
    assert_eq!(r.stats().processes, 2);
    assert_eq!(r.maps.processes[&11], r.maps.processes[&10], "the child maps the parent's image");
    // The exec comes right after the fork: no refresh rate limit applies.
    r.exec(11).unwrap();
    assert_eq!(r.maps.processes[&11][0].start, 0x50_0000);
    assert_eq!(r.stats().rows, 12 + 32 + 22);
    // Exit frees the child's own table at once, without a sweep.
    r.exited(11).unwrap();
    assert!(!r.maps.processes.contains_key(&11));
    assert_eq!(r.stats().rows, 12 + 22);
    assert_eq!(r.stats().processes, 1);
    r.exited(10).unwrap();
    assert_eq!((r.stats().rows, r.stats().tables), (0, 0), "no stale tables");
    assert!(r.maps.processes.is_empty());
}

#[test]
fn fork_of_a_child_already_gone_adds_nothing() {
    let mut tables = Tables::default();
    tables.sizes.insert("/bin/sh".into(), 10);
    let mut procs = Procs::default();
    procs.0.insert(10, (1, vec![file(0x40_0000, "/bin/sh", 1)]));
    let mut maps = FakeUnwindMaps::new(1000);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.seen(10).unwrap();
    r.fork(12, 10).unwrap();
    assert_eq!(r.stats().processes, 1);
    assert!(!r.maps.processes.contains_key(&12));
}

#[test]
fn background_loads_defer_what_does_not_fit_instead_of_evicting() {
    let mut tables = Tables::default();
    for (p, n) in [("/bin/a", 40), ("/bin/b", 40), ("/bin/c", 40)] {
        tables.sizes.insert(p.into(), n);
    }
    let mut procs = Procs::default();
    procs.0.insert(1, (1, vec![file(0x40_0000, "/bin/a", 1)]));
    procs.0.insert(2, (1, vec![file(0x40_0000, "/bin/b", 2)]));
    procs.0.insert(3, (1, vec![file(0x40_0000, "/bin/c", 3)]));
    let mut maps = FakeUnwindMaps::new(100);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.seen(1).unwrap();
    r.load_without_evicting(2).unwrap();
    r.load_without_evicting(3).unwrap(); // does not fit: deferred, a and b stay
    let s = r.stats();
    assert_eq!((s.evicted, s.tables, s.too_big), (0, 2, 0));
    assert!(!r.maps.processes.contains_key(&3), "c stays unknown, so the kernel announces it");
    // Seen (it blocks or is sampled): loaded now, evicting the least used.
    r.seen(3).unwrap();
    let s = r.stats();
    assert_eq!((s.evicted, s.tables), (1, 2));
    assert_ne!(r.maps.processes[&3][0].rows_len, 0);
}

#[test]
fn background_loads_leave_big_files_to_first_sight() {
    let mut tables = Tables::default();
    tables.sizes.insert("/bin/big".into(), 10);
    let mut procs = Procs::default();
    procs.0.insert(1, (1, vec![file(0x40_0000, "/bin/big", 1)]));
    let mut maps = FakeUnwindMaps::new(100);
    let mut r = Registry::new(&mut maps, &mut tables, &mut procs);
    r.load_without_evicting(1).unwrap();
    assert_eq!(r.stats().tables, 0);
    assert!(!r.maps.processes.contains_key(&1));
    r.seen(1).unwrap();
    assert_eq!(r.stats().tables, 1);
    assert_eq!(tables.builds, ["/bin/big"], "built once, when seen");
}

/// Python records by path: "/bin/python3.11" is an interpreter, "/bin/python3.99"
/// an unsupported one.
struct PyTables;

impl TableSource for PyTables {
    fn build(&mut self, _tgid: u32, _m: &MapEntry) -> Result<UnwindTable, TableError> {
        Err(TableError::Io(std::io::Error::other("no tables in this test")))
    }

    fn python(&mut self, _tgid: u32, mappings: &[MapEntry]) -> Result<Option<PyProcess>, Unsupported> {
        if mappings.iter().any(|m| m.path == "/bin/python3.99") {
            return Err(Unsupported::Version(3, 99));
        }
        Ok(mappings.iter().find(|m| m.path == "/bin/python3.11").map(|m| PyProcess {
            eval_start: m.start,
            eval_end: m.end,
            version: 0x030b,
            ..Default::default()
        }))
    }
}

#[test]
fn python_records_follow_processes_and_unsupported_ones_are_counted_once() {
    let mut procs = Procs::default();
    procs.0.insert(20, (1, vec![file(0x40_0000, "/bin/python3.11", 5)]));
    procs.0.insert(21, (1, vec![file(0x40_0000, "/bin/python3.99", 6)]));
    procs.0.insert(22, (1, vec![libc(0x7f00_0000)]));
    let mut maps = FakeUnwindMaps::new(1000);
    let mut r = Registry::new(&mut maps, PyTables, &mut procs);
    for tgid in [20, 21, 22] {
        r.seen(tgid).unwrap();
    }
    std::thread::sleep(REFRESH_INTERVAL);
    r.refresh(21).unwrap(); // the same process again: not counted twice
    let s = r.stats();
    assert_eq!((s.python_processes, s.python_unsupported), (1, 1));
    drop(r);
    assert_eq!(maps.python.keys().copied().collect::<Vec<_>>(), [20]);
    assert_eq!(maps.python[&20].version, 0x030b);
}
