//! Loading and attaching the embedded eBPF object with aya.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        PerfEvent,
    },
    Ebpf, EbpfLoader,
};
use profiler_common::{Sample, STAT_COUNT};

use super::{BpfError, KernelStats, SampleSource};

/// The eBPF object built by `build.rs` from `profiler-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

const ON_CPU_PROGRAM: &str = "on_cpu_sample";

/// What to load and how to attach it.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Samples per second per CPU.
    pub frequency: u64,
    /// Only these processes (tgids) are sampled; empty means all.
    pub pids: Vec<u32>,
}

/// The loaded and attached programs, and the maps the agent reads.
pub struct EbpfSource {
    // Field order matters for drop: the ring buffer and maps go before the
    // Ebpf that owns the programs' links.
    samples: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ebpf: Ebpf,
}

impl EbpfSource {
    /// Loads the programs, fills the pid filter, and attaches the sampler to
    /// the software cpu-clock event of every online CPU.
    pub fn load(opts: &LoadOptions) -> Result<Self, BpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        let filter: u32 = u32::from(!opts.pids.is_empty());
        let mut ebpf = EbpfLoader::new().override_global("FILTER_PIDS", &filter, true).load(EBPF_OBJECT)?;
        // The programs do not log today; keep the logger when the object has
        // a log map so future diagnostics surface, and keep it alive: dropping
        // it closes the map fd and breaks later loads.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();

        if !opts.pids.is_empty() {
            let map = ebpf.map_mut("TARGET_PIDS").ok_or(BpfError::Missing("TARGET_PIDS"))?;
            let mut targets: HashMap<_, u32, u8> =
                HashMap::try_from(map).map_err(|source| BpfError::Map { name: "TARGET_PIDS", source })?;
            for pid in &opts.pids {
                targets.insert(pid, 1, 0).map_err(|source| BpfError::Map { name: "TARGET_PIDS", source })?;
            }
        }

        let program: &mut PerfEvent = ebpf
            .program_mut(ON_CPU_PROGRAM)
            .ok_or(BpfError::Missing(ON_CPU_PROGRAM))?
            .try_into()
            .map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
        program.load().map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
        let cpus = aya::util::online_cpus().map_err(|(path, e)| BpfError::Cpus(path, e))?;
        for cpu in cpus {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(opts.frequency),
                    false,
                )
                .map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
        }

        let samples = RingBuf::try_from(ebpf.take_map("SAMPLES").ok_or(BpfError::Missing("SAMPLES"))?)
            .map_err(|source| BpfError::Map { name: "SAMPLES", source })?;
        let stats = PerCpuArray::try_from(ebpf.take_map("STATS").ok_or(BpfError::Missing("STATS"))?)
            .map_err(|source| BpfError::Map { name: "STATS", source })?;
        Ok(Self { samples, stats, logger, ebpf })
    }

    fn drain(&mut self, out: &mut Vec<Sample>) -> usize {
        let mut n = 0;
        while let Some(item) = self.samples.next() {
            if item.len() >= std::mem::size_of::<Sample>() {
                // SAFETY: the kernel wrote a whole Sample (size checked);
                // ring buffer records are only 8-byte aligned, hence unaligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Sample>()) });
                n += 1;
            }
        }
        n
    }
}

impl SampleSource for EbpfSource {
    fn poll(&mut self, out: &mut Vec<Sample>, timeout: Duration) -> Result<usize, BpfError> {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
        let n = self.drain(out);
        if n > 0 {
            return Ok(n);
        }
        let mut fds = [libc::pollfd { fd: self.samples.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(BpfError::Poll(err));
            }
        }
        Ok(self.drain(out))
    }

    fn stats(&self) -> Result<KernelStats, BpfError> {
        let mut totals = KernelStats::default();
        for i in 0..STAT_COUNT {
            let per_cpu = self.stats.get(&i, 0).map_err(|source| BpfError::Map { name: "STATS", source })?;
            totals.counts[i as usize] = per_cpu.iter().sum();
        }
        Ok(totals)
    }

    fn run_time(&self) -> Option<(Duration, u64)> {
        let program = self.ebpf.program(ON_CPU_PROGRAM)?;
        let fd = program.fd().ok()?;
        fdinfo_run_time(fd.as_fd().as_raw_fd())
    }
}

/// Reads `run_time_ns`/`run_cnt` from the program fd's fdinfo: present only
/// while `kernel.bpf_stats_enabled` is 1.
fn fdinfo_run_time(fd: i32) -> Option<(Duration, u64)> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let field = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((Duration::from_nanos(field("run_time_ns:")?), field("run_cnt:")?))
}
