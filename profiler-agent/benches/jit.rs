//! JIT symbol costs: parsing a 100k-line perf map (and the memory its table
//! holds), re-reading it after 1k lines are appended, and naming a JIT
//! frame against naming a native one.
//!
//! The map looks like a Node.js service's: V8 names with file, line and
//! column, of varied lengths, in address order with some code recompiled
//! over older ranges (the later entry wins). Stacks mix 2k hot functions.
//!
//! Measured on a shared 2-CPU VM at load average ~26 (absolute times are
//! inflated; the ratios are the point): parsing 100k lines 747 ms, the
//! re-read after 1k appended lines 7.9 ms (the cost follows the appended
//! bytes, not the file); 206 bytes of heap per line. A whole symbolization
//! pass over 2000 stacks of 16 frames, profile building included, on a
//! quieter day (load ~1.6): 9.8 ms for JIT frames; 37.7 ms for cached
//! native frames, 6.7 ms once each file address's frames were built once
//! per pass instead of once per stack (the module's build id was formatted
//! and every frame cloned and hashed per stack).
//!
//! Run: `cargo bench -p profiler-agent --bench jit`. Memory is measured
//! with a counting allocator: the live bytes the table holds after the
//! parse, against the table's own estimate (which the bounds use).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    fs,
    io::Write,
    num::NonZeroUsize,
    path::Path,
    sync::atomic::{AtomicIsize, Ordering::Relaxed},
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use profiler_agent::{
    aggregate::{Aggregate, StackKey, NO_CPU},
    process::ProcessTable,
    profile::{Profile, ValueType},
    runtimes::{perfmap::PerfMapFile, JitTable},
    symbolize::{elf::Blaze, kallsyms::KernelSymbols, Symbolizer},
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const JIT_BASE: u64 = 0x7f00_0000_0000;
const LINES: usize = 100_000;
const APPEND: usize = 1_000;
/// Stacks of the symbolization part, and frames in each.
const STACKS: usize = 2_000;
const DEPTH: usize = 16;

/// A deterministic xorshift, so every run parses the same map.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Line `i` of the map: mostly new code after the previous, 1 in 20
/// recompiling over an earlier range.
fn line(i: usize, rng: &mut Rng) -> String {
    let size = 0x40 + rng.next() % 0x600;
    let start =
        if i % 20 == 19 { JIT_BASE + (rng.next() % (i as u64 + 1)) * 0x400 } else { JIT_BASE + i as u64 * 0x400 };
    let tier = ["*", "~", "^", "+"][(rng.next() % 4) as usize];
    let name_len = 4 + (rng.next() % 24) as usize;
    let name: String = (0..name_len).map(|k| (b'a' + ((i + k * 7) % 26) as u8) as char).collect();
    let module = rng.next() % 300;
    format!(
        "{start:x} {size:x} JS:{tier}{name} /srv/app/src/lib/module_{module}.js:{}:{}\n",
        1 + rng.next() % 3000,
        1 + rng.next() % 80
    )
}

fn write_map(path: &Path, lines: usize, rng: &mut Rng) {
    let mut text = String::with_capacity(lines * 80);
    for i in 0..lines {
        text.push_str(&line(i, rng));
    }
    fs::write(path, text).unwrap();
}

fn parse(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("perf-1.map");
    write_map(&path, LINES, &mut Rng(0x9e37_79b9_7f4a_7c15));
    let bytes = fs::metadata(&path).unwrap().len();

    // Memory: live heap held by the table after one parse.
    let before = LIVE.load(Relaxed);
    let mut table = JitTable::default();
    PerfMapFile::new(path.clone()).read_new(&mut table).unwrap();
    let held = LIVE.load(Relaxed) - before;
    eprintln!(
        "perf map: {LINES} lines, {bytes} bytes; table of {} ranges holds {} bytes ({:.0} per line; its own estimate {} bytes)",
        table.len(),
        held,
        held as f64 / LINES as f64,
        table.bytes()
    );
    drop(table);

    let mut group = c.benchmark_group("jit");
    group.throughput(Throughput::Elements(LINES as u64));
    group.bench_function("parse_100k_lines", |b| {
        b.iter_batched(
            JitTable::default,
            |mut t| {
                PerfMapFile::new(path.clone()).read_new(&mut t).unwrap();
                t
            },
            BatchSize::LargeInput,
        )
    });

    // Re-read after an append: the 100k lines were read before; only the
    // new 1k are parsed (the map keeps growing across iterations, as a
    // real one does).
    let mut map = PerfMapFile::new(path.clone());
    let mut table = JitTable::default();
    map.read_new(&mut table).unwrap();
    let mut rng = Rng(7);
    let mut next = LINES;
    group.throughput(Throughput::Elements(APPEND as u64));
    group.bench_function("reread_after_1k_appended", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut chunk = String::new();
                for _ in 0..APPEND {
                    chunk.push_str(&line(next, &mut rng));
                    next += 1;
                }
                fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(chunk.as_bytes()).unwrap();
                let t = Instant::now();
                let o = map.read_new(&mut table).unwrap();
                total += t.elapsed();
                assert_eq!(o.lines, APPEND as u64);
            }
            total
        })
    });
    group.finish();
}

/// A fake `/proc/100` mapping this bench binary at 0x400000 (file offset 0)
/// and JIT code at `JIT_BASE`, with the 100k-line map in its `/tmp`.
fn fake_proc(root: &Path) {
    let exe = std::env::current_exe().unwrap();
    let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&exe).unwrap());
    let p = root.join("100");
    fs::create_dir_all(p.join("root/tmp")).unwrap();
    fs::write(p.join("comm"), "node\n").unwrap();
    fs::write(p.join("status"), "Name:\tnode\nNStgid:\t100\n").unwrap();
    fs::write(
        p.join("maps"),
        format!(
            "400000-2400000 r-xp 00000000 fe:01 {ino} {}\n{JIT_BASE:x}-{:x} rwxp 00000000 00:00 0\n",
            exe.display(),
            JIT_BASE + 0x400 * LINES as u64 * 2
        ),
    )
    .unwrap();
    write_map(&p.join("root/tmp/perf-100.map"), LINES, &mut Rng(0x9e37_79b9_7f4a_7c15));
}

/// `STACKS` stacks of `DEPTH` frames drawn from 2k functions of one kind.
fn stacks(jit: bool) -> Aggregate {
    let mut rng = Rng(42);
    let text_len = fs::metadata(std::env::current_exe().unwrap()).unwrap().len().min(0x200_0000);
    let pcs: Vec<u64> = (0..2000)
        .map(|i| if jit { JIT_BASE + (i * 37 % LINES as u64) * 0x400 + 0x20 } else { 0x400000 + rng.next() % text_len })
        .collect();
    let mut agg = Aggregate::default();
    for s in 0..STACKS {
        let user: Vec<u64> = (0..DEPTH).map(|_| pcs[(rng.next() % pcs.len() as u64) as usize]).collect();
        let key = StackKey {
            pid: 100,
            tid: 100 + s as u32,
            cpu: NO_CPU,
            thread_name: [0; 16],
            generation: 0,
            kernel: Box::new([]),
            user: user.into(),
            still_blocked: false,
        };
        agg.stacks.insert(key, 1);
    }
    agg
}

fn symbolize(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    fake_proc(dir.path());
    let mut group = c.benchmark_group("jit");
    group.throughput(Throughput::Elements((STACKS * DEPTH) as u64));
    for (name, jit) in [("symbolize_native_frames", false), ("symbolize_jit_frames", true)] {
        let agg = stacks(jit);
        let mut procs = ProcessTable::new(dir.path(), NonZeroUsize::new(16).unwrap());
        let mut sym = Symbolizer::new(Blaze::default(), KernelSymbols::default(), NonZeroUsize::new(1 << 18).unwrap());
        let profile = || Profile::new(ValueType::new("samples", "count"), None, 0, std::time::SystemTime::UNIX_EPOCH);
        // Warm: native addresses cached, the map read; what is measured is
        // the steady state of a daemon's interval.
        sym.symbolize(&agg, &mut procs, &mut profile());
        if jit {
            assert!(sym.stats().jit > 0, "JIT frames named");
        }
        group.bench_function(name, |b| b.iter(|| sym.symbolize(&agg, &mut procs, &mut profile())));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = parse, symbolize
}
criterion_main!(benches);
