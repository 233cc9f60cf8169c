//! The unwinder's maps, written from the agent's table thread.

use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd as _, AsRawFd},
};

use aya::maps::{HashMap, Map, MapData};
use profiler_common::{
    python::PyProcess,
    unwind::{Mapping, ProcessEntry, UnwindRow, MAPPING_SLOTS},
};

use super::{BpfError, UnwindMaps};
use crate::unwind::alloc::{Allocator, Range};

/// `UNWIND_ROWS` and `MAPPINGS`, written through short-lived shared
/// mappings of their pages, and `PROCESSES`, which points each process at
/// its range of `MAPPINGS`.
pub struct EbpfUnwindMaps {
    capacity: u32,
    rows: MapData,
    mappings: MapData,
    /// Free and used ranges of `MAPPINGS`, and each process's range.
    mapping_slots: Allocator,
    ranges: StdHashMap<u32, Range>,
    processes: HashMap<MapData, u32, ProcessEntry>,
    /// `PY_PROCESSES`: the CPython walk's record of each Python process.
    python: HashMap<MapData, u32, PyProcess>,
}

const PAGE: usize = 4096;

fn array(map: Map, name: &'static str) -> Result<MapData, BpfError> {
    match map {
        Map::Array(data) => Ok(data),
        _ => Err(BpfError::Map { name, source: aya::maps::MapError::InvalidMapType { map_type: 0 } }),
    }
}

impl EbpfUnwindMaps {
    pub(super) fn new(rows: Map, capacity: u32, mappings: Map, processes: Map, python: Map) -> Result<Self, BpfError> {
        Ok(Self {
            capacity,
            rows: array(rows, "UNWIND_ROWS")?,
            mappings: array(mappings, "MAPPINGS")?,
            mapping_slots: Allocator::new(MAPPING_SLOTS),
            ranges: StdHashMap::new(),
            processes: HashMap::try_from(processes).map_err(|source| BpfError::Map { name: "PROCESSES", source })?,
            python: HashMap::try_from(python).map_err(|source| BpfError::Map { name: "PY_PROCESSES", source })?,
        })
    }
}

/// Writes of at most this many elements go through one
/// `BPF_MAP_UPDATE_BATCH` instead of a mapping. A process's mapping list
/// (a few dozen entries, written on every exec) cost an mmap and a munmap
/// of one page each time, and the munmap a TLB shootdown on every CPU the
/// agent runs on: a fifth of the table thread's time under
/// `cargo xtask bench churn` (perf on the daemon). A table's rows, tens of
/// thousands at once, are still copied through a mapping.
const BATCH_MAX: usize = 512;

/// Cleared when the kernel refuses batch updates (before Linux 5.6), so
/// every write goes through a mapping from then on.
static BATCH_WORKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `items` at indexes `start..` of an array map in one syscall; false when
/// the kernel has no batch updates (the caller then maps the pages).
fn update_batch<T: Copy>(map: &MapData, start: u32, items: &[T]) -> Result<bool, BpfError> {
    let keys: Vec<u32> = (start..).take(items.len()).collect();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: items.as_ptr() as u64,
        count: items.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` points at `count` keys and values that live until the
    // call returns; the kernel copies them in and writes only `count`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // No batch ops for this map type or kernel: map the pages instead.
        Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524 /* ENOTSUPP */) if attr.count == 0 => Ok(false),
        _ => Err(BpfError::ArrayWrite(e)),
    }
}

/// Writes `items` at index `start` of a BPF_F_MMAPABLE array of `T`.
/// Short runs go through one batch update; longer ones map only the pages
/// written, and only while written: a mapping kept open would count every
/// table in the agent's RSS, and one syscall per element would cost ~30k
/// syscalls for libc's table alone.
fn write_array<T: Copy>(map: &MapData, start: u32, items: &[T]) -> Result<(), BpfError> {
    use std::sync::atomic::Ordering::Relaxed;
    if items.is_empty() {
        return Ok(());
    }
    if items.len() <= BATCH_MAX && BATCH_WORKS.load(Relaxed) {
        if update_batch(map, start, items)? {
            return Ok(());
        }
        BATCH_WORKS.store(false, Relaxed);
    }
    let size = std::mem::size_of::<T>();
    let first_page = start as usize * size / PAGE;
    let end_byte = (start as usize + items.len()) * size;
    let bytes = end_byte.div_ceil(PAGE) * PAGE - first_page * PAGE;
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: a shared mapping of whole pages of the array; the caller
    // checked that the elements lie inside it, and the kernel accepts page
    // offsets into array maps.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            (first_page * PAGE) as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(BpfError::Mmap(std::io::Error::last_os_error()));
    }
    // SAFETY: the elements lie within the mapped pages; unmapped right after.
    unsafe {
        let dst = ptr.cast::<u8>().add(start as usize * size - first_page * PAGE).cast::<T>();
        std::ptr::copy_nonoverlapping(items.as_ptr(), dst, items.len());
        libc::munmap(ptr, bytes);
    }
    Ok(())
}

impl UnwindMaps for EbpfUnwindMaps {
    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> Result<(), BpfError> {
        let end = u64::from(start) + rows.len() as u64;
        if end > u64::from(self.capacity) {
            return Err(BpfError::RowsOutOfRange { start: start.into(), end, capacity: self.capacity });
        }
        write_array(&self.rows, start, rows)
    }

    fn set_process(&mut self, tgid: u32, mappings: &[Mapping]) -> Result<(), BpfError> {
        let len = u32::try_from(mappings.len()).unwrap_or(u32::MAX);
        // A new range, then the switch, then the old range freed: the
        // kernel never sees a half-written list.
        let range = self.mapping_slots.alloc(len).ok_or(BpfError::MappingsFull(MAPPING_SLOTS))?;
        write_array(&self.mappings, range.start, mappings)?;
        let entry = ProcessEntry { start: range.start, len };
        self.processes.insert(tgid, entry, 0).map_err(|source| BpfError::Map { name: "PROCESSES", source })?;
        if let Some(old) = self.ranges.insert(tgid, range) {
            self.mapping_slots.free(old);
        }
        Ok(())
    }

    fn remove_process(&mut self, tgid: u32) -> Result<(), BpfError> {
        if let Some(old) = self.ranges.remove(&tgid) {
            self.mapping_slots.free(old);
        }
        match self.processes.remove(&tgid) {
            Ok(()) => Ok(()),
            // The kernel forgets a process itself when it execs.
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(BpfError::Map { name: "PROCESSES", source }),
        }
    }

    fn set_python(&mut self, tgid: u32, record: Option<&PyProcess>) -> Result<(), BpfError> {
        let result = match record {
            Some(r) => self.python.insert(tgid, *r, 0),
            None => self.python.remove(&tgid),
        };
        match result {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            // Full: this process keeps native interpreter frames.
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                log::warn!("pid {tgid}: the Python process map is full; its Python frames stay native");
                Ok(())
            }
            Err(source) => Err(BpfError::Map { name: "PY_PROCESSES", source }),
        }
    }
}
