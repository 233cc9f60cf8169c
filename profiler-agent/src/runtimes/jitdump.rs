//! jitdump files (`jit-<pid>.dump`, perf's `jitdump-specification.txt`):
//! a header, then records `{id u32, total_size u32, timestamp u64}` plus a
//! body. `CODE_LOAD` names a function and its address range, `CODE_MOVE`
//! moves one, `DEBUG_INFO` (written just before the load it describes)
//! maps addresses to file and line. The runtime maps the file into its
//! address space so profilers can find it in `/proc/PID/maps`.
//!
//! The file is untrusted input from the profiled process: every length is
//! checked, a record that cannot be framed ends the reading of the file
//! (there is no way to resynchronize), and nothing panics.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
};

use super::table::{JitTable, LineEntry};

pub const MAGIC: u32 = 0x4A69_5444;
pub const HEADER_SIZE: usize = 40;
pub const RECORD_HEADER: usize = 16;
pub const CODE_LOAD: u32 = 0;
pub const CODE_MOVE: u32 = 1;
pub const DEBUG_INFO: u32 = 2;

/// Records bigger than this are treated as corruption (a CODE_LOAD carries
/// the function's machine code; none is near this).
const MAX_RECORD: usize = 16 << 20;
/// Bytes read per call at most, so one read never stalls the caller.
const MAX_READ: usize = 64 << 20;
/// `DEBUG_INFO` records waiting for their `CODE_LOAD`; beyond this the
/// oldest are dropped (a writer that never loads what it describes).
const MAX_PENDING: usize = 4096;
/// Line entries kept per function.
const MAX_LINES: usize = 1 << 16;

/// Why a file stopped being read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DumpError {
    #[error("not a jitdump file (magic {0:#x})")]
    BadMagic(u32),
    #[error("header size {0} is out of range")]
    BadHeader(u32),
    #[error("record at byte {0} has an impossible size {1}")]
    BadRecord(u64, u32),
}

/// What one read added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    pub loads: u64,
    pub moves: u64,
    pub debug_infos: u64,
    /// Records whose body did not parse (skipped), and pending debug infos
    /// dropped.
    pub malformed: u64,
}

/// Parsing state carried between reads.
#[derive(Debug, Default)]
pub struct DumpState {
    /// Byte order differs from ours (the magic reads `DTiJ`).
    swapped: bool,
    header_read: bool,
    pending: HashMap<u64, Vec<LineEntry>>,
    /// Set when the file cannot be framed any further.
    pub broken: Option<DumpError>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    swapped: bool,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.buf.get(self.pos..self.pos.checked_add(N)?)?;
        self.pos += N;
        b.try_into().ok()
    }
    fn u32(&mut self) -> Option<u32> {
        let v = u32::from_le_bytes(self.take()?);
        Some(if self.swapped { v.swap_bytes() } else { v })
    }
    fn u64(&mut self) -> Option<u64> {
        let v = u64::from_le_bytes(self.take()?);
        Some(if self.swapped { v.swap_bytes() } else { v })
    }
    fn cstr(&mut self) -> Option<&[u8]> {
        let rest = self.buf.get(self.pos..)?;
        let n = rest.iter().position(|&b| b == 0)?;
        self.pos += n + 1;
        Some(&rest[..n])
    }
}

/// Parses the header; returns its size (the offset of the first record).
pub fn parse_header(buf: &[u8], state: &mut DumpState) -> Result<Option<usize>, DumpError> {
    let Some(magic) = buf.get(..4) else { return Ok(None) };
    let magic = u32::from_le_bytes(magic.try_into().expect("4 bytes"));
    state.swapped = match magic {
        MAGIC => false,
        m if m.swap_bytes() == MAGIC => true,
        m => return Err(DumpError::BadMagic(m)),
    };
    let mut r = Reader { buf, pos: 8, swapped: state.swapped };
    let Some(size) = r.u32() else { return Ok(None) };
    if (size as usize) < HEADER_SIZE || size as usize > 4096 {
        return Err(DumpError::BadHeader(size));
    }
    if buf.len() < size as usize {
        return Ok(None);
    }
    state.header_read = true;
    Ok(Some(size as usize))
}

/// Applies the complete records at the start of `buf` (which begins at a
/// record boundary, `base` bytes into the file) to `table`; returns the
/// bytes consumed.
pub fn apply_records(
    buf: &[u8],
    base: u64,
    state: &mut DumpState,
    table: &mut JitTable,
    out: &mut ReadOutcome,
) -> usize {
    let mut pos = 0usize;
    while state.broken.is_none() {
        let mut r = Reader { buf, pos, swapped: state.swapped };
        let (Some(id), Some(size)) = (r.u32(), r.u32()) else { break };
        if (size as usize) < RECORD_HEADER || size as usize > MAX_RECORD {
            state.broken = Some(DumpError::BadRecord(base + pos as u64, size));
            break;
        }
        let Some(record) = buf.get(pos..pos + size as usize) else { break };
        let body = Reader { buf: &record[RECORD_HEADER..], pos: 0, swapped: state.swapped };
        let ok = match id {
            CODE_LOAD => code_load(body, state, table).map(|()| out.loads += 1),
            CODE_MOVE => code_move(body, table).map(|()| out.moves += 1),
            DEBUG_INFO => debug_info(body, state, out).map(|()| out.debug_infos += 1),
            // CODE_CLOSE, UNWINDING_INFO and future kinds.
            _ => Some(()),
        };
        if ok.is_none() {
            out.malformed += 1;
        }
        pos += size as usize;
    }
    pos
}

fn code_load(mut r: Reader<'_>, state: &mut DumpState, table: &mut JitTable) -> Option<()> {
    let (_pid, _tid, _vma) = (r.u32()?, r.u32()?, r.u64()?);
    let (addr, size, _index) = (r.u64()?, r.u64()?, r.u64()?);
    let name = String::from_utf8_lossy(r.cstr()?).into_owned();
    if name.is_empty() {
        return None;
    }
    let lines = state.pending.remove(&addr).unwrap_or_default();
    // V8 names carry their location (`JS:*f file:line:col`) here too; the
    // DEBUG_INFO line table, when there is one, is more precise.
    let mut sym = super::names::symbol(&name);
    if let Some(first) = lines.first() {
        sym.file = Some(first.file.clone());
        sym.line = Some(first.line);
    }
    sym.lines = lines.into();
    table.insert(addr, size, Arc::new(sym)).then_some(())
}

fn code_move(mut r: Reader<'_>, table: &mut JitTable) -> Option<()> {
    let (_pid, _tid, _vma) = (r.u32()?, r.u32()?, r.u64()?);
    let (old, new, size) = (r.u64()?, r.u64()?, r.u64()?);
    let (start, sym) = table.lookup(old)?;
    let sym = sym.clone();
    if start != old {
        return None;
    }
    table.insert(new, size, sym).then_some(())
}

fn debug_info(mut r: Reader<'_>, state: &mut DumpState, out: &mut ReadOutcome) -> Option<()> {
    let (addr, n) = (r.u64()?, r.u64()?);
    let mut lines = Vec::with_capacity((n as usize).min(1024));
    let mut prev: Option<Arc<str>> = None;
    for _ in 0..n {
        let (at, line, _discrim) = (r.u64()?, r.u32()?, r.u32()?);
        let name = r.cstr()?;
        // "\xff" repeats the previous entry's file.
        let file = match (name, &prev) {
            ([0xff], Some(p)) => p.clone(),
            _ => Arc::from(String::from_utf8_lossy(name).as_ref()),
        };
        prev = Some(file.clone());
        if lines.len() < MAX_LINES {
            lines.push(LineEntry { offset: at.checked_sub(addr)?, line, file });
        }
    }
    lines.sort_by_key(|l| l.offset);
    if state.pending.len() >= MAX_PENDING {
        out.malformed += state.pending.len() as u64;
        state.pending.clear();
    }
    state.pending.insert(addr, lines);
    Some(())
}

/// An incrementally read jitdump file.
#[derive(Debug)]
pub struct JitDumpFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
    offset: u64,
    state: DumpState,
}

impl JitDumpFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path, identity: None, offset: 0, state: DumpState::default() }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Why the file is no longer read, if it is not.
    pub fn broken(&self) -> Option<&DumpError> {
        self.state.broken.as_ref()
    }

    /// Reads the records appended since the last call into `table`.
    pub fn read_new(&mut self, table: &mut JitTable) -> io::Result<ReadOutcome> {
        let mut out = ReadOutcome::default();
        if self.state.broken.is_some() {
            return Ok(out);
        }
        let mut file = File::open(&self.path)?;
        let meta = file.metadata()?;
        let identity = (meta.dev(), meta.ino());
        if self.identity.is_some_and(|id| id != identity) || meta.len() < self.offset {
            table.clear();
            self.offset = 0;
            self.state = DumpState::default();
        }
        self.identity = Some(identity);
        if meta.len() <= self.offset {
            return Ok(out);
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let want = (meta.len() - self.offset).min(MAX_READ as u64);
        let mut buf = Vec::with_capacity(want as usize);
        file.take(want).read_to_end(&mut buf)?;
        let mut start = 0;
        if !self.state.header_read {
            match parse_header(&buf, &mut self.state) {
                Ok(Some(n)) => start = n,
                Ok(None) => return Ok(out),
                Err(e) => {
                    self.state.broken = Some(e);
                    return Ok(out);
                }
            }
        }
        let used = apply_records(&buf[start..], self.offset + start as u64, &mut self.state, table, &mut out);
        self.offset += (start + used) as u64;
        Ok(out)
    }
}

/// Writes jitdump records to the spec, for tests and benchmarks.
#[cfg(test)]
pub mod write {
    use super::*;

    pub fn header(pid: u32) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [MAGIC, 1, HEADER_SIZE as u32, 62, 0, pid] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b
    }

    fn record(id: u32, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&((RECORD_HEADER + body.len()) as u32).to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(body);
        b
    }

    pub fn code_load(addr: u64, size: u64, name: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        for v in [addr, addr, size, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend(std::iter::repeat_n(0x90u8, size.min(64) as usize));
        record(CODE_LOAD, &body)
    }

    pub fn code_move(old: u64, new: u64, size: u64) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        for v in [new, old, new, size, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        record(CODE_MOVE, &body)
    }

    /// Entries are (address, line, file); a `None` file is written as
    /// `\xff`, "same as the previous entry".
    pub fn debug_info(addr: u64, entries: &[(u64, u32, Option<&str>)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&addr.to_le_bytes());
        body.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (at, line, file) in entries {
            body.extend_from_slice(&at.to_le_bytes());
            body.extend_from_slice(&line.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
            match file {
                Some(f) => body.extend_from_slice(f.as_bytes()),
                None => body.push(0xff),
            }
            body.push(0);
        }
        record(DEBUG_INFO, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::{write, *};
    use proptest::prelude::*;

    fn read_all(bytes: &[u8]) -> (JitTable, ReadOutcome, DumpState) {
        let mut st = DumpState::default();
        let mut t = JitTable::default();
        let mut out = ReadOutcome::default();
        match parse_header(bytes, &mut st) {
            Ok(Some(n)) => {
                apply_records(&bytes[n..], n as u64, &mut st, &mut t, &mut out);
            }
            Ok(None) => {}
            Err(e) => st.broken = Some(e),
        }
        (t, out, st)
    }

    #[test]
    fn loads_moves_and_lines() {
        let mut f = write::header(7);
        f.extend(write::debug_info(0x1000, &[(0x1000, 40, Some("gen.js")), (0x1010, 42, None)]));
        f.extend(write::code_load(0x1000, 0x40, "jit_spin"));
        f.extend(write::code_load(0x2000, 0x40, "JS:*moved /srv/m.js:7:3"));
        f.extend(write::code_move(0x2000, 0x3000, 0x40));
        f.extend(vec![3, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // CODE_CLOSE
        let (t, out, st) = read_all(&f);
        assert!(st.broken.is_none());
        assert_eq!((out.loads, out.moves, out.debug_infos, out.malformed), (2, 1, 1, 0));
        let (start, s) = t.lookup(0x1018).unwrap();
        assert_eq!((start, s.name.as_str()), (0x1000, "jit_spin"));
        let (file, line) = s.line_at(0x18);
        assert_eq!((file.as_deref(), line), (Some("gen.js"), Some(42)), "\\xff repeats the file");
        assert_eq!(s.line_at(0x4).1, Some(40));
        let moved = t.lookup(0x3010).unwrap().1;
        assert_eq!((moved.name.as_str(), moved.file.as_deref(), moved.line), ("JS:*moved", Some("/srv/m.js"), Some(7)));
    }

    #[test]
    fn partial_records_wait_and_bad_ones_stop_the_file() {
        let mut f = write::header(7);
        let load = write::code_load(0x1000, 0x40, "a");
        f.extend(&load[..10]);
        let (t, _, st) = read_all(&f);
        assert!(t.is_empty() && st.broken.is_none());
        let mut f = write::header(7);
        f.extend([0, 0, 0, 0, 4, 0, 0, 0]);
        assert!(matches!(read_all(&f).2.broken, Some(DumpError::BadRecord(40, 4))));
        assert_eq!(
            read_all(b"ELF\x7fxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").2.broken,
            Some(DumpError::BadMagic(0x7f464c45))
        );
    }

    #[test]
    fn reads_a_growing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jit-7.dump");
        let mut bytes = write::header(7);
        bytes.extend(write::code_load(0x1000, 0x40, "a"));
        let b = write::code_load(0x2000, 0x40, "b");
        bytes.extend(&b[..20]);
        std::fs::write(&path, &bytes).unwrap();
        let mut d = JitDumpFile::new(path.clone());
        let mut t = JitTable::default();
        assert_eq!(d.read_new(&mut t).unwrap().loads, 1);
        bytes.extend(&b[20..]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(d.read_new(&mut t).unwrap().loads, 1);
        assert_eq!(t.lookup(0x2001).unwrap().1.name, "b");
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_records(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut f = write::header(1);
            f.extend(tail);
            let _ = read_all(&f);
        }

        #[test]
        fn never_panics_on_mutated_valid_files(flips in proptest::collection::vec((0usize..400, any::<u8>()), 0..8)) {
            let mut f = write::header(1);
            f.extend(write::debug_info(0x1000, &[(0x1000, 1, Some("a.js")), (0x1008, 2, None)]));
            f.extend(write::code_load(0x1000, 0x20, "f"));
            f.extend(write::code_move(0x1000, 0x5000, 0x20));
            for (at, v) in flips {
                if let Some(b) = f.get_mut(at) { *b = v; }
            }
            let _ = read_all(&f);
        }

        #[test]
        fn generated_loads_are_found(funcs in proptest::collection::vec((0u64..1 << 40, 1u64..4096, "[a-z]{1,12}"), 1..20)) {
            let mut f = write::header(1);
            for (addr, size, name) in &funcs {
                f.extend(write::code_load(*addr, *size, name));
            }
            let (t, out, _) = read_all(&f);
            prop_assert_eq!(out.loads, funcs.len() as u64);
            let (addr, _, name) = funcs.last().unwrap();
            prop_assert_eq!(&t.lookup(*addr).unwrap().1.name, name);
        }
    }
}
