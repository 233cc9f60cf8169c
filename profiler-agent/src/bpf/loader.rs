//! Loading and attaching the embedded eBPF object with aya.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        Iter, PerfEvent, Program,
    },
    Btf, Ebpf, EbpfLoader,
};
use profiler_common::{
    offcpu::{
        BlockedRegs, HistKey, Histogram, ProcessHistograms, ProcessNotice, StackTrace, ThreadState, ThreadTotal,
        HIST_OFFCPU, HIST_RUNQ, NOTICE_NO_TABLES, SCAN_CUT, SCAN_FIND_BLOCKED, SCAN_FLUSH, SCAN_WINDOW_END,
        SCAN_WINDOW_START,
    },
    Sample, MAX_STACK_DEPTH, STAT_COUNT,
};

use super::{
    attach::{attach_raw, attach_sched, EXEC_BTF, EXEC_RAW, LIFECYCLE_PROGRAMS, SCHED_PROGRAMS},
    btf::{RqClockOffsets, StructOffsets},
    process_events::EbpfProcessEvents,
    unwind_maps::EbpfUnwindMaps,
    BpfError, KernelStats, MapOccupancy, OffCpuRecord, ProgramRunTime, SampleSource,
};

mod scan;

/// The eBPF object built by `build.rs` from `profiler-ebpf`.
pub(super) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

const ON_CPU_PROGRAM: &str = "on_cpu_sample";
/// The task iterator of the off-CPU scans (start and interval cuts).
const TASK_ITER: &str = "offcpu_tasks";
/// Notices kept between two `take_notices`; beyond it they are dropped
/// (the kernel repeats them every 250 ms while a process has no tables).
const MAX_NOTICES: usize = 4096;

/// What to load and how to attach it.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Samples per second per CPU.
    pub frequency: u64,
    /// Only these processes (tgids) are sampled; empty means all.
    pub pids: Vec<u32>,
    /// Filter even when `pids` is empty: a target selection (`--cgroup`,
    /// `--process-name`, ...) fills the filter maps after load.
    pub targets: bool,
    /// Off-CPU and scheduler-latency tracing, when wanted.
    pub off_cpu: Option<OffCpuOptions>,
    /// CFI unwinding of user stacks; `None` walks frame pointers only.
    pub unwind: Option<UnwindOptions>,
}

/// Options of the CFI unwinder.
#[derive(Clone, Debug)]
pub struct UnwindOptions {
    /// Rows the kernel's table array holds (8 bytes each): the table memory
    /// budget.
    pub rows: u32,
}

/// Options of the scheduler programs.
#[derive(Clone, Debug, Default)]
pub struct OffCpuOptions {
    /// Blocks shorter than this are not recorded.
    pub min_block_ns: u64,
    /// 0 or 1: every block's stacks are taken (exact). N > 1: one block in
    /// N, at random, weighted N; each thread's total stays exact (see
    /// `crate::offcpu::sampled`).
    pub sample_every: u32,
    /// Attach through raw tracepoints even when BTF tracepoints work (to
    /// exercise the fallback used on kernels whose BTF lacks them).
    pub force_raw_tracepoints: bool,
}

/// The loaded and attached programs, and the maps the agent reads.
pub struct EbpfSource {
    // Field order matters for drop: the ring buffer and maps go before the
    // Ebpf that owns the programs' links.
    samples: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ebpf: Ebpf,
    off_cpu: bool,
    /// The cpu-clock links, until `close_window` ends sampling.
    sampling: Vec<aya::programs::perf_event::PerfEventLinkId>,
    /// Processes noticed without unwind tables, until taken.
    notices: Vec<u32>,
    /// Rows of the unwind array while its maps have not been taken.
    unwind_rows: Option<u32>,
    /// What `attach` needs, until it has run.
    pending: Option<Pending>,
}

struct Pending {
    opts: LoadOptions,
    btf: Option<Btf>,
    cpus: Vec<u32>,
}

/// The offset of `thread.fsbase` in `task_struct`, for the CPython walk
/// (profiler-ebpf/src/python.rs), which matches thread states to threads by
/// thread pointer. 0 (the walk off, Python frames stay native) when the
/// kernel's BTF does not tell it.
fn python_fsbase_offset(offsets: Option<&StructOffsets>) -> u32 {
    // For `cargo xtask bench unwind`, which measures the walk's cost
    // against the native walk alone on the same process.
    if std::env::var_os("PROFILER_PYTHON_FRAMES").is_some_and(|v| v == "off") {
        log::info!("PROFILER_PYTHON_FRAMES=off: Python frames stay native");
        return 0;
    }
    let Some(o) = offsets else {
        log::warn!("Python frames stay native: the kernel's BTF could not be read");
        return 0;
    };
    (|| -> Result<u32, BpfError> { Ok(o.offset("task_struct", "thread")? + o.offset("thread_struct", "fsbase")?) })()
        .unwrap_or_else(|e| {
            log::warn!("Python frames stay native: {e}");
            0
        })
}

impl EbpfSource {
    /// Loads the programs and fills the pid filter; [`attach`](Self::attach)
    /// starts them.
    pub fn load(opts: &LoadOptions) -> Result<Self, BpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        let filter: u32 = u32::from(!opts.pids.is_empty() || opts.targets);
        let (mut pid_offset, mut tgid_offset, mut min_block_ns, mut sample_every) = (0u32, 0u32, 0u64, 1u32);
        let (mut state_offset, mut comm_offset) = (0u32, 0u32);
        let mut rq_clock = RqClockOffsets::default();
        // The kernel's BTF is read and its structs parsed once, for the
        // off-CPU, run-queue clock, lifecycle and Python offsets alike;
        // only off-CPU cannot do without them.
        let struct_offsets = fs::read("/sys/kernel/btf/vmlinux").map_err(BpfError::BtfRead).and_then(|data| {
            Ok(StructOffsets::parse(&data, &["task_struct", "thread_struct", "sched_entity", "cfs_rq", "rq"])?)
        });
        let struct_offsets = match struct_offsets {
            Err(e) if opts.off_cpu.is_some() => return Err(e),
            r => r.ok(),
        };
        let btf = match &opts.off_cpu {
            Some(off) => {
                let offsets = struct_offsets.as_ref().ok_or(BpfError::Missing("the kernel's BTF"))?;
                pid_offset = offsets.offset("task_struct", "pid")?;
                tgid_offset = offsets.offset("task_struct", "tgid")?;
                // `__state` since Linux 5.14, `state` before.
                state_offset =
                    offsets.offset("task_struct", "__state").or_else(|_| offsets.offset("task_struct", "state"))?;
                comm_offset = offsets.offset("task_struct", "comm")?;
                rq_clock = RqClockOffsets::find(offsets);
                min_block_ns = off.min_block_ns;
                sample_every = off.sample_every.max(1);
                Some(Btf::from_sys_fs().map_err(|e| BpfError::BtfRead(std::io::Error::other(e)))?)
            }
            None => None,
        };
        // The fork program reads the child's pid and tgid; without BTF it
        // sends no fork events (execs and exits still come).
        let ok_offsets = struct_offsets.as_ref();
        let (lifecycle_pid, lifecycle_tgid) =
            if pid_offset != 0 { (pid_offset, tgid_offset) } else { lifecycle_offsets(ok_offsets) };
        let cpus = aya::util::online_cpus().map_err(|(path, e)| BpfError::Cpus(path, e))?;
        let ring_bytes = ring_buffer_bytes(cpus.len(), opts.frequency);
        let wakeup_bytes = u64::from(ring_bytes / 4);
        let cfi: u32 = u32::from(opts.unwind.is_some());
        let fsbase_offset = if cfi != 0 { python_fsbase_offset(ok_offsets) } else { 0 };
        let unwind_rows = opts.unwind.as_ref().map_or(1, |u| u.rows.max(1));
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("SAMPLES", ring_bytes)
            .map_max_entries("UNWIND_ROWS", unwind_rows)
            .override_global("CFI_UNWINDING", &cfi, true)
            .override_global("SAMPLES_WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("FILTER_PIDS", &filter, true)
            .override_global("TASK_PID_OFFSET", &pid_offset, true)
            .override_global("TASK_TGID_OFFSET", &tgid_offset, true)
            .override_global("MIN_BLOCK_NS", &min_block_ns, true)
            .override_global("SAMPLE_EVERY", &sample_every, true)
            .override_global("TASK_FSBASE_OFFSET", &fsbase_offset, true)
            .override_global("LIFECYCLE_PID_OFFSET", &lifecycle_pid, true)
            .override_global("LIFECYCLE_TGID_OFFSET", &lifecycle_tgid, true)
            .override_global("TASK_STATE_OFFSET", &state_offset, true)
            .override_global("TASK_COMM_OFFSET", &comm_offset, true)
            .override_global("TASK_CFS_RQ_OFFSET", &rq_clock.task_cfs_rq, true)
            .override_global("CFS_RQ_RQ_OFFSET", &rq_clock.cfs_rq_rq, true)
            .override_global("RQ_CLOCK_OFFSET", &rq_clock.rq_clock, true)
            .load(EBPF_OBJECT)?;
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

        let samples = RingBuf::try_from(ebpf.take_map("SAMPLES").ok_or(BpfError::Missing("SAMPLES"))?)
            .map_err(|source| BpfError::Map { name: "SAMPLES", source })?;
        let stats = PerCpuArray::try_from(ebpf.take_map("STATS").ok_or(BpfError::Missing("STATS"))?)
            .map_err(|source| BpfError::Map { name: "STATS", source })?;
        Ok(Self {
            samples,
            stats,
            logger,
            ebpf,
            off_cpu: opts.off_cpu.is_some(),
            sampling: Vec::new(),
            notices: Vec::new(),
            unwind_rows: opts.unwind.as_ref().map(|_| unwind_rows),
            pending: Some(Pending { opts: opts.clone(), btf, cpus }),
        })
    }

    /// Attaches the programs: the tracepoints, then the sampler to the
    /// cpu-clock event of every online CPU. Separate from `load` so the CFI
    /// tables of `--pid` processes are in the kernel before the first
    /// sample. Attaching twice is a no-op.
    ///
    /// Every program is loaded (verified) before the first cpu-clock event
    /// is opened, and the events are opened last: verifying the scheduler
    /// programs takes seconds, and a sampler attached before them recorded
    /// that time (its ring buffer overflowing meanwhile) outside the
    /// window the caller then measured, so on-CPU time came out ~40% over
    /// the thread's schedstat in `offcpu_cleanup::wall_view_adds_on_and_off_cpu_per_thread`.
    pub fn attach(&mut self) -> Result<(), BpfError> {
        let Some(Pending { opts, btf, cpus }) = self.pending.take() else { return Ok(()) };
        let ebpf = &mut self.ebpf;
        {
            let program: &mut PerfEvent = ebpf
                .program_mut(ON_CPU_PROGRAM)
                .ok_or(BpfError::Missing(ON_CPU_PROGRAM))?
                .try_into()
                .map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
            program.load().map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
        }

        // One parsed BTF for every program below: the lifecycle and exec
        // programs need it only through tp_btf (the raw fallback works
        // without), so without off-CPU it is parsed here, once. A parse is
        // ~9 MB of heap; each clone of it used to add as much to the
        // start-up peak that stays in the allocator's arenas
        // (`cargo xtask bench churn`, idle RSS).
        let parsed = if btf.is_none() { Btf::from_sys_fs().ok() } else { None };
        let any_btf = btf.as_ref().or(parsed.as_ref());
        let force_raw = opts.off_cpu.as_ref().is_some_and(|o| o.force_raw_tracepoints);
        if opts.unwind.is_some() {
            match any_btf {
                Some(btf) => attach_sched(ebpf, btf, force_raw, "sched_process_exec", EXEC_BTF, EXEC_RAW)?,
                None => attach_raw(ebpf, "sched_process_exec", EXEC_RAW)?,
            }
        }
        for (tracepoint, btf_name, raw_name) in LIFECYCLE_PROGRAMS {
            match any_btf {
                Some(btf) => attach_sched(ebpf, btf, force_raw, tracepoint, btf_name, raw_name)?,
                None => attach_raw(ebpf, tracepoint, raw_name)?,
            }
        }
        drop(parsed);

        if let Some(btf) = &btf {
            for (tracepoint, btf_name, raw_name) in SCHED_PROGRAMS {
                attach_sched(ebpf, btf, force_raw, tracepoint, btf_name, raw_name)?;
            }
            let p: &mut Iter = ebpf
                .program_mut(TASK_ITER)
                .ok_or(BpfError::Missing(TASK_ITER))?
                .try_into()
                .map_err(|source| BpfError::Program { name: TASK_ITER, source })?;
            p.load("task", btf).map_err(|source| BpfError::Program { name: TASK_ITER, source })?;
        }

        let program: &mut PerfEvent = ebpf
            .program_mut(ON_CPU_PROGRAM)
            .ok_or(BpfError::Missing(ON_CPU_PROGRAM))?
            .try_into()
            .map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
        for cpu in cpus {
            let link = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(opts.frequency),
                    false,
                )
                .map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
            self.sampling.push(link);
        }
        Ok(())
    }

    /// The unwinder's maps, for the table thread; `None` without CFI
    /// unwinding or when already taken.
    pub fn take_unwind_maps(&mut self) -> Result<Option<EbpfUnwindMaps>, BpfError> {
        let Some(capacity) = self.unwind_rows.take() else { return Ok(None) };
        let rows = self.ebpf.take_map("UNWIND_ROWS").ok_or(BpfError::Missing("UNWIND_ROWS"))?;
        let mappings = self.ebpf.take_map("MAPPINGS").ok_or(BpfError::Missing("MAPPINGS"))?;
        let processes = self.ebpf.take_map("PROCESSES").ok_or(BpfError::Missing("PROCESSES"))?;
        let python = self.ebpf.take_map("PY_PROCESSES").ok_or(BpfError::Missing("PY_PROCESSES"))?;
        EbpfUnwindMaps::new(rows, capacity, mappings, processes, python).map(Some)
    }

    /// The lifecycle event stream, for the tracker thread; `None` when
    /// already taken.
    pub fn take_process_events(&mut self) -> Result<Option<EbpfProcessEvents>, BpfError> {
        let Some(ring) = self.ebpf.take_map("PROCESS_EVENTS") else { return Ok(None) };
        let stats = self.ebpf.take_map("PROCESS_EVENT_STATS").ok_or(BpfError::Missing("PROCESS_EVENT_STATS"))?;
        EbpfProcessEvents::new(ring, stats).map(Some)
    }

    /// The target filter's maps, for the target selection (taken once).
    pub fn take_target_maps(&mut self) -> Result<super::target_maps::EbpfTargetMaps, BpfError> {
        let pids = self.ebpf.take_map("TARGET_PIDS").ok_or(BpfError::Missing("TARGET_PIDS"))?;
        let cgroups = self.ebpf.take_map("TARGET_CGROUPS").ok_or(BpfError::Missing("TARGET_CGROUPS"))?;
        let levels = self.ebpf.take_map("TARGET_CGROUP_LEVELS").ok_or(BpfError::Missing("TARGET_CGROUP_LEVELS"))?;
        super::target_maps::EbpfTargetMaps::new(pids, cgroups, levels)
    }

    fn drain(&mut self, out: &mut Vec<Sample>) -> usize {
        let mut n = 0;
        while let Some(item) = self.samples.next() {
            if item.len() >= std::mem::size_of::<Sample>() {
                // SAFETY: the kernel wrote a whole Sample (size checked);
                // ring buffer records are only 8-byte aligned, hence unaligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Sample>()) });
                n += 1;
            } else if item.len() == std::mem::size_of::<ProcessNotice>() {
                // SAFETY: as above, a whole ProcessNotice.
                let notice = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ProcessNotice>()) };
                if notice.kind == NOTICE_NO_TABLES && self.notices.len() < MAX_NOTICES {
                    self.notices.push(notice.tgid);
                }
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

    fn run_time(&self) -> Vec<ProgramRunTime> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let fd = program.fd().ok()?;
                let (time, runs) = fdinfo_run_time(fd.as_fd().as_raw_fd())?;
                Some(ProgramRunTime { name: name.to_owned(), time, runs })
            })
            .collect()
    }

    fn detach(&mut self) -> Result<(), BpfError> {
        let names: Vec<String> = self.ebpf.programs().map(|(n, _)| n.to_owned()).collect();
        for name in names {
            let Some(program) = self.ebpf.program_mut(&name) else { continue };
            let result = match program {
                Program::PerfEvent(p) => p.unload(),
                Program::BtfTracePoint(p) => p.unload(),
                Program::RawTracePoint(p) => p.unload(),
                _ => Ok(()),
            };
            // Programs that were never loaded report NotLoaded; that is fine.
            if let Err(e) = result {
                log::debug!("unloading {name}: {e}");
            }
        }
        Ok(())
    }

    fn take_off_cpu(&mut self) -> Result<Vec<OffCpuRecord>, BpfError> {
        if !self.off_cpu {
            return Ok(Vec::new());
        }
        self.take_aggregate("OFFCPU", false)
    }

    fn take_notices(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.notices)
    }

    fn find_blocked(&mut self, since_ns: u64) -> Result<Vec<(u32, BlockedRegs)>, BpfError> {
        if !self.off_cpu {
            return Ok(Vec::new());
        }
        self.scan(SCAN_FIND_BLOCKED, since_ns)?;
        self.drain_by_tid("BLOCKED_REGS")
    }

    fn take_blocked_regs(&mut self) -> Result<Vec<(u32, BlockedRegs)>, BpfError> {
        if !self.off_cpu {
            return Ok(Vec::new());
        }
        self.drain_by_tid("BLOCKED_REGS")
    }

    fn take_thread_totals(&mut self) -> Result<Vec<(u32, ThreadTotal)>, BpfError> {
        if !self.off_cpu {
            return Ok(Vec::new());
        }
        self.drain_by_tid("THREAD_TOTALS")
    }

    fn store_stack(&mut self, id: u64, frames: &[u64]) -> Result<(), BpfError> {
        if !self.off_cpu || frames.is_empty() {
            return Ok(());
        }
        let mut stack = StackTrace { len: 0, _pad: 0, ips: [0; MAX_STACK_DEPTH] };
        let n = frames.len().min(MAX_STACK_DEPTH);
        stack.ips[..n].copy_from_slice(&frames[..n]);
        stack.len = n as u32;
        let mut stacks: HashMap<_, u64, StackTrace> = map_mut(&mut self.ebpf, "STACKS")?;
        stacks.insert(id, stack, 0).map_err(|source| BpfError::Map { name: "STACKS", source })
    }

    fn open_window(&mut self, start_ns: u64) -> Result<(), BpfError> {
        if !self.off_cpu {
            return Ok(());
        }
        self.set_scan(SCAN_WINDOW_START, start_ns)
    }

    /// Also stops on-CPU sampling: its events are closed now, the
    /// scheduler programs (whose detaching waits for RCU grace periods,
    /// tens of milliseconds) later in `detach`.
    fn close_window(&mut self, end_ns: u64) -> Result<(), BpfError> {
        if self.off_cpu {
            self.set_scan(SCAN_WINDOW_END, end_ns.max(1))?;
        }
        let program: &mut PerfEvent = self
            .ebpf
            .program_mut(ON_CPU_PROGRAM)
            .ok_or(BpfError::Missing(ON_CPU_PROGRAM))?
            .try_into()
            .map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
        for link in self.sampling.drain(..) {
            program.detach(link).map_err(|source| BpfError::Program { name: ON_CPU_PROGRAM, source })?;
        }
        Ok(())
    }

    fn cut_still_blocked(&mut self, at_ns: u64) -> Result<Vec<OffCpuRecord>, BpfError> {
        if !self.off_cpu {
            return Ok(Vec::new());
        }
        self.scan(SCAN_CUT, at_ns)?;
        self.take_aggregate("STILL_BLOCKED", true)
    }

    fn take_histograms(&mut self) -> Result<Vec<(HistKey, Histogram)>, BpfError> {
        if !self.off_cpu {
            return Ok(Vec::new());
        }
        // Threads batch their entries (the kernel side's `histograms`):
        // added to the map first, so the read holds every event until now.
        self.scan(SCAN_FLUSH, 0)?;
        let mut hists: HashMap<_, u32, ProcessHistograms> = map_mut(&mut self.ebpf, "HISTOGRAMS")?;
        let tgids: Vec<u32> = hists.keys().filter_map(Result::ok).collect();
        let mut out = Vec::with_capacity(tgids.len());
        for tgid in tgids {
            if let Ok(h) = hists.get(&tgid, 0) {
                for kind in [HIST_RUNQ, HIST_OFFCPU] {
                    if !h.is_empty(kind as usize) {
                        out.push((HistKey { tgid, kind }, h.kinds[kind as usize]));
                    }
                }
            }
            let _ = hists.remove(&tgid);
        }
        Ok(out)
    }

    fn occupancy(&self) -> Result<MapOccupancy, BpfError> {
        if !self.off_cpu {
            return Ok(MapOccupancy::default());
        }
        // One read per slot (65536 system calls, tens of milliseconds),
        // once, at the end of a recording.
        let threads: Array<_, ThreadState> =
            Array::try_from(self.ebpf.map("THREADS").ok_or(BpfError::Missing("THREADS"))?)
                .map_err(|source| BpfError::Map { name: "THREADS", source })?;
        let mut occupancy = MapOccupancy::default();
        for state in threads.iter().filter_map(Result::ok).filter(|s| s.tid != 0) {
            occupancy.threads.push(state.tid);
            // A blocked thread that was woken but has not run yet is
            // waiting to run, not blocked.
            if state.runq_start_ns != 0 {
                occupancy.runnable += 1;
            } else if state.block_start_ns != 0 {
                occupancy.blocked += 1;
            }
        }
        Ok(occupancy)
    }
}

fn map<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a MapData, K, V>, BpfError> {
    HashMap::try_from(ebpf.map(name).ok_or(BpfError::Missing(name))?).map_err(|source| BpfError::Map { name, source })
}

fn map_mut<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>, BpfError> {
    HashMap::try_from(ebpf.map_mut(name).ok_or(BpfError::Missing(name))?)
        .map_err(|source| BpfError::Map { name, source })
}

/// `task_struct.pid` and `.tgid` offsets for the fork program, (0, 0) when
/// the kernel's BTF cannot be read.
fn lifecycle_offsets(offsets: Option<&StructOffsets>) -> (u32, u32) {
    let Some(offsets) = offsets else { return (0, 0) };
    match (offsets.offset("task_struct", "pid"), offsets.offset("task_struct", "tgid")) {
        (Ok(pid), Ok(tgid)) => (pid, tgid),
        _ => (0, 0),
    }
}

/// Ring buffer size: half a second of samples from every CPU, so the 100 ms
/// poll period has 5x headroom and a quarter-full wakeup still comes early;
/// a power of two (the kernel requires it) between 256 KiB and 8 MiB. The
/// buffer's pages count in the agent's RSS once the kernel has written them,
/// so it is not made larger than needed (peak RSS is reported by
/// `cargo xtask bench overhead`).
pub(crate) fn ring_buffer_bytes(cpus: usize, frequency: u64) -> u32 {
    let half_second = (cpus as u64).max(1) * frequency.max(1) * std::mem::size_of::<Sample>() as u64 / 2;
    half_second.clamp(256 << 10, 8 << 20).next_power_of_two() as u32
}

/// Reads `run_time_ns`/`run_cnt` from the program fd's fdinfo: present only
/// while `kernel.bpf_stats_enabled` is 1.
fn fdinfo_run_time(fd: i32) -> Option<(Duration, u64)> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok());
    Some((Duration::from_nanos(field("run_time_ns:")?), field("run_cnt:")?))
}

#[cfg(test)]
mod tests {
    use super::ring_buffer_bytes;

    #[test]
    fn ring_buffer_scales_with_cpus_and_frequency_within_bounds() {
        assert_eq!(ring_buffer_bytes(2, 99), 256 << 10);
        assert_eq!(ring_buffer_bytes(16, 99), 2 << 20);
        assert_eq!(ring_buffer_bytes(256, 999), 8 << 20);
        assert_eq!(ring_buffer_bytes(0, 0), 256 << 10);
        assert!(ring_buffer_bytes(7, 123).is_power_of_two());
    }
}
