//! Time blocks of a recording, for `profiler-agent diff`: the on-CPU
//! samples of each second are also aggregated on their own and written as
//! `blocks/cpu-<UTC start>.pb.gz` (or `.folded`), named like the daemon's
//! interval files. One recording per side can then be tested against the
//! variation between its blocks (see `crate::diff`), not against binomial
//! noise, which timer sampling does not follow.
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
    offcpu::{BlockedRegs, HistKey, Histogram},
    Sample,
};

use crate::{
    aggregate::{Aggregate, Aggregator},
    bpf::{BpfError, KernelStats, MapOccupancy, OffCpuRecord, ProgramRunTime, SampleSource},
    cli::Format,
    diff::load::BLOCKS_DIR,
    export::{files::write_atomic, folded, pprof, rolling::utc_stamp, ExportError},
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
            entries: 0,
            abandoned: false,
            last_ns: 0,
            scratch: Aggregator::new(1),
        }
    }

    /// Adds one sample to its block.
    pub fn add(&mut self, s: &Sample) {
        if self.abandoned {
            return;
        }
        self.last_ns = self.last_ns.max(s.time_ns);
        let mut index = s.time_ns.saturating_sub(self.start_ns) / self.block_ns;
        while index >= MAX_BLOCKS as u64 {
            self.halve();
            index = s.time_ns.saturating_sub(self.start_ns) / self.block_ns;
        }
        let index = index as usize;
        if self.blocks.len() <= index {
            self.blocks.resize_with(index + 1, Aggregate::default);
        }
        self.scratch.add(s);
        let one = self.scratch.take();
        let block = &mut self.blocks[index];
        block.samples += 1;
        for (key, value) in one.stacks {
            match block.stacks.entry(key) {
                Entry::Occupied(mut e) => *e.get_mut() += value,
                Entry::Vacant(e) if self.entries < MAX_BLOCK_STACKS => {
                    e.insert(value);
                    self.entries += 1;
                }
                Entry::Vacant(_) => {
                    self.abandoned = true;
                    self.blocks = Vec::new();
                    return;
                }
            }
        }
    }

    /// Merges neighbouring blocks: half as many, twice as long.
    fn halve(&mut self) {
        let old = std::mem::take(&mut self.blocks);
        let mut merged: Vec<Aggregate> = Vec::with_capacity(old.len().div_ceil(2));
        for (i, block) in old.into_iter().enumerate() {
            if i % 2 == 0 {
                merged.push(block);
            } else if let Some(into) = merged.last_mut() {
                absorb(into, block);
            }
        }
        self.entries = merged.iter().map(|b| b.stacks.len()).sum();
        self.blocks = merged;
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
    pub fn finish(mut self, end_ns: u64) -> Option<(Duration, Vec<Aggregate>)> {
        if self.abandoned {
            return None;
        }
        let elapsed = end_ns.max(self.last_ns).saturating_sub(self.start_ns);
        let full = (elapsed / self.block_ns) as usize;
        let partial = elapsed % self.block_ns;
        if full >= 1 && partial < self.block_ns / 2 && self.blocks.len() > full {
            let last = self.blocks.remove(full);
            absorb(&mut self.blocks[full - 1], last);
        }
        Some((Duration::from_nanos(self.block_ns), self.blocks))
    }
}

fn absorb(into: &mut Aggregate, from: Aggregate) {
    into.samples += from.samples;
    for (key, value) in from.stacks {
        *into.stacks.entry(key).or_default() += value;
    }
}

/// A [`SampleSource`] that hands every sample to [`Blocks`] on its way to
/// the main aggregator.
pub struct BlockTap<S> {
    inner: S,
    blocks: Blocks,
    /// The window's end once closed: later samples are not in any block.
    end_ns: Option<u64>,
}

impl<S> BlockTap<S> {
    pub fn new(inner: S, blocks: Blocks) -> Self {
        Self { inner, blocks, end_ns: None }
    }

    pub fn into_parts(self) -> (S, Blocks) {
        (self.inner, self.blocks)
    }
}

impl<S: SampleSource> SampleSource for BlockTap<S> {
    fn poll(&mut self, out: &mut Vec<Sample>, timeout: Duration) -> Result<usize, BpfError> {
        let from = out.len();
        let n = self.inner.poll(out, timeout)?;
        for s in &out[from..] {
            if self.end_ns.is_none_or(|end| s.time_ns <= end) {
                self.blocks.add(s);
            }
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
    fn cut_still_blocked(&mut self, at_ns: u64) -> Result<Vec<OffCpuRecord>, BpfError> {
        self.inner.cut_still_blocked(at_ns)
    }
    fn open_window(&mut self, start_ns: u64) -> Result<(), BpfError> {
        self.inner.open_window(start_ns)
    }
    fn close_window(&mut self, end_ns: u64) -> Result<(), BpfError> {
        self.end_ns = Some(end_ns);
        self.inner.close_window(end_ns)
    }
}

/// Writes each non-empty block as `DIR/blocks/cpu-<UTC start>.pb.gz`
/// (`.folded` when pprof is not among `formats`), replacing the blocks of
/// an earlier recording into the same directory. Returns the blocks
/// directory and the number of files.
#[allow(clippy::too_many_arguments)]
pub fn write<R: FileResolver>(
    dir: &Path,
    blocks: &[Aggregate],
    block: Duration,
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
            if name.starts_with("cpu-") && (name.ends_with(".pb.gz") || name.ends_with(".folded")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let as_pprof = formats.contains(&Format::Pprof);
    let mut written = 0;
    for (i, agg) in blocks.iter().enumerate() {
        if agg.stacks.is_empty() {
            continue;
        }
        let begin = start + block * i as u32;
        let mut p =
            Profile::new(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")), period, begin);
        p.duration_ns = block.as_nanos() as u64;
        symbolizer.symbolize(agg, procs, &mut p);
        let stamp = utc_stamp(begin);
        let (name, bytes) = if as_pprof {
            (format!("cpu-{stamp}.pb.gz"), pprof::to_gzip(&p)?)
        } else {
            (format!("cpu-{stamp}.folded"), folded::encode(&p).into_bytes())
        };
        write_atomic(&out.join(name), &bytes)?;
        written += 1;
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
        let (len, blocks) = b.finish(104 * SEC).unwrap();
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
        let (_, blocks) = b.finish(2 * SEC + SEC / 4).unwrap();
        assert_eq!(blocks.iter().map(|a| a.samples).collect::<Vec<_>>(), [1, 2]);
        // A last block of more than half a block stays.
        let mut b = Blocks::new(0, BLOCK);
        for t in [0, SEC, 2 * SEC + 100] {
            b.add(&at(t, 1));
        }
        assert_eq!(b.finish(2 * SEC + SEC * 3 / 4).unwrap().1.len(), 3);
        // Samples after the stop (before detaching) count towards the end.
        let mut b = Blocks::new(0, BLOCK);
        for t in [0, SEC, 2 * SEC + SEC / 10] {
            b.add(&at(t, 1));
        }
        assert_eq!(b.finish(2 * SEC - 1).unwrap().1.len(), 2);
    }

    #[test]
    fn long_recordings_double_the_block_length_keeping_every_sample() {
        let mut b = Blocks::new(0, BLOCK);
        for t in 0..200 {
            b.add(&at(t * SEC, t % 3));
        }
        let (len, blocks) = b.finish(200 * SEC).unwrap();
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
        let mut tap = BlockTap::new(src, Blocks::new(0, BLOCK));
        let mut out = vec![at(0, 9)];
        assert_eq!(tap.poll(&mut out, Duration::ZERO).unwrap(), 3);
        assert_eq!(out.len(), 4, "appends like the inner source");
        let (src, blocks) = tap.into_parts();
        assert!(src.queue.is_empty());
        let (_, blocks) = blocks.finish(2 * SEC).unwrap();
        assert_eq!(
            blocks.iter().map(|a| a.samples).collect::<Vec<_>>(),
            [2, 1],
            "the sample already in `out` is not counted"
        );
    }
}
