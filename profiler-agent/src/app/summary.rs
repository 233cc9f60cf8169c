//! The end-of-run report on stderr: what was collected, what was lost and
//! why, how much could not be symbolized, and where the files are.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use profiler_common::Stat;

use crate::{
    bpf::{KernelStats, ProgramRunTime},
    latency::{human_ns, Percentiles},
    runtimes::RuntimeStats,
    symbolize::SymbolizeStats,
    unwind::UnwindStats,
};

/// Latency figures of one process.
#[derive(Debug, Default)]
pub struct ProcessLatency {
    pub pid: u32,
    pub name: String,
    pub runq: Percentiles,
    pub off_cpu: Percentiles,
}

/// What the scheduler programs saw (with `--off-cpu`).
#[derive(Debug, Default)]
pub struct SchedulerSummary {
    /// The processes with the most scheduling events.
    pub processes: Vec<ProcessLatency>,
    /// Off-CPU nanoseconds recorded in total.
    pub off_cpu_ns: u64,
    /// Threads still blocked when recording stopped.
    pub blocked_left: usize,
    /// Threads still waiting on a run queue when recording stopped.
    pub runnable_left: usize,
    /// Threads with an entry in the per-thread map (exited ones are removed).
    pub tracked_left: usize,
    /// Threads the start scan found already blocked (counted from the start).
    pub found_blocked: usize,
    /// The threads still blocked at the end with the most blocked time.
    pub longest_still_blocked: Vec<crate::offcpu::StillBlocked>,
}

/// What was named in JIT code, and how to name what was not.
#[derive(Debug, Default)]
pub struct JitSummary {
    pub stats: RuntimeStats,
    /// Processes with unnamed JIT frames and no perf map or jitdump:
    /// (pid, process name, frames, the flag that would help).
    pub missing: Vec<(u32, String, u64, &'static str)>,
}

/// Everything the summary reports.
#[derive(Debug, Default)]
pub struct Summary {
    pub elapsed: Duration,
    pub frequency: u64,
    pub cpus: usize,
    pub kernel: KernelStats,
    /// Samples the agent received.
    pub received: u64,
    /// Samples dropped because the aggregation table was full.
    pub aggregation_dropped: u64,
    pub unique_stacks: usize,
    pub processes: usize,
    pub symbols: SymbolizeStats,
    /// Processes that exited before their mappings could be read.
    pub vanished_processes: u64,
    /// Per-program BPF run time, when `kernel.bpf_stats_enabled` is on.
    pub run_time: Vec<ProgramRunTime>,
    pub scheduler: Option<SchedulerSummary>,
    /// The CFI table thread's figures, when CFI unwinding was on.
    pub unwind: Option<UnwindStats>,
    /// Perf maps and jitdumps, when a process had JIT code.
    pub jit: Option<JitSummary>,
    /// Lifecycle events and the process table, when tracked.
    pub lifecycle: Option<(crate::lifecycle::LifecycleStats, crate::process::ProcessStats)>,
    pub files: Vec<PathBuf>,
}

impl Summary {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let k = |stat| self.kernel.get(stat);
        let _ = writeln!(
            s,
            "Recorded {:.1} s at {} Hz on {} CPUs: {} samples from {} processes ({} unique stacks).",
            self.elapsed.as_secs_f64(),
            self.frequency,
            self.cpus,
            self.received,
            self.processes,
            self.unique_stacks
        );
        let dropped = k(Stat::RingBufferFull) + self.aggregation_dropped;
        let _ = writeln!(
            s,
            "Dropped: {dropped} samples (ring buffer full: {}, aggregation table full: {}). \
             Not sampled: {} idle, {} other processes (--pid filter).",
            k(Stat::RingBufferFull),
            self.aggregation_dropped,
            k(Stat::SamplesIdle),
            k(Stat::SamplesFiltered),
        );
        let errors = k(Stat::UserStackError) + k(Stat::KernelStackError);
        let truncated = k(Stat::UserStackTruncated) + k(Stat::KernelStackTruncated);
        if errors + truncated > 0 {
            let _ = writeln!(
                s,
                "Stacks: {} user and {} kernel stacks unreadable (kept without them); {} user and {} kernel stacks truncated at 127 frames.",
                k(Stat::UserStackError),
                k(Stat::KernelStackError),
                k(Stat::UserStackTruncated),
                k(Stat::KernelStackTruncated),
            );
        }
        let share = if self.symbols.frames == 0 {
            0.0
        } else {
            100.0 * self.symbols.unsymbolized as f64 / self.symbols.frames as f64
        };
        let _ = writeln!(
            s,
            "Frames: {:.1}% of {} unsymbolized ({} outside any known mapping; {} processes exited before they could be inspected).",
            share, self.symbols.frames, self.symbols.unknown_mapping, self.vanished_processes
        );
        if let Some((e, t)) = &self.lifecycle {
            let _ = writeln!(
                s,
                "Processes: {} forks, {} execs, {} exits seen ({} events lost); table: {} processes ({} exited), {} evicted.",
                e.forks, e.execs, e.exits, e.lost, t.entries, t.exited_pending, t.evicted
            );
        }
        if let Some(u) = &self.unwind {
            self.render_unwind(&mut s, u);
        }
        if let Some(j) = &self.jit {
            self.render_jit(&mut s, j);
        }
        if let Some(sched) = &self.scheduler {
            self.render_scheduler(&mut s, sched);
        }
        let runs: Vec<String> = self
            .run_time
            .iter()
            .filter(|r| r.runs > 0)
            .map(|r| format!("{} {} ns x {}", r.name, r.time.as_nanos() as u64 / r.runs, r.runs))
            .collect();
        if !runs.is_empty() {
            let _ = writeln!(s, "BPF time per run: {}.", runs.join(", "));
        }
        if self.files.is_empty() {
            let _ = writeln!(s, "No files written.");
        } else {
            let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
            let _ = writeln!(s, "Wrote {}", files.join(", "));
        }
        s
    }

    fn render_unwind(&self, s: &mut String, u: &UnwindStats) {
        let k = |stat| self.kernel.get(stat);
        let _ = writeln!(
            s,
            "Unwinding: {} user stacks complete, {} partly by frame pointer ({} frames outside known mappings, {} without a table); \
             stopped early: {} unsupported rule, {} read fault, {} depth limit.",
            k(Stat::UnwindComplete),
            k(Stat::UnwindPartial),
            k(Stat::UnwindNoMapping),
            k(Stat::UnwindNoTable),
            k(Stat::UnwindUnsupported),
            k(Stat::UnwindReadFault),
            k(Stat::UnwindDepthLimit),
        );
        let _ = writeln!(
            s,
            "Unwind tables: {} files, {} rows, {} bytes of kernel map memory (budget {} bytes), {} evicted.",
            u.tables, u.rows, u.table_bytes, u.budget_bytes, u.evicted
        );
        let per_mb = if u.cfi_bytes_built == 0 {
            0.0
        } else {
            u.build_time.as_secs_f64() * 1e3 / (u.cfi_bytes_built as f64 / 1e6)
        };
        let _ = writeln!(
            s,
            "Unwind tables built: {} for {} processes in {:.1} ms ({:.1} ms per MB of CFI); {} files without usable CFI; {} too big for the budget; {} requests dropped.",
            u.built,
            u.processes,
            u.build_time.as_secs_f64() * 1e3,
            per_mb,
            u.build_errors,
            u.too_big,
            u.requests_dropped
        );
        if u.python_processes + u.python_unsupported + k(Stat::PythonFrames) > 0 {
            let _ = writeln!(
                s,
                "Python: {} frames walked in {} processes; {} processes with an unsupported interpreter (native frames only); \
                 interpreter frames left native: {} thread state not found, {} read fault, {} chain ended early.",
                k(Stat::PythonFrames),
                u.python_processes,
                u.python_unsupported,
                k(Stat::PythonNoThreadState),
                k(Stat::PythonReadFault),
                k(Stat::PythonChainEnd),
            );
        }
    }

    fn render_jit(&self, s: &mut String, j: &JitSummary) {
        let k = |stat| self.kernel.get(stat);
        let st = &j.stats;
        let _ = writeln!(
            s,
            "JIT: {} frames named from perf maps or jitdump, {} in JIT code unnamed; {} of {} processes with JIT code have a map \
             ({} functions, {} KiB; skipped {} malformed lines, {} malformed records; evicted {} functions, {} processes).",
            self.symbols.jit,
            self.symbols.jit_unnamed,
            st.with_map,
            st.processes,
            st.entries,
            st.bytes / 1024,
            st.malformed_lines,
            st.malformed_records,
            st.entries_evicted,
            st.processes_evicted,
        );
        if self.unwind.is_some() {
            let _ = writeln!(
                s,
                "JIT unwinding: {} frames in JIT code walked by frame pointer; walks stopped there: {} at a zero frame pointer, {} at a read fault.",
                k(Stat::UnwindJitFrames),
                k(Stat::UnwindJitEnd),
                k(Stat::UnwindJitReadFault),
            );
        }
        for (pid, name, frames, hint) in &j.missing {
            let _ =
                writeln!(s, "  {name} (pid {pid}) ran JIT code without a perf map ({frames} frames unnamed): {hint}.");
        }
    }

    fn render_scheduler(&self, s: &mut String, sched: &SchedulerSummary) {
        let k = |stat| self.kernel.get(stat);
        let _ = writeln!(
            s,
            "Scheduler: {} switches; {} blocks captured ({} shorter than --off-cpu-min-block; stacks reused for {}); {:.3} s off-CPU recorded.",
            k(Stat::Switches),
            k(Stat::OffCpuBlocks),
            k(Stat::OffCpuShort),
            k(Stat::StacksReused),
            sched.off_cpu_ns as f64 / 1e9
        );
        if k(Stat::OffCpuUnsampled) > 0 {
            let _ = writeln!(
                s,
                "Off-CPU stacks sampled (--off-cpu-sample): {} of those blocks only timed, their stacks estimated from the others; per-thread totals exact.",
                k(Stat::OffCpuUnsampled)
            );
        }
        let lost = [
            Stat::ThreadMapFull,
            Stat::OffCpuAggregateFull,
            Stat::StackMapFull,
            Stat::HistogramMapFull,
            Stat::ThreadTotalsFull,
        ];
        let total: u64 = lost.iter().map(|&st| k(st)).sum();
        let detail: Vec<String> = lost.iter().map(|&st| format!("{} {}", st.name(), k(st))).collect();
        let _ = writeln!(s, "Scheduler events dropped: {total} ({}).", detail.join(", "));
        if !sched.processes.is_empty() {
            let _ = writeln!(s, "Latency of the busiest processes (p50 / p95 / p99 / max, count):");
            for p in &sched.processes {
                let _ = writeln!(
                    s,
                    "  {:<16} {:>7}  run queue {}   off-CPU {}",
                    p.name,
                    p.pid,
                    fmt_percentiles(&p.runq),
                    fmt_percentiles(&p.off_cpu)
                );
            }
        }
        let _ = writeln!(
            s,
            "Scheduler maps at exit: {} threads still blocked, {} waiting to run, {} threads tracked.",
            sched.blocked_left, sched.runnable_left, sched.tracked_left
        );
        let before = k(Stat::OffCpuBeforeTables);
        if sched.found_blocked > 0 || before > 0 {
            let _ = writeln!(
                s,
                "Off-CPU coverage: {} threads already blocked at the start (counted from it); {before} blocks walked by frame pointer before their process's unwind tables loaded.",
                sched.found_blocked
            );
        }
        if !sched.longest_still_blocked.is_empty() {
            let _ = writeln!(s, "Longest still blocked at the end (state=still_blocked in the profiles):");
            for t in &sched.longest_still_blocked {
                let _ = writeln!(
                    s,
                    "  {:<16} {:>7}/{:<7} {:>9.3} s  in {}",
                    t.thread_name,
                    t.pid,
                    t.tid,
                    t.ns as f64 / 1e9,
                    t.blocked_in
                );
            }
        }
    }
}

fn fmt_percentiles(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!("{} / {} / {} / {}, {}", human_ns(p.p50), human_ns(p.p95), human_ns(p.p99), human_ns(p.max as f64), p.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_drops_by_reason_and_unsymbolized_share() {
        let mut kernel = KernelStats::default();
        kernel.counts[Stat::RingBufferFull as usize] = 3;
        kernel.counts[Stat::SamplesFiltered as usize] = 40;
        kernel.counts[Stat::UserStackTruncated as usize] = 2;
        let s = Summary {
            elapsed: Duration::from_millis(10_040),
            frequency: 99,
            cpus: 2,
            kernel,
            received: 990,
            aggregation_dropped: 1,
            unique_stacks: 12,
            processes: 2,
            symbols: SymbolizeStats { frames: 200, unsymbolized: 5, unknown_mapping: 1, ..Default::default() },
            run_time: vec![ProgramRunTime {
                name: "on_cpu_sample".into(),
                time: Duration::from_micros(1500),
                runs: 1000,
            }],
            files: vec!["out/cpu.folded".into()],
            ..Default::default()
        }
        .render();
        assert!(s.contains("Recorded 10.0 s at 99 Hz on 2 CPUs: 990 samples from 2 processes"), "{s}");
        assert!(s.contains("Dropped: 4 samples (ring buffer full: 3, aggregation table full: 1)"), "{s}");
        assert!(s.contains("40 other processes"), "{s}");
        assert!(s.contains("2 user and 0 kernel stacks truncated"), "{s}");
        assert!(s.contains("2.5% of 200 unsymbolized (1 outside"), "{s}");
        assert!(s.contains("on_cpu_sample 1500 ns x 1000"), "{s}");
        assert!(!s.contains("Scheduler"), "{s}");
        assert!(s.contains("Wrote out/cpu.folded"), "{s}");
    }

    #[test]
    fn scheduler_section_lists_latencies_and_drops() {
        let mut kernel = KernelStats::default();
        kernel.counts[Stat::Switches as usize] = 5000;
        kernel.counts[Stat::OffCpuBlocks as usize] = 1200;
        kernel.counts[Stat::StackMapFull as usize] = 2;
        let s = Summary {
            kernel,
            scheduler: Some(SchedulerSummary {
                processes: vec![ProcessLatency {
                    pid: 42,
                    name: "db".into(),
                    runq: Percentiles { count: 10, p50: 2_000.0, p95: 3_000_000.0, p99: 3_500_000.0, max: 4_000_000 },
                    off_cpu: Percentiles::default(),
                }],
                off_cpu_ns: 1_500_000_000,
                blocked_left: 3,
                runnable_left: 1,
                tracked_left: 5,
                found_blocked: 1,
                longest_still_blocked: vec![crate::offcpu::StillBlocked {
                    pid: 42,
                    tid: 43,
                    thread_name: "db-io".into(),
                    ns: 6_000_000_000,
                    blocked_in: "wait_for_input".into(),
                }],
            }),
            ..Default::default()
        }
        .render();
        assert!(s.contains("db-io") && s.contains("6.000 s  in wait_for_input"), "{s}");
        assert!(s.contains("1 threads already blocked at the start"), "{s}");
        assert!(s.contains("Scheduler: 5000 switches; 1200 blocks captured"), "{s}");
        assert!(s.contains("1.500 s off-CPU"), "{s}");
        assert!(s.contains("dropped: 2 (") && s.contains("stack_store_failed 2"), "{s}");
        assert!(s.contains("run queue 2.0us / 3.00ms / 3.50ms / 4.00ms, 10   off-CPU -"), "{s}");
        assert!(s.contains("3 threads still blocked, 1 waiting to run, 5 threads tracked"), "{s}");
    }

    #[test]
    fn jit_section_names_the_flag_for_processes_without_a_map() {
        let s = Summary {
            symbols: SymbolizeStats { jit: 90, jit_unnamed: 30, ..Default::default() },
            jit: Some(JitSummary {
                stats: RuntimeStats {
                    processes: 2,
                    with_map: 1,
                    entries: 40,
                    malformed_lines: 3,
                    ..Default::default()
                },
                missing: vec![(77, "java".into(), 30, "use -XX:+PreserveFramePointer")],
            }),
            ..Default::default()
        }
        .render();
        assert!(s.contains("JIT: 90 frames named from perf maps or jitdump, 30 in JIT code unnamed; 1 of 2"), "{s}");
        assert!(s.contains("skipped 3 malformed lines"), "{s}");
        assert!(
            s.contains(
                "java (pid 77) ran JIT code without a perf map (30 frames unnamed): use -XX:+PreserveFramePointer."
            ),
            "{s}"
        );
    }

    #[test]
    fn quiet_when_nothing_went_wrong() {
        let s = Summary::default().render();
        assert!(!s.contains("Stacks:"), "{s}");
        assert!(!s.contains("BPF"), "{s}");
        assert!(s.contains("0.0% of 0 unsymbolized"), "{s}");
    }
}
