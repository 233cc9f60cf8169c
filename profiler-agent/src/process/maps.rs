//! Parser for `/proc/PID/maps`. The file is written by the kernel but names
//! come from user space (a path may contain spaces, or end in ` (deleted)`),
//! so the parser never panics and skips lines it cannot read.

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    pub executable: bool,
    /// The path or pseudo-name (`[vdso]`, `[heap]`); empty for anonymous memory.
    pub path: String,
    /// The file was deleted after it was mapped.
    pub deleted: bool,
}

impl MapEntry {
    /// Whether this maps a regular file (not anonymous memory or `[vdso]`).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    /// File offset of `addr`, which must lie inside this mapping.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// Parses one line; `None` if it is malformed.
pub fn parse_line(line: &str) -> Option<MapEntry> {
    // Fields are separated by single spaces, except that the path column is
    // padded; split the five fixed fields off first so spaces in paths survive.
    let mut rest = line;
    let mut next = || {
        let rest_trim = rest.trim_start_matches(' ');
        let end = rest_trim.find(' ').unwrap_or(rest_trim.len());
        let (field, tail) = rest_trim.split_at(end);
        rest = tail;
        (!field.is_empty()).then_some(field)
    };
    let range = next()?;
    let perms = next()?;
    let offset = next()?;
    let dev = next()?;
    let inode = next()?;
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end < start || perms.len() != 4 {
        return None;
    }
    let mut path = rest.trim_start_matches(' ').to_owned();
    let deleted = path.ends_with(" (deleted)");
    if deleted {
        path.truncate(path.len() - " (deleted)".len());
    }
    Some(MapEntry {
        start,
        end,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        executable: perms.as_bytes()[2] == b'x',
        path,
        deleted,
    })
}

/// Parses a whole maps file, keeping only executable mappings (the only
/// ones an instruction pointer can be in), sorted by start address.
pub fn parse_executable(text: &str) -> Vec<MapEntry> {
    let mut out: Vec<MapEntry> = text.lines().filter_map(parse_line).filter(|m| m.executable).collect();
    out.sort_by_key(|m| m.start);
    out
}

/// The mapping containing `addr` in a start-sorted list.
pub fn find(maps: &[MapEntry], addr: u64) -> Option<&MapEntry> {
    let i = maps.partition_point(|m| m.start <= addr);
    let m = maps.get(i.checked_sub(1)?)?;
    (addr < m.end).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 fe:01 1311  /usr/bin/cat
55d0c8a02000-55d0c8a07000 r-xp 00002000 fe:01 1311  /usr/bin/cat
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0
7f1e2c228000-7f1e2c3bd000 r-xp 00028000 fe:01 2890                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2c400000-7f1e2c401000 r-xp 00000000 00:2a 77 /tmp/my lib.so (deleted)
7ffd5b5f2000-7ffd5b5f4000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn parses_real_lines() {
        let maps = parse_executable(SAMPLE);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].path, "/usr/bin/cat");
        assert_eq!(maps[0].offset, 0x2000);
        assert_eq!((maps[0].dev_major, maps[0].dev_minor, maps[0].inode), (0xfe, 1, 1311));
        assert_eq!(maps[1].path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(maps[2].path, "/tmp/my lib.so");
        assert!(maps[2].deleted);
        assert_eq!(maps[3].path, "[vdso]");
        assert!(!maps[3].is_file());
    }

    #[test]
    fn finds_the_containing_mapping() {
        let maps = parse_executable(SAMPLE);
        let libc = find(&maps, 0x7f1e2c228010).expect("libc");
        assert_eq!(libc.file_offset(0x7f1e2c228010), 0x28010);
        assert!(find(&maps, 0x7f1e2c3bd000).is_none(), "end is exclusive");
        assert!(find(&maps, 0x10).is_none());
    }

    #[test]
    fn rejects_malformed_lines() {
        for line in ["", "zzzz-1 r-xp 0 0:0 0", "10-5 r-xp 0 00:00 0 /x", "1-2 rx 0 00:00 0", "1-2 r-xp 0 0000 0 /x"] {
            assert!(parse_line(line).is_none(), "{line:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(s in "\\PC*") {
            let _ = parse_executable(&s);
        }

        #[test]
        fn round_trips_generated_lines(start in 0u64..1<<47, len in 1u64..1<<30, off in 0u64..1<<40,
                                       inode in 0u64..u64::MAX, path in "(/[a-zA-Z0-9 ._-]{1,20}){1,4}") {
            let line = format!("{:x}-{:x} r-xp {:08x} fe:01 {} {}", start, start + len, off, inode, path);
            let m = parse_line(&line).expect("parses");
            prop_assert_eq!(m.start, start);
            prop_assert_eq!(m.end, start + len);
            prop_assert_eq!(m.offset, off);
            prop_assert_eq!(m.inode, inode);
            prop_assert_eq!(m.path, path.trim_start_matches(' ').to_string());
        }
    }
}
