//! The end-of-run report on stderr: what was collected, what was lost and
//! why, how much could not be symbolized, and where the files are.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use profiler_common::Stat;

use crate::{bpf::KernelStats, symbolize::SymbolizeStats};

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
    /// BPF run time and run count, when `kernel.bpf_stats_enabled` is on.
    pub bpf_run: Option<(Duration, u64)>,
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
        if let Some((time, runs)) = self.bpf_run.filter(|(_, runs)| *runs > 0) {
            let _ = writeln!(
                s,
                "BPF: {:.2} ms in {} runs ({} ns per run).",
                time.as_secs_f64() * 1e3,
                runs,
                time.as_nanos() as u64 / runs
            );
        }
        if self.files.is_empty() {
            let _ = writeln!(s, "No files written.");
        } else {
            let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
            let _ = writeln!(s, "Wrote {}", files.join(", "));
        }
        s
    }
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
            symbols: SymbolizeStats { frames: 200, unsymbolized: 5, unknown_mapping: 1 },
            bpf_run: Some((Duration::from_micros(1500), 1000)),
            files: vec!["out/cpu.folded".into()],
            ..Default::default()
        }
        .render();
        assert!(s.contains("Recorded 10.0 s at 99 Hz on 2 CPUs: 990 samples from 2 processes"), "{s}");
        assert!(s.contains("Dropped: 4 samples (ring buffer full: 3, aggregation table full: 1)"), "{s}");
        assert!(s.contains("40 other processes"), "{s}");
        assert!(s.contains("2 user and 0 kernel stacks truncated"), "{s}");
        assert!(s.contains("2.5% of 200 unsymbolized (1 outside"), "{s}");
        assert!(s.contains("1500 ns per run"), "{s}");
        assert!(s.contains("Wrote out/cpu.folded"), "{s}");
    }

    #[test]
    fn quiet_when_nothing_went_wrong() {
        let s = Summary::default().render();
        assert!(!s.contains("Stacks:"), "{s}");
        assert!(!s.contains("BPF:"), "{s}");
        assert!(s.contains("0.0% of 0 unsymbolized"), "{s}");
    }
}
