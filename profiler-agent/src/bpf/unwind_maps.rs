//! The unwinder's maps, written from the agent's table thread.

use std::{
    os::fd::{AsFd as _, AsRawFd},
    ptr::NonNull,
};

use aya::maps::{HashMap, Map, MapData};
use profiler_common::unwind::{ProcessMappings, UnwindRow};

use super::{BpfError, UnwindMaps};

/// `UNWIND_ROWS` mapped into the agent's memory, and `PROCESSES`.
pub struct EbpfUnwindMaps {
    rows: NonNull<UnwindRow>,
    capacity: u32,
    mapped_bytes: usize,
    // Keeps the array's fd (and so the kernel map) alive while mapped.
    _rows_map: MapData,
    processes: HashMap<MapData, u32, ProcessMappings>,
}

// SAFETY: the mapping is owned by this value and only written through
// `&mut self`; the kernel side reads it concurrently by design (rows are
// only written in ranges no process refers to yet).
unsafe impl Send for EbpfUnwindMaps {}

impl EbpfUnwindMaps {
    pub(super) fn new(rows_map: Map, capacity: u32, processes: Map) -> Result<Self, BpfError> {
        let Map::Array(rows_map) = rows_map else {
            return Err(BpfError::Map {
                name: "UNWIND_ROWS",
                source: aya::maps::MapError::InvalidMapType { map_type: 0 },
            });
        };
        let processes = HashMap::try_from(processes).map_err(|source| BpfError::Map { name: "PROCESSES", source })?;
        let page = 4096usize;
        let bytes = (capacity as usize * std::mem::size_of::<UnwindRow>()).div_ceil(page) * page;
        let fd = rows_map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of a BPF_F_MMAPABLE array of exactly
        // `capacity` 8-byte rows (the kernel rounds the map up to pages).
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(BpfError::Mmap(std::io::Error::last_os_error()));
        }
        let rows = NonNull::new(ptr.cast()).ok_or_else(|| BpfError::Mmap(std::io::Error::other("null mapping")))?;
        Ok(Self { rows, capacity, mapped_bytes: bytes, _rows_map: rows_map, processes })
    }
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
        // SAFETY: in bounds (checked above) of a live mapping we own.
        unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), self.rows.as_ptr().add(start as usize), rows.len()) };
        Ok(())
    }

    fn set_process(&mut self, tgid: u32, mappings: &ProcessMappings) -> Result<(), BpfError> {
        self.processes.insert(tgid, mappings, 0).map_err(|source| BpfError::Map { name: "PROCESSES", source })
    }

    fn remove_process(&mut self, tgid: u32) -> Result<(), BpfError> {
        match self.processes.remove(&tgid) {
            Ok(()) => Ok(()),
            // The kernel forgets a process itself when it execs.
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(BpfError::Map { name: "PROCESSES", source }),
        }
    }
}

impl Drop for EbpfUnwindMaps {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.rows.as_ptr().cast(), self.mapped_bytes) };
    }
}
