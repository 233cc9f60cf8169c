//! Naming Python frames: (code object, instruction index) -> qualified
//! name, file, first line and current line, read from the process.
//!
//! Code objects are cached per (process, address), bounded, least recently
//! used evicted and counted. Addresses are reused once a code object is
//! freed, so every lookup re-reads the object's header (one
//! `process_vm_readv`) and uses the cached names only while the header's
//! identity (type, first line, argument count, flags, name, file and line
//! table pointers) is the same; otherwise the object is read anew.

use std::num::NonZeroUsize;

use crate::bounded::GrowingLru;

use super::{
    lines,
    memory::{i32_at, u32_at, u64_at, Memory},
    offsets::{CodeLayout, LineFormat, BYTES_DATA, BYTES_SIZE, UNICODE_LENGTH, UNICODE_STATE},
};

/// Longest name or file read; longer ones are cut.
const MAX_STRING: usize = 4096;
/// Longest line table read; lines past it are not told.
const MAX_LINETABLE: usize = 64 * 1024;
/// Bytes of a code object's header read per lookup: past every field used.
const HEADER: usize = 144;

/// A named Python frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrame {
    /// `co_qualname` (3.11+), else `co_name`.
    pub name: String,
    pub file: String,
    pub first_line: u32,
    /// The line of the instruction; `None` when the table has none.
    pub line: Option<u32>,
}

/// The fields a cached entry must still match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    ob_type: u64,
    firstlineno: i32,
    argcount: i32,
    flags: i32,
    name: u64,
    filename: u64,
    linetable: u64,
}

struct Code {
    identity: Identity,
    name: String,
    file: String,
    linetable: Vec<u8>,
}

/// Counters for the agent's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NamerStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries dropped to stay within the bound.
    pub evictions: u64,
    /// Entries found stale (the address now holds another object).
    pub stale: u64,
    /// Frames that could not be named (process gone, unreadable object).
    pub unreadable: u64,
}

/// The cache of code objects.
pub struct CodeCache {
    entries: GrowingLru<(u32, u64), Code>,
    stats: NamerStats,
}

impl CodeCache {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self { entries: GrowingLru::new(capacity), stats: NamerStats::default() }
    }

    pub fn stats(&self) -> NamerStats {
        self.stats
    }

    /// Forgets a process's code objects (it exited).
    pub fn forget(&mut self, pid: u32) {
        let keys: Vec<(u32, u64)> = self.entries.iter().filter(|(k, _)| k.0 == pid).map(|(k, _)| *k).collect();
        for k in keys {
            self.entries.pop(&k);
        }
    }

    /// Reads and caches `code` of `pid` unless cached already: called as
    /// samples arrive, so a process that exits before the profile is
    /// written still has its functions named.
    pub fn warm(&mut self, mem: &impl Memory, layout: &CodeLayout, pid: u32, code: u64) {
        if self.entries.contains(&(pid, code)) {
            return;
        }
        let mut header = [0u8; HEADER];
        if !mem.read(pid, code, &mut header) {
            return;
        }
        let identity = identity(&header, layout);
        if let Some(c) = read_code(mem, layout, pid, &header, identity) {
            if self.entries.len() == self.entries.cap().get() {
                self.stats.evictions += 1;
            }
            self.entries.put((pid, code), c);
        }
    }

    /// Names the frame running `code` at `lasti` in process `pid`.
    pub fn frame(
        &mut self,
        mem: &impl Memory,
        layout: &CodeLayout,
        pid: u32,
        code: u64,
        lasti: u64,
    ) -> Option<PyFrame> {
        let mut header = [0u8; HEADER];
        if !mem.read(pid, code, &mut header) {
            // The process exited (its memory cannot have changed since):
            // what was cached while it ran stands.
            let Some(c) = self.entries.get(&(pid, code)) else {
                self.stats.unreadable += 1;
                return None;
            };
            self.stats.hits += 1;
            let identity = c.identity;
            return Some(frame_of(c, layout, identity, lasti));
        }
        let identity = identity(&header, layout);
        match self.entries.get(&(pid, code)) {
            Some(c) if c.identity == identity => self.stats.hits += 1,
            stale => {
                if stale.is_some() {
                    self.stats.stale += 1;
                }
                self.stats.misses += 1;
                let Some(c) = read_code(mem, layout, pid, &header, identity) else {
                    self.stats.unreadable += 1;
                    return None;
                };
                if self.entries.len() == self.entries.cap().get() && !self.entries.contains(&(pid, code)) {
                    self.stats.evictions += 1;
                }
                self.entries.put((pid, code), c);
            }
        }
        let c = self.entries.get(&(pid, code))?;
        Some(frame_of(c, layout, identity, lasti))
    }
}

fn frame_of(c: &Code, layout: &CodeLayout, identity: Identity, lasti: u64) -> PyFrame {
    let line = match layout.line_format {
        LineFormat::Locations311 => lines::location_table_line(&c.linetable, identity.firstlineno, lasti),
        LineFormat::Pairs310 => lines::pairs_310_line(&c.linetable, identity.firstlineno, lasti),
    };
    PyFrame {
        name: c.name.clone(),
        file: c.file.clone(),
        first_line: u32::try_from(identity.firstlineno).unwrap_or(0),
        line,
    }
}

fn identity(h: &[u8], l: &CodeLayout) -> Identity {
    Identity {
        ob_type: u64_at(h, 8),
        firstlineno: i32_at(h, l.firstlineno.into()),
        argcount: i32_at(h, l.argcount.into()),
        flags: i32_at(h, l.flags.into()),
        name: u64_at(h, l.qualname.unwrap_or(l.name).into()),
        filename: u64_at(h, l.filename.into()),
        linetable: u64_at(h, l.linetable.into()),
    }
}

fn read_code(mem: &impl Memory, l: &CodeLayout, pid: u32, h: &[u8], id: Identity) -> Option<Code> {
    let name = read_str(mem, l, pid, id.name)?;
    let file = read_str(mem, l, pid, id.filename)?;
    let linetable = read_bytes(mem, pid, id.linetable).unwrap_or_default();
    let _ = h;
    Some(Code { identity: id, name, file, linetable })
}

/// A `str` object's text. Only compact strings (every identifier and file
/// name the compiler makes) are read.
fn read_str(mem: &impl Memory, l: &CodeLayout, pid: u32, addr: u64) -> Option<String> {
    if addr == 0 {
        return None;
    }
    let mut h = [0u8; 40];
    if !mem.read(pid, addr, &mut h) {
        return None;
    }
    let len = usize::try_from(u64_at(&h, UNICODE_LENGTH as usize)).ok()?.min(MAX_STRING);
    let state = u32_at(&h, UNICODE_STATE as usize);
    // interned:2, kind:3, compact:1, ascii:1 (every version here).
    let (kind, compact, ascii) = ((state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1);
    if compact == 0 {
        return None;
    }
    let (data, width) = if ascii == 1 { (l.ascii_data, 1) } else { (l.compact_data, kind as usize) };
    if !matches!(width, 1 | 2 | 4) {
        return None;
    }
    let mut buf = vec![0u8; len * width];
    if !mem.read(pid, addr + u64::from(data), &mut buf) {
        return None;
    }
    Some(match width {
        1 => buf.iter().map(|&b| char::from(b)).collect(),
        2 => char::decode_utf16(buf.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])))
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
        _ => buf
            .chunks_exact(4)
            .map(|c| {
                char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
    })
}

/// A `bytes` object's contents, up to [`MAX_LINETABLE`].
fn read_bytes(mem: &impl Memory, pid: u32, addr: u64) -> Option<Vec<u8>> {
    if addr == 0 {
        return None;
    }
    let mut h = [0u8; 8];
    if !mem.read(pid, addr + BYTES_SIZE, &mut h) {
        return None;
    }
    let len = usize::try_from(u64::from_le_bytes(h)).ok()?.min(MAX_LINETABLE);
    let mut buf = vec![0u8; len];
    mem.read(pid, addr + BYTES_DATA, &mut buf).then_some(buf)
}

#[cfg(test)]
mod tests;
