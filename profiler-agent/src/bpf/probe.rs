//! Feature probes for `profiler-agent check`: loads the tiny programs of
//! `profiler-ebpf/src/probe.rs` (one kernel feature each) and the agent's
//! own sampler, attaches what must attach, and reports each outcome. Every
//! program and link is released when the probe returns.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::Array,
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        BtfTracePoint, PerfEvent, RawTracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};

use super::{loader::EBPF_OBJECT, BpfError};

/// A kernel feature the agent relies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// Creating the agent's maps (hash, per-CPU array, ring buffer, array).
    Maps,
    /// Loading a perf_event program.
    PerfEventProgram,
    /// `perf_event_open` of the software cpu-clock event and attaching to it.
    PerfEventAttach,
    /// Loading and attaching a tp_btf program on sched_switch.
    TpBtf,
    /// Loading and attaching a raw tracepoint (the tp_btf fallback).
    RawTracepoint,
    /// The ring buffer map and its reserve/submit helpers.
    RingBuffer,
    /// The `bpf_loop` helper (CFI unwinding).
    BpfLoop,
    /// `BPF_F_MMAPABLE` arrays written through an mmap (CFI tables).
    MmapableArray,
    /// The agent's own sampler, with CFI unwinding, passes the verifier.
    Sampler,
}

impl Feature {
    /// Stable name, used as the check's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Maps => "maps",
            Self::PerfEventProgram => "perf_event",
            Self::PerfEventAttach => "perf_event_open",
            Self::TpBtf => "tp_btf",
            Self::RawTracepoint => "raw_tracepoint",
            Self::RingBuffer => "ring_buffer",
            Self::BpfLoop => "bpf_loop",
            Self::MmapableArray => "mmapable_array",
            Self::Sampler => "sampler",
        }
    }
}

/// The outcome of one probe: `Err` holds the kernel's answer.
pub type ProbeResult = (Feature, Result<(), String>);

/// Runs every probe. When the object cannot even be loaded (its maps
/// created), only [`Feature::Maps`] is reported.
pub fn probe_features(btf: Option<&Btf>) -> Vec<ProbeResult> {
    if EBPF_OBJECT.is_empty() {
        return vec![(Feature::Maps, Err(BpfError::NotBuilt.to_string()))];
    }
    let cfi: u32 = 1;
    // Smallest sizes: the probe only needs the maps to exist.
    let loaded = EbpfLoader::new()
        .map_max_entries("SAMPLES", 4096)
        .map_max_entries("UNWIND_ROWS", 1)
        .override_global("CFI_UNWINDING", &cfi, false)
        .load(EBPF_OBJECT);
    let mut ebpf = match loaded {
        Ok(e) => e,
        Err(e) => return vec![(Feature::Maps, Err(error_chain(&e)))],
    };
    let mut out = vec![(Feature::Maps, Ok(()))];
    out.push((Feature::PerfEventProgram, load_perf_event(&mut ebpf, "probe_perf_event")));
    let attach = if out[1].1.is_ok() { attach_perf_event(&mut ebpf) } else { Err("the program did not load".into()) };
    out.push((Feature::PerfEventAttach, attach));
    out.push((
        Feature::TpBtf,
        match btf {
            Some(btf) => tp_btf(&mut ebpf, btf),
            None => Err("no kernel BTF".into()),
        },
    ));
    out.push((Feature::RawTracepoint, raw_tracepoint(&mut ebpf, "probe_raw_tracepoint", true)));
    out.push((Feature::RingBuffer, raw_tracepoint(&mut ebpf, "probe_ring_buffer", false)));
    out.push((Feature::BpfLoop, raw_tracepoint(&mut ebpf, "probe_bpf_loop", false)));
    out.push((Feature::MmapableArray, mmapable_array(&mut ebpf)));
    out.push((Feature::Sampler, load_perf_event(&mut ebpf, "on_cpu_sample")));
    out
}

fn load_perf_event(ebpf: &mut Ebpf, name: &str) -> Result<(), String> {
    let p: &mut PerfEvent = program(ebpf, name)?.try_into().map_err(|e| error_chain(&e))?;
    p.load().map_err(|e| error_chain(&e))
}

/// One CPU, 1 Hz, detached when the object is dropped: enough to prove the
/// event opens and the program attaches.
fn attach_perf_event(ebpf: &mut Ebpf) -> Result<(), String> {
    let p: &mut PerfEvent = program(ebpf, "probe_perf_event")?.try_into().map_err(|e| error_chain(&e))?;
    p.attach(
        PerfEventConfig::Software(SoftwareEvent::CpuClock),
        PerfEventScope::AllProcessesOneCpu { cpu: 0 },
        SamplePolicy::Frequency(1),
        false,
    )
    .map(drop)
    .map_err(|e| error_chain(&e))
}

fn tp_btf(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), String> {
    let p: &mut BtfTracePoint = program(ebpf, "probe_tp_btf")?.try_into().map_err(|e| error_chain(&e))?;
    p.load("sched_switch", btf).map_err(|e| error_chain(&e))?;
    p.attach().map(drop).map_err(|e| error_chain(&e))
}

fn raw_tracepoint(ebpf: &mut Ebpf, name: &str, attach: bool) -> Result<(), String> {
    let p: &mut RawTracePoint = program(ebpf, name)?.try_into().map_err(|e| error_chain(&e))?;
    p.load().map_err(|e| error_chain(&e))?;
    if attach {
        p.attach("sched_switch").map_err(|e| error_chain(&e))?;
    }
    Ok(())
}

/// Loads the program that uses the array, then writes a value through an
/// mmap of the map and reads it back with a map lookup.
fn mmapable_array(ebpf: &mut Ebpf) -> Result<(), String> {
    raw_tracepoint(ebpf, "probe_mmapable_array", false)?;
    let map = ebpf.map("PROBE_MMAP").ok_or("the object has no PROBE_MMAP map")?;
    let aya::maps::Map::Array(data) = map else { return Err("PROBE_MMAP is not an array".into()) };
    let fd = data.fd().as_fd().as_raw_fd();
    let array: Array<_, u64> = Array::try_from(map).map_err(|e| error_chain(&e))?;
    const BYTES: usize = 4096; // the whole array: 512 u64
                               // SAFETY: one shared mapping of the array's single page, unmapped below.
    let ptr =
        unsafe { libc::mmap(std::ptr::null_mut(), BYTES, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(format!("mmap of the array failed: {}", std::io::Error::last_os_error()));
    }
    const MARK: u64 = 0x5052_4f42_4521;
    // SAFETY: index 0 lies inside the mapped page.
    unsafe {
        ptr.cast::<u64>().write_volatile(MARK);
        libc::munmap(ptr, BYTES);
    }
    match array.get(&0, 0) {
        Ok(MARK) => Ok(()),
        Ok(other) => Err(format!("a value written through mmap read back as {other:#x}")),
        Err(e) => Err(error_chain(&e)),
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("the object has no program `{name}`; the agent binary is inconsistent"))
}

/// The error and its causes on one line: aya puts the kernel's errno and
/// the verifier's verdict in the sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    // The verifier log can run to thousands of lines; its last line says why.
    match text.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().as_slice() {
        [] => text,
        [one] => (*one).to_owned(),
        [first, .., last] => format!("{first} ... {last}"),
    }
}
