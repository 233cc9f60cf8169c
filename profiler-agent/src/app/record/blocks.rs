//! Time blocks of a recording, for `profiler-agent diff`: the on-CPU
//! samples of each second are also aggregated on their own and written as
//! `blocks/cpu-<UTC start>.pb.gz` (or `.folded`), named like the daemon's
//! interval files. One recording per side can then be tested against the
//! variation between its blocks (see `crate::diff`), not against binomial
//! noise, which timer sampling does not follow.
//!
//! With `--off-cpu` the kernel's off-CPU aggregate is also read at every
//! block boundary (threads still blocked cut there, see [`Timeline`]), and
//! each block gets `off-cpu-<UTC start>.*` and `wall-<UTC start>.folded`.
//!
//! Blocks are cut by each sample's kernel timestamp, so a late poll does
//! not move samples between blocks. Memory is bounded twice: at most
//! [`MAX_BLOCKS`] blocks (a longer recording doubles the block length and
//! merges neighbours), and at most [`MAX_BLOCK_STACKS`] (stack, block)
//! entries in all; past that the blocks are given up (and the summary says
//! so) rather than written incomplete, which would bias a comparison.

use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use profiler_common::{
    offcpu::{BlockedRegs, HistKey, Histogram, ThreadTotal},
    Sample,
};

use super::timeline::Timeline;
use crate::{
    aggregate::{self, Aggregate, Aggregator},
    bpf::{BpfError, KernelStats, MapOccupancy, OffCpuRecord, ProgramRunTime, SampleSource},
    cli::Format,
    diff::load::BLOCKS_DIR,
    export::{files::write_atomic, folded, pprof, rolling::utc_stamp, ExportError},
    offcpu::sampled::Totals,
    process::ProcessLookup,
    profile::{Profile, ValueType},
    symbolize::{elf::FileResolver, Symbolizer},
};

/// Length of a block while the recording is short.
pub const BLOCK: Duration = Duration::from_secs(1);
/// Blocks kept; beyond, neighbours merge and blocks get twice as long.
pub const MAX_BLOCKS: usize = 64;
/// (stack, block) entries kept over all blocks.
pub const MAX_BLOCK_STACKS: usize = 1 << 20;

/// The per-block aggregates of one recording.
pub struct Blocks {
    start_ns: u64,
    block_ns: u64,
    blocks: Vec<Aggregate>,
    /// Off-CPU nanoseconds per block, when off-CPU is recorded.
    off: Vec<Aggregate>,
    entries: usize,
    abandoned: bool,
    /// Latest sample time seen: sampling goes on until the programs are
    /// detached, a little after the recording was told to stop.
    last_ns: u64,
    /// Builds the key of one sample exactly as the main aggregator does,
    /// without this module having to know the key's fields.
    scratch: Aggregator,
}

impl Blocks {
    /// Blocks starting at `start_ns` (CLOCK_MONOTONIC, the clock of the samples' `time_ns`).
    pub fn new(start_ns: u64, block: Duration) -> Self {
        Self {
            start_ns,
            block_ns: (block.as_nanos() as u64).max(1),
            blocks: Vec::new(),
            off: Vec::new(),
            entries: 0,
            abandoned: false,
            last_ns: 0,
            scratch: Aggregator::new(1),
        }
    }

    /// The block `time_ns` falls in, halving the blocks when it is past
    /// the last one kept.
    fn index(&mut self, time_ns: u64) -> usize {
        let mut index = time_ns.saturating_sub(self.start_ns) / self.block_ns;
        while index >= MAX_BLOCKS as u64 {
            self.halve();
            index = time_ns.saturating_sub(self.start_ns) / self.block_ns;
        }
        index as usize
    }

    /// Adds one sample to its block.
    pub fn add(&mut self, s: &Sample) {
        if self.abandoned {
            return;
        }
        self.last_ns = self.last_ns.max(s.time_ns);
        let index = self.index(s.time_ns);
        self.scratch.add(s);
        let one = self.scratch.take();
        self.absorb_bounded(false, index, one, 1);
    }

    /// Adds off-CPU records read at `at_ns` (a block boundary, or the end)
    /// to the block that ends there.
    pub fn add_off(&mut self, at_ns: u64, records: &[OffCpuRecord]) {
        if self.abandoned || records.is_empty() {
            return;
        }
        let index = self.index(at_ns.saturating_sub(1).max(self.start_ns));
        let agg = aggregate::from_off_cpu(records, MAX_BLOCK_STACKS);
        self.absorb_bounded(true, index, agg, 0);
    }

    /// Adds `from` to block `index` of the on- or off-CPU blocks, giving
    /// the blocks up when they would pass [`MAX_BLOCK_STACKS`] entries.
    fn absorb_bounded(&mut self, off: bool, index: usize, from: Aggregate, samples: u64) {
        let blocks = if off { &mut self.off } else { &mut self.blocks };
        if blocks.len() <= index {
            blocks.resize_with(index + 1, Aggregate::default);
        }
        let block = &mut blocks[index];
        block.samples += samples;
        for (key, value) in from.stacks {
            match block.stacks.entry(key) {
                Entry::Occupied(mut e) => *e.get_mut() += value,
                Entry::Vacant(e) if self.entries < MAX_BLOCK_STACKS => {
                    e.insert(value);
                    self.entries += 1;
                }
                Entry::Vacant(_) => {
                    self.abandoned = true;
                    self.blocks = Vec::new();
                    self.off = Vec::new();
                    return;
                }
            }
        }
    }

    /// Where the next block starts after `now_ns`.
    fn next_boundary(&self, now_ns: u64) -> u64 {
        let k = now_ns.saturating_sub(self.start_ns) / self.block_ns + 1;
        self.start_ns + k * self.block_ns
    }

    /// Merges neighbouring blocks: half as many, twice as long.
    fn halve(&mut self) {
        self.blocks = pairs(std::mem::take(&mut self.blocks));
        self.off = pairs(std::mem::take(&mut self.off));
        self.entries = self.blocks.iter().chain(&self.off).map(|b| b.stacks.len()).sum();
        self.block_ns *= 2;
    }

    /// Whether the blocks were given up for memory.
    pub fn abandoned(&self) -> bool {
        self.abandoned
    }

    /// The blocks of a recording that ended at `end_ns` (or at its last
    /// sample, if later), and their length. A
    /// last block shorter than half a block is merged into the one before,
    /// so every block has a comparable number of samples.
    pub fn finish(mut self, end_ns: u64) -> Option<Finished> {
        if self.abandoned {
            return None;
        }
        let elapsed = end_ns.max(self.last_ns).saturating_sub(self.start_ns);
        let full = (elapsed / self.block_ns) as usize;
        let partial = elapsed % self.block_ns;
        if full >= 1 && partial < self.block_ns / 2 {
            for blocks in [&mut self.blocks, &mut self.off] {
                if blocks.len() > full {
                    let last = blocks.remove(full);
                    absorb(&mut blocks[full - 1], last);
                }
            }
        }
        Some(Finished { len: Duration::from_nanos(self.block_ns), cpu: self.blocks, off: self.off })
    }
}

/// The blocks of a finished recording.
pub struct Finished {
    pub len: Duration,
    pub cpu: Vec<Aggregate>,
    /// Empty without `--off-cpu`.
    pub off: Vec<Aggregate>,
}

/// Neighbours merged: `[a, b, c]` becomes `[a+b, c]`.
fn pairs(old: Vec<Aggregate>) -> Vec<Aggregate> {
    let mut merged: Vec<Aggregate> = Vec::with_capacity(old.len().div_ceil(2));
    for (i, block) in old.into_iter().enumerate() {
        if i % 2 == 0 {
            merged.push(block);
        } else if let Some(into) = merged.last_mut() {
            absorb(into, block);
        }
    }
    merged
}

fn absorb(into: &mut Aggregate, from: Aggregate) {
    into.samples += from.samples;
    for (key, value) in from.stacks {
        *into.stacks.entry(key).or_default() += value;
    }
}

/// A [`SampleSource`] that hands every sample to [`Blocks`] on its way to
/// the main aggregator, and with off-CPU reads the off-CPU aggregate at
/// every block boundary.
pub struct BlockTap<S> {
    inner: S,
    blocks: Blocks,
    /// The window's end once closed: later samples are not in any block.
    end_ns: Option<u64>,
    /// The next block boundary, when off-CPU time is read per block.
    boundary_ns: Option<u64>,
    timeline: Timeline,
    /// Sampled mode's exact per-thread totals, read at every boundary.
    totals: Totals,
}

/// What the tap hands back: the source, the blocks, and the off-CPU
/// records read so far (see [`Timeline::finish`]).
pub struct TapParts<S> {
    pub source: S,
    pub blocks: Blocks,
    pub timeline: Timeline,
    pub totals: Totals,
}

impl<S> BlockTap<S> {
    /// `off_cpu`: read the off-CPU aggregate at every block boundary.
    pub fn new(inner: S, blocks: Blocks, off_cpu: bool) -> Self {
        let boundary_ns = off_cpu.then(|| blocks.next_boundary(blocks.start_ns));
        Self { inner, blocks, end_ns: None, boundary_ns, timeline: Timeline::default(), totals: Totals::default() }
    }

    pub fn into_parts(self) -> TapParts<S> {
        TapParts { source: self.inner, blocks: self.blocks, timeline: self.timeline, totals: self.totals }
    }
}

impl<S: SampleSource> BlockTap<S> {
    /// Reads off-CPU time at every boundary passed. The cut comes before
    /// the read of ended blocks: a block that ends in between is then cut
    /// at the boundary, and only its microseconds after it land early.
    fn cross_boundaries(&mut self, now_ns: u64) -> Result<(), BpfError> {
        while let Some(b) = self.boundary_ns.filter(|&b| b <= now_ns) {
            let cut = crate::offcpu::cut(&mut self.inner, b)?;
            let ended = self.inner.take_off_cpu()?;
            self.totals.add(self.inner.take_thread_totals()?);
            self.blocks.add_off(b, &cut);
            self.blocks.add_off(b, &ended);
            self.timeline.boundary(ended, cut);
            // After a halving the next boundary is a longer block away.
            self.boundary_ns = Some(self.blocks.next_boundary(b));
        }
        Ok(())
    }
}

impl<S: SampleSource> SampleSource for BlockTap<S> {
    fn poll(&mut self, out: &mut Vec<Sample>, timeout: Duration) -> Result<usize, BpfError> {
        // Wake at the boundary, so the cut is taken close to it.
        let timeout = match (self.boundary_ns, self.end_ns) {
            (Some(b), None) => timeout.min(Duration::from_nanos(b.saturating_sub(crate::bpf::monotonic_ns()))),
            _ => timeout,
        };
        let from = out.len();
        let n = self.inner.poll(out, timeout)?;
        for s in &out[from..] {
            if self.end_ns.is_none_or(|end| s.time_ns <= end) {
                self.blocks.add(s);
            }
        }
        if self.end_ns.is_none() {
            self.cross_boundaries(crate::bpf::monotonic_ns())?;
        }
        Ok(n)
    }
    fn stats(&self) -> Result<KernelStats, BpfError> {
        self.inner.stats()
    }
    fn run_time(&self) -> Vec<ProgramRunTime> {
        self.inner.run_time()
    }
    fn detach(&mut self) -> Result<(), BpfError> {
        self.inner.detach()
    }
    fn take_off_cpu(&mut self) -> Result<Vec<OffCpuRecord>, BpfError> {
        self.inner.take_off_cpu()
    }
    fn take_histograms(&mut self) -> Result<Vec<(HistKey, Histogram)>, BpfError> {
        self.inner.take_histograms()
    }
    fn occupancy(&self) -> Result<MapOccupancy, BpfError> {
        self.inner.occupancy()
    }
    fn take_notices(&mut self) -> Vec<u32> {
        self.inner.take_notices()
    }
    fn find_blocked(&mut self, since_ns: u64) -> Result<Vec<(u32, BlockedRegs)>, BpfError> {
        self.inner.find_blocked(since_ns)
    }
    fn store_stack(&mut self, id: u64, frames: &[u64]) -> Result<(), BpfError> {
        self.inner.store_stack(id, frames)
    }
    fn take_blocked_regs(&mut self) -> Result<Vec<(u32, BlockedRegs)>, BpfError> {
        self.inner.take_blocked_regs()
    }
    fn take_thread_totals(&mut self) -> Result<Vec<(u32, ThreadTotal)>, BpfError> {
        self.inner.take_thread_totals()
    }
    fn cut_still_blocked(&mut self, at_ns: u64) -> Result<Vec<OffCpuRecord>, BpfError> {
        self.inner.cut_still_blocked(at_ns)
    }
    fn open_window(&mut self, start_ns: u64) -> Result<(), BpfError> {
        self.inner.open_window(start_ns)
    }
    fn close_window(&mut self, end_ns: u64) -> Result<(), BpfError> {
        self.cross_boundaries(end_ns)?;
        self.end_ns = Some(end_ns);
        self.inner.close_window(end_ns)
    }
}

/// Writes each non-empty block as `DIR/blocks/cpu-<UTC start>.pb.gz`
/// (`.folded` when pprof is not among `formats`), and with off-CPU blocks
/// `off-cpu-<UTC start>.*` and `wall-<UTC start>.folded` too, replacing the
/// blocks of an earlier recording into the same directory. Returns the
/// blocks directory and the number of files.
pub fn write<R: FileResolver>(
    dir: &Path,
    blocks: &Finished,
    start: SystemTime,
    period: u64,
    formats: &[Format],
    symbolizer: &mut Symbolizer<R>,
    procs: &mut impl ProcessLookup,
) -> Result<(PathBuf, usize), ExportError> {
    let out = dir.join(BLOCKS_DIR);
    std::fs::create_dir_all(&out).map_err(|source| ExportError::CreateTemp { path: out.clone(), source })?;
    if let Ok(old) = std::fs::read_dir(&out) {
        for entry in old.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = ["cpu-", "off-cpu-", "wall-"].iter().any(|p| name.starts_with(p));
            if ours && (name.ends_with(".pb.gz") || name.ends_with(".folded")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let as_pprof = formats.contains(&Format::Pprof);
    let block = blocks.len;
    let mut written = 0;
    let mut put = |stem: &str, begin: SystemTime, p: &Profile, pprof_ok: bool| -> Result<(), ExportError> {
        let stamp = utc_stamp(begin);
        let (name, bytes) = if as_pprof && pprof_ok {
            (format!("{stem}-{stamp}.pb.gz"), pprof::to_gzip(p)?)
        } else {
            (format!("{stem}-{stamp}.folded"), folded::encode(p).into_bytes())
        };
        write_atomic(&out.join(name), &bytes)?;
        written += 1;
        Ok(())
    };
    let empty = Aggregate::default();
    for i in 0..blocks.cpu.len().max(blocks.off.len()) {
        let begin = start + block * i as u32;
        let cpu_agg = blocks.cpu.get(i).unwrap_or(&empty);
        let mut cpu =
            Profile::new(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")), period, begin);
        cpu.duration_ns = block.as_nanos() as u64;
        symbolizer.symbolize(cpu_agg, procs, &mut cpu);
        if !cpu_agg.stacks.is_empty() {
            put("cpu", begin, &cpu, true)?;
        }
        let Some(off_agg) = blocks.off.get(i).filter(|a| !a.stacks.is_empty()) else { continue };
        let mut off = Profile::new(ValueType::new("off_cpu", "nanoseconds"), None, 0, begin);
        off.duration_ns = cpu.duration_ns;
        symbolizer.symbolize(off_agg, procs, &mut off);
        put("off-cpu", begin, &off, true)?;
        // Wall is folded only, like the recording's own `wall.folded`.
        put("wall", begin, &super::outputs::wall_profile(&cpu, &off), false)?;
    }
    Ok((out, written))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::fake::{sample, FakeSource};

    const SEC: u64 = 1_000_000_000;

    fn at(t: u64, leaf: u64) -> Sample {
        let mut s = sample(1, 1, "w", &[], &[leaf, 0x10]);
        s.time_ns = t;
        s
    }

    #[test]
    fn samples_go_to_the_block_of_their_timestamp() {
        let mut b = Blocks::new(100 * SEC, BLOCK);
        b.add(&at(100 * SEC + 5, 1));
        b.add(&at(100 * SEC + SEC / 2, 1));
        b.add(&at(101 * SEC + 1, 2));
        b.add(&at(99 * SEC, 3)); // before the start: first block
        b.add(&at(103 * SEC, 2)); // block 2 stays empty
        let f = b.finish(104 * SEC).unwrap();
        let (len, blocks) = (f.len, f.cpu);
        assert_eq!(len, BLOCK);
        let counts: Vec<u64> = blocks.iter().map(|a| a.stacks.values().sum()).collect();
        assert_eq!(counts, [3, 1, 0, 1]);
        assert_eq!(blocks[0].stacks.len(), 2);
    }

    #[test]
    fn a_short_last_block_joins_the_one_before() {
        let mut b = Blocks::new(0, BLOCK);
        for t in [0, SEC, 2 * SEC + 100] {
            b.add(&at(t, 1));
        }
        let blocks = b.finish(2 * SEC + SEC / 4).unwrap().cpu;
        assert_eq!(blocks.iter().map(|a| a.samples).collect::<Vec<_>>(), [1, 2]);
        // A last block of more than half a block stays.
        let mut b = Blocks::new(0, BLOCK);
        for t in [0, SEC, 2 * SEC + 100] {
            b.add(&at(t, 1));
        }
        assert_eq!(b.finish(2 * SEC + SEC * 3 / 4).unwrap().cpu.len(), 3);
        // Samples after the stop (before detaching) count towards the end.
        let mut b = Blocks::new(0, BLOCK);
        for t in [0, SEC, 2 * SEC + SEC / 10] {
            b.add(&at(t, 1));
        }
        assert_eq!(b.finish(2 * SEC - 1).unwrap().cpu.len(), 2);
    }

    #[test]
    fn long_recordings_double_the_block_length_keeping_every_sample() {
        let mut b = Blocks::new(0, BLOCK);
        for t in 0..200 {
            b.add(&at(t * SEC, t % 3));
        }
        let f = b.finish(200 * SEC).unwrap();
        let (len, blocks) = (f.len, f.cpu);
        assert_eq!(len, Duration::from_secs(4));
        assert!(blocks.len() <= MAX_BLOCKS);
        assert_eq!(blocks.iter().map(|a| a.stacks.values().sum::<u64>()).sum::<u64>(), 200);
        assert!(blocks.iter().all(|a| a.samples == 4));
    }

    #[test]
    fn the_tap_passes_samples_through_and_keeps_a_copy() {
        let mut src = FakeSource::default();
        for t in [0, 1, SEC + 1] {
            src.push(at(t, 7));
        }
        let mut tap = BlockTap::new(src, Blocks::new(0, BLOCK), false);
        let mut out = vec![at(0, 9)];
        assert_eq!(tap.poll(&mut out, Duration::ZERO).unwrap(), 3);
        assert_eq!(out.len(), 4, "appends like the inner source");
        let TapParts { source: src, blocks, .. } = tap.into_parts();
        assert!(src.queue.is_empty());
        let blocks = blocks.finish(2 * SEC).unwrap().cpu;
        assert_eq!(
            blocks.iter().map(|a| a.samples).collect::<Vec<_>>(),
            [2, 1],
            "the sample already in `out` is not counted"
        );
    }

    /// A source whose every cut finds thread 7 still blocked, `ns` more.
    struct Blocked {
        cuts: Vec<u64>,
        ns: u64,
    }

    impl SampleSource for Blocked {
        fn poll(&mut self, _out: &mut Vec<Sample>, _timeout: Duration) -> Result<usize, BpfError> {
            Ok(0)
        }
        fn stats(&self) -> Result<KernelStats, BpfError> {
            Ok(KernelStats::default())
        }
        fn cut_still_blocked(&mut self, at_ns: u64) -> Result<Vec<OffCpuRecord>, BpfError> {
            self.cuts.push(at_ns);
            Ok(vec![OffCpuRecord {
                key: profiler_common::offcpu::OffCpuKey {
                    tgid: 1,
                    tid: 7,
                    kernel_stack: 1,
                    user_stack: 2,
                    comm: [0; 16],
                },
                value: profiler_common::offcpu::OffCpuValue { total_ns: self.ns, count: 1 },
                kernel: vec![0x10],
                user: vec![0x20],
                still_blocked: true,
            }])
        }
    }

    #[test]
    fn off_cpu_is_read_at_every_boundary_into_its_block_and_the_whole_is_kept() {
        let mut tap = BlockTap::new(Blocked { cuts: vec![], ns: SEC }, Blocks::new(0, BLOCK), true);
        tap.cross_boundaries(2 * SEC + 5).unwrap();
        // Closing crosses what is left before the end, not past it.
        tap.close_window(3 * SEC + SEC * 6 / 10).unwrap();
        let TapParts { mut source, mut blocks, timeline, .. } = tap.into_parts();
        assert_eq!(source.cuts, [SEC, 2 * SEC, 3 * SEC]);
        source.ns = SEC * 6 / 10;
        let end = 3 * SEC + SEC * 6 / 10;
        let last = source.cut_still_blocked(end).unwrap();
        blocks.add_off(end, &last);
        let whole = timeline.finish(vec![], last);
        assert_eq!(whole.len(), 1);
        assert!(whole[0].still_blocked, "blocked all along: one still-blocked record");
        assert_eq!(whole[0].value.total_ns, 3 * SEC + SEC * 6 / 10);
        let f = blocks.finish(end).unwrap();
        let per_block: Vec<u64> = f.off.iter().map(|a| a.stacks.values().sum()).collect();
        assert_eq!(per_block, [SEC, SEC, SEC, SEC * 6 / 10]);
        assert!(f.cpu.is_empty());
    }

    #[test]
    fn without_off_cpu_no_boundary_is_read() {
        let mut tap = BlockTap::new(Blocked { cuts: vec![], ns: SEC }, Blocks::new(0, BLOCK), false);
        tap.cross_boundaries(5 * SEC).unwrap();
        tap.close_window(6 * SEC).unwrap();
        assert!(tap.into_parts().source.cuts.is_empty());
    }
}
