//! Resident pages of the files the agent reads through mappings, handed
//! back between symbolization passes.
//!
//! The symbolizer (blazesym) keeps every file it parsed mapped until it is
//! evicted, and the unwind table builder maps each file it reads for the
//! time of one build. Pages those mappings touched count in the agent's RSS
//! although they are clean copies of the file: in `cargo xtask bench churn`
//! the debug build of the bench's own driver held 14 MB of an idle daemon's
//! 56 MB, and libc's debug file another 4 MB, long after their addresses
//! were in the symbol cache. Dropping them from our page tables
//! (`MADV_DONTNEED`) costs a later lookup minor faults from the page cache,
//! and the file stays parsed. The page cache itself is left to the kernel,
//! which charges those pages to the agent's cgroup either way: this is about
//! the RSS an operator reads, not the cgroup's page cache. The same bench,
//! 120 s at 2000 processes/s asked: idle RSS 53.8-55.7 -> 37.7 MB, peak
//! 63.6-67.8 -> 48.0 MB, daemon CPU per process spawned 375-388 -> 382 us
//! (the refaults do not show).
//!
//! `MADV_DONTNEED` on memory that is not such a mapping would discard data,
//! so the ranges are chosen strictly: read-only and not executable (blazesym
//! maps shared, the table builder private), of a file outside /dev, /proc
//! and /sys that no executable or writable mapping of this process also
//! maps (which leaves out the agent's own binary and libraries), and with no
//! anonymous (copied-on-write) pages. And an address range read from
//! smaps must still be that mapping when it is released: code that maps a
//! file outside the releasing thread holds [`MAPPING`] for reading from
//! before its `mmap` until after its `munmap`, and the release holds it for
//! writing. blazesym maps and unmaps on the releasing thread only.

use std::sync::RwLock;

/// Held for reading across the life of a file mapping made outside the
/// thread that calls [`release_file_pages`]; see the module docs.
pub static MAPPING: RwLock<()> = RwLock::new(());

/// One range the release may drop, and the pages it had resident.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Releasable {
    pub start: u64,
    pub end: u64,
    pub rss_bytes: u64,
}

/// One mapping of an smaps file, with the fields the choice needs.
struct Mapping {
    start: u64,
    end: u64,
    perms: [u8; 4],
    file: Option<(u32, u32, u64)>,
    rss_kb: u64,
    anonymous_kb: u64,
}

/// The ranges of `smaps` (the text of `/proc/self/smaps`) that may be
/// released, by the rules of the module docs. Malformed text gives fewer
/// ranges, never a wrong one: a mapping whose header or counters cannot be
/// read is skipped, and so is every range of a file that has one.
pub fn releasable(smaps: &str) -> Vec<Releasable> {
    let mut maps: Vec<Mapping> = Vec::new();
    // Files with a mapping that must not be touched, or that could not be read.
    let mut keep: std::collections::HashSet<(u32, u32, u64)> = std::collections::HashSet::new();
    let mut current_ok = false;
    for line in smaps.lines() {
        if let Some(m) = super::maps::parse_line(line) {
            let perms = line.split_ascii_whitespace().nth(1).and_then(|p| <[u8; 4]>::try_from(p.as_bytes()).ok());
            let Some(perms) = perms else {
                current_ok = false;
                continue;
            };
            let special = ["/dev/", "/proc/", "/sys/"].iter().any(|d| m.path.starts_with(d));
            let file = (m.is_file() && !special).then_some((m.dev_major, m.dev_minor, m.inode));
            maps.push(Mapping { start: m.start, end: m.end, perms, file, rss_kb: u64::MAX, anonymous_kb: u64::MAX });
            current_ok = true;
            continue;
        }
        if !current_ok {
            continue;
        }
        let Some(last) = maps.last_mut() else { continue };
        let (slot, rest) = if let Some(rest) = line.strip_prefix("Rss:") {
            (&mut last.rss_kb, rest)
        } else if let Some(rest) = line.strip_prefix("Anonymous:") {
            (&mut last.anonymous_kb, rest)
        } else {
            continue;
        };
        *slot = rest.trim().strip_suffix("kB").and_then(|v| v.trim().parse().ok()).unwrap_or(u64::MAX);
    }
    for m in &maps {
        let Some(file) = m.file else { continue };
        let counted = m.rss_kb != u64::MAX && m.anonymous_kb != u64::MAX;
        let read_only = &m.perms == b"r--p" || &m.perms == b"r--s";
        if !counted || !read_only || m.anonymous_kb != 0 {
            keep.insert(file);
        }
    }
    maps.iter()
        .filter(|m| m.file.is_some_and(|f| !keep.contains(&f)) && m.rss_kb > 0)
        .map(|m| Releasable { start: m.start, end: m.end, rss_bytes: m.rss_kb.saturating_mul(1024) })
        .collect()
}

/// What one release did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Resident bytes of the ranges released, as smaps counted them.
    pub bytes: u64,
    pub ranges: u64,
    /// The release was skipped: a mapping was being read elsewhere.
    pub busy: bool,
}

/// Drops this process's resident pages of read-only file mappings (module
/// docs). Skipped, not waited for, while another thread holds [`MAPPING`]:
/// a table build takes up to a second, and the next pass tries again.
pub fn release_file_pages() -> std::io::Result<Released> {
    release_where(|_| true)
}

/// [`release_file_pages`] for the ranges `pick` accepts (tests release
/// only their own: other tests map files without taking [`MAPPING`]).
fn release_where(pick: impl Fn(&Releasable) -> bool) -> std::io::Result<Released> {
    let Ok(_guard) = MAPPING.try_write() else {
        return Ok(Released { busy: true, ..Released::default() });
    };
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut done = Released::default();
    for r in releasable(&smaps).into_iter().filter(pick) {
        let (Ok(start), Ok(len)) = (usize::try_from(r.start), usize::try_from(r.end - r.start)) else { continue };
        // SAFETY: the range is a whole read-only file mapping with no
        // anonymous pages (chosen from smaps above), and it stays that
        // mapping until the guard drops (module docs): dropping its pages
        // loses nothing, the next access reads them from the file again.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } == 0 {
            done.bytes += r.rss_bytes;
            done.ranges += 1;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Lines as the kernel writes them (6.x), abridged to the fields used.
    const SMAPS: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 fe:01 1311   /usr/bin/agent
Rss:                   8 kB
Anonymous:             0 kB
55d0c8a02000-55d0c8a07000 r-xp 00002000 fe:01 1311   /usr/bin/agent
Rss:                  20 kB
Anonymous:             0 kB
55d0c8a07000-55d0c8a08000 r--p 00007000 fe:01 1311   /usr/bin/agent
Rss:                   4 kB
Anonymous:             4 kB
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0
Rss:                 132 kB
Anonymous:           132 kB
7f1e2c100000-7f1e2c900000 r--s 00000000 fe:01 4242   /usr/lib/debug/.build-id/93/ac61.debug
Rss:                4072 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
7f1e2ca00000-7f1e2cb00000 r--p 00000000 fe:01 5151   /work/target/debug/xtask (deleted)
Rss:                  64 kB
Anonymous:             0 kB
7f1e2cb00000-7f1e2cc00000 r--p 00000000 fe:01 6161   /usr/lib/untouched.so
Rss:                   0 kB
Anonymous:             0 kB
7f1e2cc00000-7f1e2cd00000 r--s 00000000 00:0e 77     anon_inode:bpf-map
Rss:                1024 kB
Anonymous:             0 kB
7f1e2cd00000-7f1e2ce00000 r--p 00000000 00:05 88     /dev/zero
Rss:                  16 kB
Anonymous:             0 kB
7f1e2ce00000-7f1e2cf00000 rw-s 00000000 fe:01 9191   /var/shared.db
Rss:                  16 kB
Anonymous:             0 kB
7f1e2cf00000-7f1e2d000000 r--p 00000000 00:17 99     /sys/bus/pci/devices/0000:00:02.0/resource0
Rss:                  16 kB
Anonymous:             0 kB
";

    #[test]
    fn picks_only_read_only_data_mappings_of_files() {
        let r = releasable(SMAPS);
        assert_eq!(
            r,
            vec![
                Releasable { start: 0x7f1e2c100000, end: 0x7f1e2c900000, rss_bytes: 4072 * 1024 },
                Releasable { start: 0x7f1e2ca00000, end: 0x7f1e2cb00000, rss_bytes: 64 * 1024 },
            ],
            "the agent's own image (executable, relocated), anonymous memory, writable, device and \
             untouched mappings stay"
        );
    }

    #[test]
    fn a_file_whose_counters_are_missing_is_kept_whole() {
        let text = "\
7f1e2c100000-7f1e2c200000 r--p 00000000 fe:01 4242   /usr/lib/a.debug
Rss:                  40 kB
7f1e2c300000-7f1e2c400000 r--p 00000000 fe:01 4242   /usr/lib/a.debug
Rss:                  40 kB
Anonymous:             0 kB
";
        assert_eq!(releasable(text), vec![], "no Anonymous line for one of its mappings");
    }

    /// Maps a file of known bytes with `flags`, touches every page,
    /// releases it, and checks nothing is resident and it reads the same.
    fn release_round_trip(flags: libc::c_int) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let bytes: Vec<u8> = (0..(256 * 4096)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let len = bytes.len();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: a read-only mapping of the file, unmapped below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `len` readable bytes until the munmap.
        let view = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
        assert_eq!(view, &bytes[..]);
        let resident = || {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            releasable(&smaps).iter().find(|r| r.start == p as u64).map(|r| r.rss_bytes)
        };
        assert_eq!(resident(), Some(len as u64), "every page was touched");
        // Other tests' table builds hold MAPPING for a moment at a time.
        let mut done = release_where(|r| r.start == p as u64).unwrap();
        for _ in 0..200 {
            if !done.busy {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            done = release_where(|r| r.start == p as u64).unwrap();
        }
        assert_eq!(done, Released { bytes: len as u64, ranges: 1, busy: false });
        assert_eq!(resident(), None, "no page of it is resident any more");
        assert_eq!(view, &bytes[..], "the pages come back from the file");
        // SAFETY: unmapping exactly what was mapped.
        unsafe { libc::munmap(p, len) };
    }

    #[test]
    fn releases_a_private_mapping_and_it_still_reads_the_same() {
        release_round_trip(libc::MAP_PRIVATE);
    }

    #[test]
    fn releases_a_shared_mapping_as_blazesym_makes_them() {
        release_round_trip(libc::MAP_SHARED);
    }

    #[test]
    fn waits_for_nobody_while_a_mapping_is_in_use() {
        let _reading = MAPPING.read().unwrap();
        let done = release_where(|_| false).unwrap();
        assert!(done.busy);
        assert_eq!(done.bytes, 0);
    }

    proptest! {
        #[test]
        fn never_panics_and_never_picks_a_range_it_did_not_read(s in "(\\PC{0,60}\n){0,30}") {
            for r in releasable(&s) {
                prop_assert!(r.start <= r.end);
                let header = format!("{:x}-{:x} r--", r.start, r.end);
                prop_assert!(s.lines().any(|l| l.starts_with(&header)));
            }
        }

        #[test]
        fn a_writable_or_executable_mapping_protects_its_whole_file(
            perms in "(r-xp|rw-p|rw-s|rwxp|r-xs)", rss in 1u64..1 << 20, inode in 1u64..1 << 40,
        ) {
            let text = format!(
                "1000-2000 r--p 00000000 fe:01 {inode} /usr/lib/x.so\nRss: {rss} kB\nAnonymous: 0 kB\n\
                 2000-3000 {perms} 00001000 fe:01 {inode} /usr/lib/x.so\nRss: {rss} kB\nAnonymous: 0 kB\n"
            );
            prop_assert_eq!(releasable(&text), vec![]);
        }
    }
}
