//! The unwinder's maps, written from the agent's table thread.

use std::os::fd::{AsFd as _, AsRawFd};

use aya::maps::{HashMap, Map, MapData};
use profiler_common::unwind::{ProcessMappings, UnwindRow};

use super::{BpfError, UnwindMaps};

/// `UNWIND_ROWS`, written through shared mappings of its pages, and
/// `PROCESSES`.
pub struct EbpfUnwindMaps {
    capacity: u32,
    rows_map: MapData,
    processes: HashMap<MapData, u32, ProcessMappings>,
}

const PAGE: usize = 4096;

impl EbpfUnwindMaps {
    pub(super) fn new(rows_map: Map, capacity: u32, processes: Map) -> Result<Self, BpfError> {
        let Map::Array(rows_map) = rows_map else {
            return Err(BpfError::Map {
                name: "UNWIND_ROWS",
                source: aya::maps::MapError::InvalidMapType { map_type: 0 },
            });
        };
        let processes = HashMap::try_from(processes).map_err(|source| BpfError::Map { name: "PROCESSES", source })?;
        Ok(Self { capacity, rows_map, processes })
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
        if rows.is_empty() {
            return Ok(());
        }
        // Only the pages being written are mapped, and only while written:
        // a mapping kept open would count every table in the agent's RSS.
        let row = std::mem::size_of::<UnwindRow>();
        let first_page = start as usize * row / PAGE;
        let end_byte = end as usize * row;
        let bytes = end_byte.div_ceil(PAGE) * PAGE - first_page * PAGE;
        let fd = self.rows_map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of pages of a BPF_F_MMAPABLE array inside
        // its `capacity` rows (checked above); the kernel allows page offsets.
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
        // SAFETY: the rows lie within the mapped pages; unmapped right after.
        unsafe {
            let dst = ptr.cast::<u8>().add(start as usize * row - first_page * PAGE).cast::<UnwindRow>();
            std::ptr::copy_nonoverlapping(rows.as_ptr(), dst, rows.len());
            libc::munmap(ptr, bytes);
        }
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
