//! The kernel's target filter (`profiler-ebpf/src/filter.rs`): allowed
//! tgids, allowed cgroup ids, and the bitmask of cgroup levels to check.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap, Map, MapData};

use super::BpfError;

/// Writes the filter; implemented by the real maps and by [`FakeTargetMaps`].
pub trait TargetMaps: Send {
    fn add_pid(&mut self, tgid: u32) -> Result<(), BpfError>;
    fn remove_pid(&mut self, tgid: u32) -> Result<(), BpfError>;
    fn add_cgroup(&mut self, id: u64) -> Result<(), BpfError>;
    fn remove_cgroup(&mut self, id: u64) -> Result<(), BpfError>;
    /// Bit `n` set: check the ancestor at level `n` (root = 0).
    fn set_levels(&mut self, mask: u64) -> Result<(), BpfError>;
}

/// `TARGET_PIDS`, `TARGET_CGROUPS` and `TARGET_CGROUP_LEVELS`.
pub struct EbpfTargetMaps {
    pids: HashMap<MapData, u32, u8>,
    cgroups: HashMap<MapData, u64, u8>,
    levels: Array<MapData, u64>,
}

impl EbpfTargetMaps {
    pub(super) fn new(pids: Map, cgroups: Map, levels: Map) -> Result<Self, BpfError> {
        Ok(Self {
            pids: HashMap::try_from(pids).map_err(|source| BpfError::Map { name: "TARGET_PIDS", source })?,
            cgroups: HashMap::try_from(cgroups).map_err(|source| BpfError::Map { name: "TARGET_CGROUPS", source })?,
            levels: Array::try_from(levels).map_err(|source| BpfError::Map { name: "TARGET_CGROUP_LEVELS", source })?,
        })
    }
}

impl TargetMaps for EbpfTargetMaps {
    fn add_pid(&mut self, tgid: u32) -> Result<(), BpfError> {
        self.pids.insert(tgid, 1, 0).map_err(|source| BpfError::Map { name: "TARGET_PIDS", source })
    }
    fn remove_pid(&mut self, tgid: u32) -> Result<(), BpfError> {
        match self.pids.remove(&tgid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(BpfError::Map { name: "TARGET_PIDS", source }),
        }
    }
    fn add_cgroup(&mut self, id: u64) -> Result<(), BpfError> {
        self.cgroups.insert(id, 1, 0).map_err(|source| BpfError::Map { name: "TARGET_CGROUPS", source })
    }
    fn remove_cgroup(&mut self, id: u64) -> Result<(), BpfError> {
        match self.cgroups.remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(BpfError::Map { name: "TARGET_CGROUPS", source }),
        }
    }
    fn set_levels(&mut self, mask: u64) -> Result<(), BpfError> {
        self.levels.set(0, mask, 0).map_err(|source| BpfError::Map { name: "TARGET_CGROUP_LEVELS", source })
    }
}

/// The filter in memory, for tests; bounded like the kernel's maps.
#[derive(Debug, Default)]
pub struct FakeTargetMaps {
    pub pids: BTreeSet<u32>,
    pub cgroups: BTreeMap<u64, ()>,
    pub levels: u64,
    /// Capacity of the pid set (0: unbounded).
    pub max_pids: usize,
}

impl TargetMaps for FakeTargetMaps {
    fn add_pid(&mut self, tgid: u32) -> Result<(), BpfError> {
        if self.max_pids > 0 && self.pids.len() >= self.max_pids && !self.pids.contains(&tgid) {
            return Err(BpfError::Map { name: "TARGET_PIDS", source: aya::maps::MapError::KeyNotFound });
        }
        self.pids.insert(tgid);
        Ok(())
    }
    fn remove_pid(&mut self, tgid: u32) -> Result<(), BpfError> {
        self.pids.remove(&tgid);
        Ok(())
    }
    fn add_cgroup(&mut self, id: u64) -> Result<(), BpfError> {
        self.cgroups.insert(id, ());
        Ok(())
    }
    fn remove_cgroup(&mut self, id: u64) -> Result<(), BpfError> {
        self.cgroups.remove(&id);
        Ok(())
    }
    fn set_levels(&mut self, mask: u64) -> Result<(), BpfError> {
        self.levels = mask;
        Ok(())
    }
}
