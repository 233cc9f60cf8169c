use std::{cell::RefCell, collections::BTreeMap};

use super::*;
use crate::runtimes::python::offsets::table;

/// Memory a test lays out: regions by start address.
#[derive(Default)]
pub(crate) struct FakeMemory {
    regions: RefCell<BTreeMap<(u32, u64), Vec<u8>>>,
}

impl FakeMemory {
    pub(crate) fn put(&self, pid: u32, addr: u64, bytes: Vec<u8>) {
        self.regions.borrow_mut().insert((pid, addr), bytes);
    }
}

impl Memory for FakeMemory {
    fn read(&self, pid: u32, addr: u64, buf: &mut [u8]) -> bool {
        let regions = self.regions.borrow();
        let Some(((p, start), bytes)) = regions.range(..=(pid, addr)).next_back() else { return false };
        if *p != pid {
            return false;
        }
        let Some(from) = addr.checked_sub(*start).map(|o| o as usize) else { return false };
        match bytes.get(from..from + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

/// A compact ASCII `str` of 3.11 (data after a 48-byte header).
pub(crate) fn ascii_str(s: &str) -> Vec<u8> {
    let mut b = vec![0u8; 48];
    b[16..24].copy_from_slice(&(s.len() as u64).to_le_bytes());
    b[32..36].copy_from_slice(&((1u32 << 2) | (1 << 5) | (1 << 6)).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
    b.push(0);
    b
}

pub(crate) fn bytes_obj(data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b[16..24].copy_from_slice(&(data.len() as u64).to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// A 3.11 code object at `at` named `qualname` in `file`, first line
/// `first`, with a line table of one-line entries: unit 0 on first+1,
/// units 1-2 on first+3.
pub(crate) fn code_311(mem: &FakeMemory, pid: u32, at: u64, qualname: &str, file: &str, first: i32) {
    let l = table((3, 11)).unwrap().code;
    let (name_at, file_at, lines_at) = (at + 0x1000, at + 0x2000, at + 0x3000);
    let mut h = vec![0u8; 256];
    h[8..16].copy_from_slice(&0xdead_0000u64.to_le_bytes()); // ob_type
    h[l.firstlineno as usize..][..4].copy_from_slice(&first.to_le_bytes());
    h[l.argcount as usize..][..4].copy_from_slice(&2i32.to_le_bytes());
    h[l.qualname.unwrap() as usize..][..8].copy_from_slice(&name_at.to_le_bytes());
    h[l.name as usize..][..8].copy_from_slice(&name_at.to_le_bytes());
    h[l.filename as usize..][..8].copy_from_slice(&file_at.to_le_bytes());
    h[l.linetable as usize..][..8].copy_from_slice(&lines_at.to_le_bytes());
    mem.put(pid, at, h);
    mem.put(pid, name_at, ascii_str(qualname));
    mem.put(pid, file_at, ascii_str(file));
    mem.put(pid, lines_at, bytes_obj(&[0x80 | (11 << 3), 0, 1, 0x80 | (12 << 3) | 1, 0, 1]));
}

#[test]
fn names_file_and_lines_of_a_311_code_object() {
    let mem = FakeMemory::default();
    code_311(&mem, 7, 0x10_0000, "Worker.run", "/srv/app.py", 20);
    let mut cache = CodeCache::new(NonZeroUsize::new(8).unwrap());
    let l = table((3, 11)).unwrap().code;
    let f = cache.frame(&mem, &l, 7, 0x10_0000, 0).unwrap();
    assert_eq!(f, PyFrame { name: "Worker.run".into(), file: "/srv/app.py".into(), first_line: 20, line: Some(21) });
    assert_eq!(cache.frame(&mem, &l, 7, 0x10_0000, 2).unwrap().line, Some(23));
    assert_eq!(cache.frame(&mem, &l, 7, 0x10_0000, 9).unwrap().line, None);
    assert_eq!(cache.stats().misses, 1);
    assert_eq!(cache.stats().hits, 2);
    // Another process at the same address is another object.
    assert!(cache.frame(&mem, &l, 8, 0x10_0000, 0).is_none());
    assert_eq!(cache.stats().unreadable, 1);
}

#[test]
fn a_reused_address_is_read_again_not_misnamed() {
    let mem = FakeMemory::default();
    let l = table((3, 11)).unwrap().code;
    code_311(&mem, 7, 0x10_0000, "old", "/a.py", 1);
    let mut cache = CodeCache::new(NonZeroUsize::new(8).unwrap());
    assert_eq!(cache.frame(&mem, &l, 7, 0x10_0000, 0).unwrap().name, "old");
    // Freed and replaced by another function at the same address.
    code_311(&mem, 7, 0x10_0000, "new", "/a.py", 40);
    assert_eq!(cache.frame(&mem, &l, 7, 0x10_0000, 0).unwrap().name, "new");
    assert_eq!(cache.stats().stale, 1);
}

#[test]
fn names_cached_while_the_process_ran_outlive_it() {
    let mem = FakeMemory::default();
    let l = table((3, 11)).unwrap().code;
    code_311(&mem, 7, 0x10_0000, "job", "/a.py", 1);
    let mut cache = CodeCache::new(NonZeroUsize::new(8).unwrap());
    cache.warm(&mem, &l, 7, 0x10_0000);
    *mem.regions.borrow_mut() = Default::default(); // exited
    assert_eq!(cache.frame(&mem, &l, 7, 0x10_0000, 0).unwrap().name, "job");
    assert!(cache.frame(&mem, &l, 7, 0x20_0000, 0).is_none());
}

#[test]
fn the_cache_is_bounded_and_counts_evictions() {
    let mem = FakeMemory::default();
    let l = table((3, 11)).unwrap().code;
    let mut cache = CodeCache::new(NonZeroUsize::new(2).unwrap());
    for i in 0..5u64 {
        code_311(&mem, 7, 0x10_0000 * (i + 1), &format!("f{i}"), "/a.py", 1);
        assert_eq!(cache.frame(&mem, &l, 7, 0x10_0000 * (i + 1), 0).unwrap().name, format!("f{i}"));
    }
    assert_eq!(cache.stats().evictions, 3);
    cache.forget(7);
    assert_eq!(cache.entries.len(), 0);
}
