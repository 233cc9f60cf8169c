//! Perf maps (`/tmp/perf-<pid>.map`): one `START SIZE name` line per JIT
//! function, START and SIZE in hex (HotSpot writes a `0x` prefix, the
//! others do not), the name the rest of the line. The runtime appends as it
//! compiles, so the file is read incrementally: only complete lines past
//! what was read before, and from the start again if it was replaced or
//! truncated.
//!
//! blazesym 0.2 has a reader, but it parses the whole file on every load,
//! rejects the whole file at its first bad line, rejects `0x` addresses (so
//! every HotSpot map) and keeps overlapping entries side by side instead of
//! letting the later one win; hence this one.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
};

use super::{names, table::JitTable};

/// One parsed line.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    pub start: u64,
    pub size: u64,
    pub name: &'a str,
}

/// Parses one line (without its newline); `None` when malformed: missing
/// fields, non-hex numbers, an empty name, a zero size or a range past the
/// end of the address space.
pub fn parse_line(line: &str) -> Option<Line<'_>> {
    let line = line.trim_end_matches('\r');
    let (start, rest) = line.trim_start().split_once([' ', '\t'])?;
    let (size, name) = rest.trim_start().split_once([' ', '\t'])?;
    let (start, size) = (hex(start)?, hex(size)?);
    let name = name.trim();
    if name.is_empty() || size == 0 {
        return None;
    }
    start.checked_add(size)?;
    Some(Line { start, size, name })
}

fn hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    // from_str_radix accepts a leading '+'.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// What one read added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    pub lines: u64,
    pub malformed: u64,
    /// The file was replaced or truncated, so the table was rebuilt.
    pub restarted: bool,
}

/// Bytes read per call at most: a runtime that writes faster than this is
/// caught up over several reads, so no single read stalls the caller.
const MAX_READ: usize = 32 << 20;
/// A line longer than this is skipped as malformed (no runtime writes names
/// anywhere near it).
const MAX_LINE: usize = 64 << 10;

/// An incrementally read perf map.
#[derive(Debug)]
pub struct PerfMapFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
    /// Bytes consumed: the end of the last complete line read.
    offset: u64,
}

impl PerfMapFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path, identity: None, offset: 0 }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Reads the lines appended since the last call into `table`.
    pub fn read_new(&mut self, table: &mut JitTable) -> io::Result<ReadOutcome> {
        let mut file = File::open(&self.path)?;
        let meta = file.metadata()?;
        let identity = (meta.dev(), meta.ino());
        let mut out = ReadOutcome::default();
        if self.identity.is_some_and(|id| id != identity) || meta.len() < self.offset {
            table.clear();
            self.offset = 0;
            out.restarted = true;
        }
        self.identity = Some(identity);
        if meta.len() == self.offset {
            return Ok(out);
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let want = (meta.len() - self.offset).min(MAX_READ as u64) as usize;
        let mut buf = Vec::with_capacity(want);
        file.take(want as u64).read_to_end(&mut buf)?;
        let consumed = apply(&buf, table, &mut out);
        self.offset += consumed as u64;
        Ok(out)
    }
}

/// Adds the complete lines of `buf` to `table`; returns the bytes consumed
/// (up to and including the last newline, or a whole over-long line).
pub fn apply(buf: &[u8], table: &mut JitTable, out: &mut ReadOutcome) -> usize {
    let complete = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        // A partial line: wait for its end, unless it is already too long
        // to be a real one.
        None if buf.len() > MAX_LINE => {
            out.malformed += 1;
            return buf.len();
        }
        None => return 0,
    };
    for raw in buf[..complete].split(|&b| b == b'\n') {
        if raw.is_empty() {
            continue;
        }
        let text = String::from_utf8_lossy(raw);
        match parse_line(&text).filter(|_| raw.len() <= MAX_LINE) {
            Some(l) => {
                table.insert(l.start, l.size, Arc::new(names::symbol(l.name)));
                out.lines += 1;
            }
            None => out.malformed += 1,
        }
    }
    complete
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    #[test]
    fn parses_both_address_styles_and_names_with_spaces() {
        assert_eq!(
            parse_line("3b2c0a4c0 1e8 JS:*hot /tmp/w.js:3:13"),
            Some(Line { start: 0x3b2c0a4c0, size: 0x1e8, name: "JS:*hot /tmp/w.js:3:13" })
        );
        assert_eq!(
            parse_line("0x00007f1c3d00f8a0 0x0000000000000120 LWork;::spin (30 bytes)\r"),
            Some(Line { start: 0x7f1c3d00f8a0, size: 0x120, name: "LWork;::spin (30 bytes)" })
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        for l in
            ["", "123", "zz 10 f", "10 zz f", "10 10", "10 10   ", "10 0 f", "ffffffffffffffff 2 f", "+1 1 f", "0x 1 f"]
        {
            assert_eq!(parse_line(l), None, "{l:?}");
        }
    }

    #[test]
    fn bad_lines_are_skipped_and_counted_not_fatal() {
        let mut t = JitTable::default();
        let mut out = ReadOutcome::default();
        let text = b"1000 10 a\ngarbage\n\xff\xfe 1 x\n2000 10 b\n3000 10 partial";
        let used = apply(text, &mut t, &mut out);
        assert_eq!((out.lines, out.malformed), (2, 2));
        assert_eq!(used, text.len() - "3000 10 partial".len());
        assert_eq!(t.lookup(0x2008).unwrap().1.name, "b");
    }

    #[test]
    fn reads_appends_incrementally_and_restarts_on_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-1.map");
        let mut f = File::create(&path).unwrap();
        write!(f, "1000 10 a\n2000 10 b").unwrap();
        let mut map = PerfMapFile::new(path.clone());
        let mut t = JitTable::default();
        assert_eq!(map.read_new(&mut t).unwrap().lines, 1);
        write!(f, "\n1000 8 a2\n").unwrap();
        let o = map.read_new(&mut t).unwrap();
        assert_eq!((o.lines, o.restarted), (2, false));
        assert_eq!(t.lookup(0x1004).unwrap().1.name, "a2", "the later entry wins");
        assert_eq!(t.lookup(0x100c).unwrap().1.name, "a");
        assert_eq!(map.read_new(&mut t).unwrap(), ReadOutcome::default());
        // Replaced by a shorter file (a new process with the same pid).
        std::fs::write(&path, "5000 10 c\n").unwrap();
        let o = map.read_new(&mut t).unwrap();
        assert!(o.restarted);
        assert_eq!(t.len(), 1);
        assert!(t.lookup(0x1004).is_none());
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut t = JitTable::default();
            let mut out = ReadOutcome::default();
            let used = apply(&bytes, &mut t, &mut out);
            prop_assert!(used <= bytes.len());
        }

        #[test]
        fn round_trips_generated_lines(start in 0u64..1 << 47, size in 1u64..1 << 20, prefix in any::<bool>(),
                                       name in "[!-~][ -~]{0,40}[!-~]") {
            let p = if prefix { "0x" } else { "" };
            let line = format!("{p}{start:x} {p}{size:x} {name}");
            let l = parse_line(&line).expect("parses");
            prop_assert_eq!((l.start, l.size, l.name), (start, size, name.as_str()));
        }
    }
}
