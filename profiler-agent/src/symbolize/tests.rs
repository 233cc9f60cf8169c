//! Profile building against a fake /proc and a canned resolver.

use std::{fs, os::unix::fs::MetadataExt, path::Path, time::SystemTime};

use super::{cache::SymFrame, *};
use crate::process::ProcessTable;
use crate::{aggregate::Aggregator, bpf::fake::sample, profile::ValueType};

/// Answers from a table of (offset -> names innermost first) and counts calls.
#[derive(Default)]
struct Canned {
    table: HashMap<u64, Vec<(&'static str, bool)>>,
    calls: Vec<Vec<u64>>,
}

impl FileResolver for Canned {
    fn resolve(&mut self, _path: &Path, offsets: &[u64]) -> Vec<Resolved> {
        self.calls.push(offsets.to_vec());
        offsets
            .iter()
            .map(|o| {
                let frames: Vec<SymFrame> = self.table.get(o).map_or(Vec::new(), |v| {
                    v.iter()
                        .map(|(n, inl)| SymFrame { name: (*n).into(), file: None, line: Some(1), inlined: *inl })
                        .collect()
                });
                Resolved::from(frames)
            })
            .collect()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    procs: ProcessTable,
}

/// pid 100 ("app") maps this test binary's file at 0x400000 (offset 0) and
/// an anonymous executable region at 0x900000.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let ino = fs::metadata(&exe).unwrap().ino();
    let p = dir.path().join("100");
    fs::create_dir_all(&p).unwrap();
    fs::write(p.join("comm"), "app\n").unwrap();
    fs::write(
        p.join("maps"),
        format!("400000-500000 r-xp 00000000 fe:01 {ino} {}\n900000-901000 rwxp 00000000 00:00 0\n", exe.display()),
    )
    .unwrap();
    let procs = ProcessTable::new(dir.path(), NonZeroUsize::new(16).unwrap());
    Fixture { _dir: dir, procs }
}

fn kernel() -> KernelSymbols {
    KernelSymbols::parse(
        "ffffffff81000000 T entry_SYSCALL_64\nffffffff81000100 T do_syscall_64\nffffffff81000200 T schedule\n\
         ffffffff81000300 T bpf_trace_run4\nffffffff81000400 T _einittext\nffffffff81000500 T __traceiter_sched_switch\nffffffffc0000000 t bpf_prog_6deef7357e7b4530_sched_switch\n",
    )
}

fn profile() -> Profile {
    Profile::new(ValueType::new("samples", "count"), None, 0, SystemTime::UNIX_EPOCH)
}

fn names(p: &Profile, s: &Sample) -> Vec<String> {
    s.frames.iter().map(|&i| p.frames[i].function.clone()).collect()
}

#[test]
fn builds_frames_innermost_first_with_inlines_and_kernel() {
    let mut fx = fixture();
    let mut canned = Canned::default();
    // Leaf at offset 0x10 has `inner` inlined into `leaf`; 0x1ff is the call
    // site in main (return address 0x200 minus one).
    canned.table.insert(0x10, vec![("inner", true), ("leaf", false)]);
    canned.table.insert(0x1ff, vec![("main", false)]);
    let mut sym = Symbolizer::new(canned, kernel(), NonZeroUsize::new(64).unwrap());
    let mut agg = Aggregator::new(100);
    agg.add(&sample(100, 101, "app-worker", &[0xffffffff81000104, 0xffffffff81000010], &[0x400010, 0x400200]));
    agg.add(&sample(100, 101, "app-worker", &[0xffffffff81000104, 0xffffffff81000010], &[0x400010, 0x400200]));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    assert_eq!(p.samples.len(), 1);
    let s = &p.samples[0];
    assert_eq!((s.pid, s.tid, s.value), (100, 101, 2));
    assert_eq!(s.process_name, "app");
    assert_eq!(s.thread_name, "app-worker");
    assert_eq!(names(&p, s), ["do_syscall_64", "entry_SYSCALL_64", "inner", "leaf", "main"]);
    let kinds: Vec<FrameKind> = s.frames.iter().map(|&i| p.frames[i].kind).collect();
    assert_eq!(kinds, [FrameKind::Kernel, FrameKind::Kernel, FrameKind::Inlined, FrameKind::User, FrameKind::User]);
    let user_module = p.frames[s.frames[3]].module.unwrap();
    assert!(p.modules[user_module].build_id.is_some(), "the test binary has a GNU build id");
    assert_eq!(sym.stats().unsymbolized, 0);
}

#[test]
fn the_profilers_own_bpf_frames_are_dropped_from_the_inner_end() {
    let mut fx = fixture();
    let mut sym = Symbolizer::new(Canned::default(), kernel(), NonZeroUsize::new(64).unwrap());
    let mut agg = Aggregator::new(100);
    agg.add(&sample(
        100,
        100,
        "app",
        &[0xffffffffc0000010, 0xffffffff81000310, 0xffffffff81000210, 0xffffffff81000110],
        &[],
    ));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    assert_eq!(names(&p, &p.samples[0]), ["schedule", "do_syscall_64"]);

    // The program was unloaded before symbolization: its address resolves
    // to whatever symbol precedes it, and the glue frame still marks the end.
    let mut agg = Aggregator::new(100);
    agg.add(&sample(100, 100, "app", &[0xffffffff81000410, 0xffffffff81000310, 0xffffffff81000210], &[]));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    assert_eq!(names(&p, &p.samples[0]), ["schedule"]);

    // With several probes on the tracepoint, the kernel's iterator sits
    // between the scheduler and the glue.
    let mut agg = Aggregator::new(100);
    agg.add(&sample(
        100,
        100,
        "app",
        &[0xffffffffc0000010, 0xffffffff81000310, 0xffffffff81000510, 0xffffffff81000210],
        &[],
    ));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    assert_eq!(names(&p, &p.samples[0]), ["schedule"]);
}

#[test]
fn each_unique_address_is_resolved_once_across_intervals() {
    let mut fx = fixture();
    let mut canned = Canned::default();
    canned.table.insert(0x10, vec![("leaf", false)]);
    let mut sym = Symbolizer::new(canned, kernel(), NonZeroUsize::new(64).unwrap());
    for tid in [101, 102] {
        let mut agg = Aggregator::new(100);
        agg.add(&sample(100, tid, "t", &[], &[0x400010]));
        agg.add(&sample(100, tid, "t", &[], &[0x400010, 0x400031]));
        sym.symbolize(&agg.take(), &mut fx.procs, &mut profile());
    }
    // First interval: one batch with both offsets; second: all hits.
    assert_eq!(sym.resolver().calls.len(), 1);
    let mut first = sym.resolver().calls[0].clone();
    first.sort();
    assert_eq!(first, [0x10, 0x30]);
    assert_eq!(sym.cache_stats().misses, 2);
    assert_eq!(sym.cache_stats().hits, 2);
}

#[test]
fn unresolved_frames_are_named_and_counted() {
    let mut fx = fixture();
    let mut sym = Symbolizer::new(Canned::default(), kernel(), NonZeroUsize::new(64).unwrap());
    let mut agg = Aggregator::new(100);
    // No symbol at 0x400050, JIT-like anonymous code, an unmapped address,
    // and a kernel address below every symbol.
    agg.add(&sample(100, 100, "app", &[0x1000], &[0x400050, 0x900011, 0x123457]));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    let exe = std::env::current_exe().unwrap();
    let exe_name = exe.file_name().unwrap().to_string_lossy();
    assert_eq!(
        names(&p, &p.samples[0]),
        ["[kernel.kallsyms]+0x1000".to_string(), format!("{exe_name}+0x50"), "[anon]+0x10".into(), "[unknown]".into()]
    );
    assert_eq!(sym.stats(), SymbolizeStats { frames: 4, unsymbolized: 4, unknown_mapping: 1, jit: 0, jit_unnamed: 1 });
    assert_eq!(sym.jit_unnamed().get(&100), Some(&1), "the summary can say which process lacks a map");
}

/// Writes pid 100's perf map, in its own root, under the pid it sees (7).
fn with_perf_map(fx: &Fixture, map: &str) {
    let p = fx._dir.path().join("100");
    fs::write(p.join("status"), "Name:\tapp\nNStgid:\t100\t7\n").unwrap();
    fs::create_dir_all(p.join("root/tmp")).unwrap();
    fs::write(p.join("root/tmp/perf-7.map"), map).unwrap();
}

#[test]
fn jit_frames_are_named_from_the_perf_map_one_frame_per_function() {
    let mut fx = fixture();
    with_perf_map(&fx, "900000 100 JS:*hot /srv/w.js:3:13\n900100 80 LWork;::spin\n");
    let mut sym = Symbolizer::new(Canned::default(), kernel(), NonZeroUsize::new(64).unwrap());
    let mut agg = Aggregator::new(100);
    // Two pcs in `hot` (one the leaf, one a return address), one in `spin`.
    agg.add(&sample(100, 100, "app", &[], &[0x900010, 0x900121]));
    agg.add(&sample(100, 100, "app", &[], &[0x900050, 0x900131]));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    for s in &p.samples {
        assert_eq!(names(&p, s), ["JS:*hot", "LWork;::spin"]);
    }
    assert_eq!(p.samples[0].frames, p.samples[1].frames, "pcs of one function are one frame");
    let hot = &p.frames[p.samples[0].frames[0]];
    assert_eq!((hot.file.as_deref(), hot.line, hot.address), (Some("/srv/w.js"), Some(3), 0x900000));
    assert_eq!(hot.kind, FrameKind::Jit(crate::profile::JitRuntime::Other));
    assert!(!hot.unsymbolized);
    assert_eq!(sym.stats().jit, 4);
    assert_eq!(sym.stats().unsymbolized, 0);
}

#[test]
fn jit_code_outside_the_map_stays_anonymous() {
    let mut fx = fixture();
    with_perf_map(&fx, "900000 10 f\nbad line\n");
    let mut sym = Symbolizer::new(Canned::default(), kernel(), NonZeroUsize::new(64).unwrap());
    let mut agg = Aggregator::new(100);
    agg.add(&sample(100, 100, "app", &[], &[0x900800]));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    assert_eq!(names(&p, &p.samples[0]), ["[anon]+0x800"]);
    assert_eq!(fx.procs.jit.stats().malformed_lines, 1);
}

#[test]
fn a_process_that_exited_after_first_sight_keeps_its_frames() {
    let mut fx = fixture();
    fx.procs.observe(100, "app");
    fs::remove_dir_all(fx._dir.path().join("100")).unwrap();
    let mut canned = Canned::default();
    canned.table.insert(0x10, vec![("leaf", false)]);
    let mut sym = Symbolizer::new(canned, kernel(), NonZeroUsize::new(64).unwrap());
    let mut agg = Aggregator::new(100);
    agg.add(&sample(100, 100, "app", &[], &[0x400010]));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    assert_eq!(names(&p, &p.samples[0]), ["leaf"]);
    assert_eq!(p.samples[0].process_name, "app");
}

#[test]
fn cpython_trampolines_are_dropped_where_the_interpreter_frames_were_read() {
    let mut fx = fixture();
    fs::write(fx._dir.path().join("100/comm"), "python3.12\n").unwrap();
    with_perf_map(&fx, "900000 b py::hot:/srv/app.py\n900010 b py::main:/srv/app.py\n");
    let mut sym = Symbolizer::new(Canned::default(), kernel(), NonZeroUsize::new(64).unwrap());
    let mut agg = Aggregator::new(100);
    let py = profiler_common::python::encode_py_frame(0x7000, 4);
    // With a Python frame read from the interpreter the trampolines go; a
    // stack of the same process without one keeps them, named from the map.
    // 0x900806 is a trampoline not yet in the map (3.13's buffered jitdump).
    agg.add(&sample(100, 100, "python3.12", &[], &[py, 0x900006, 0x900806, 0x900016]));
    agg.add(&sample(100, 101, "python3.12", &[], &[0x900006, 0x900806, 0x900016]));
    let mut p = profile();
    sym.symbolize(&agg.take(), &mut fx.procs, &mut p);
    let by_tid = |tid: u32| names(&p, p.samples.iter().find(|s| s.tid == tid).unwrap());
    let read = by_tid(100);
    assert_eq!(read.len(), 1, "{read:?}");
    assert!(!read[0].starts_with("py::"), "{read:?}");
    assert_eq!(by_tid(101), ["py::hot", "[anon]+0x805", "py::main"]);
}
