//! The task iterator's runs (finding blocked threads, cutting still-blocked
//! ones) and reading the off-CPU aggregate maps.

use std::io::Read;

use aya::{
    maps::{Array, HashMap},
    programs::Iter,
};
use profiler_common::offcpu::{OffCpuKey, OffCpuValue, StackTrace, SCAN_MODE, SCAN_TIME};

use super::{map, map_mut, EbpfSource, TASK_ITER};
use crate::bpf::{BpfError, OffCpuRecord};

impl EbpfSource {
    /// Sets one slot of the `SCAN` array.
    pub(super) fn set_scan(&mut self, slot: u32, value: u64) -> Result<(), BpfError> {
        let mut scan: Array<_, u64> = Array::try_from(self.ebpf.map_mut("SCAN").ok_or(BpfError::Missing("SCAN"))?)
            .map_err(|source| BpfError::Map { name: "SCAN", source })?;
        scan.set(slot, value, 0).map_err(|source| BpfError::Map { name: "SCAN", source })
    }

    /// Runs the task iterator once in `mode`, with `time`.
    pub(super) fn scan(&mut self, mode: u64, time: u64) -> Result<(), BpfError> {
        self.set_scan(SCAN_TIME, time)?;
        self.set_scan(SCAN_MODE, mode)?;
        let p: &mut Iter = self
            .ebpf
            .program_mut(TASK_ITER)
            .ok_or(BpfError::Missing(TASK_ITER))?
            .try_into()
            .map_err(|source| BpfError::Program { name: TASK_ITER, source })?;
        let id = p.attach().map_err(|source| BpfError::Program { name: TASK_ITER, source })?;
        let link = p.take_link(id).map_err(|source| BpfError::Program { name: TASK_ITER, source })?;
        let mut file = link.into_file().map_err(|e| BpfError::Iter(std::io::Error::other(e)))?;
        // Reading runs the program over every task; it writes nothing.
        let mut sink = Vec::new();
        file.read_to_end(&mut sink).map_err(BpfError::Iter)?;
        Ok(())
    }

    /// Reads and clears a map keyed by tid (`BLOCKED_REGS`,
    /// `THREAD_TOTALS`).
    pub(super) fn drain_by_tid<V: aya::Pod>(&mut self, name: &'static str) -> Result<Vec<(u32, V)>, BpfError> {
        let mut m: HashMap<_, u32, V> = map_mut(&mut self.ebpf, name)?;
        let tids: Vec<u32> = m.keys().filter_map(Result::ok).collect();
        let mut out = Vec::with_capacity(tids.len());
        for tid in tids {
            if let Ok(v) = m.get(&tid, 0) {
                out.push((tid, v));
            }
            let _ = m.remove(&tid);
        }
        Ok(out)
    }

    /// Reads and clears an aggregate map (`OFFCPU`, `STILL_BLOCKED`), stacks
    /// resolved.
    pub(super) fn take_aggregate(
        &mut self,
        name: &'static str,
        still_blocked: bool,
    ) -> Result<Vec<OffCpuRecord>, BpfError> {
        let mut entries = Vec::new();
        {
            let mut agg: HashMap<_, OffCpuKey, OffCpuValue> = map_mut(&mut self.ebpf, name)?;
            let keys: Vec<OffCpuKey> = agg.keys().filter_map(Result::ok).collect();
            for key in keys {
                if let Ok(value) = agg.get(&key, 0) {
                    entries.push((key, value));
                }
                let _ = agg.remove(&key);
            }
        }
        // Stacks stay in STACKS: threads still blocked refer to them.
        let stacks: HashMap<_, u64, StackTrace> = map(&self.ebpf, "STACKS")?;
        let stack = |id: u64| -> Vec<u64> {
            if id == 0 {
                return Vec::new();
            }
            stacks.get(&id, 0).map(|s| s.frames().to_vec()).unwrap_or_default()
        };
        Ok(entries
            .into_iter()
            .map(|(key, value)| OffCpuRecord {
                kernel: stack(key.kernel_stack),
                user: stack(key.user_stack),
                key,
                value,
                still_blocked,
            })
            .collect())
    }
}
