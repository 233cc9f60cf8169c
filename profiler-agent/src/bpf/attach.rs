//! The tracepoint programs the loader attaches, and how: through BTF
//! (`tp_btf`), or through a raw tracepoint when the kernel's BTF does not
//! describe the tracepoint (or the raw path is forced for tests).

use aya::{
    programs::{BtfTracePoint, RawTracePoint},
    Btf, Ebpf,
};

use super::BpfError;

/// Scheduler tracepoints: (tracepoint, BTF program, raw-tracepoint fallback).
pub(super) const SCHED_PROGRAMS: [(&str, &str, &str); 4] = [
    ("sched_switch", "sched_switch", "sched_switch_raw"),
    ("sched_wakeup", "sched_wakeup", "sched_wakeup_raw"),
    ("sched_wakeup_new", "sched_wakeup_new", "sched_wakeup_new_raw"),
    ("sched_process_exit", "sched_process_exit", "sched_process_exit_raw"),
];

/// Process lifecycle events (tracepoint, BTF program, raw fallback); see
/// `profiler-ebpf/src/process.rs`.
pub(super) const LIFECYCLE_PROGRAMS: [(&str, &str, &str); 3] = [
    ("sched_process_fork", "lifecycle_fork", "lifecycle_fork_raw"),
    ("sched_process_exec", "lifecycle_exec", "lifecycle_exec_raw"),
    ("sched_process_exit", "lifecycle_exit", "lifecycle_exit_raw"),
];

/// The unwinder's exec hook (BTF program, raw-tracepoint fallback).
pub(super) const EXEC_BTF: &str = "sched_process_exec";
pub(super) const EXEC_RAW: &str = "sched_process_exec_raw";

/// Attaches a scheduler tracepoint through BTF, or through a raw tracepoint
/// when the kernel's BTF does not describe it.
pub(super) fn attach_sched(
    ebpf: &mut Ebpf,
    btf: &Btf,
    force_raw: bool,
    tracepoint: &'static str,
    btf_name: &'static str,
    raw_name: &'static str,
) -> Result<(), BpfError> {
    let via_btf = (|| -> Result<(), aya::programs::ProgramError> {
        if force_raw {
            return Err(aya::programs::ProgramError::NotLoaded);
        }
        let p: &mut BtfTracePoint =
            ebpf.program_mut(btf_name).ok_or(aya::programs::ProgramError::NotLoaded)?.try_into()?;
        p.load(tracepoint, btf)?;
        p.attach()?;
        Ok(())
    })();
    let Err(btf_error) = via_btf else { return Ok(()) };
    if !force_raw {
        log::info!("attaching tp_btf/{tracepoint} failed ({btf_error}); falling back to raw_tracepoint");
    }
    attach_raw(ebpf, tracepoint, raw_name)
}

pub(super) fn attach_raw(ebpf: &mut Ebpf, tracepoint: &'static str, raw_name: &'static str) -> Result<(), BpfError> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(raw_name)
        .ok_or(BpfError::Missing(raw_name))?
        .try_into()
        .map_err(|source| BpfError::Program { name: raw_name, source })?;
    p.load().map_err(|source| BpfError::Program { name: raw_name, source })?;
    p.attach(tracepoint).map_err(|source| BpfError::Program { name: raw_name, source })?;
    Ok(())
}
