//! A hand-built profile shared by the exporter tests, covering every frame
//! shape the symbolizer produces: kernel, user, an inline chain,
//! unsymbolized-with-module and completely unknown.

use std::time::{Duration, SystemTime};

use crate::profile::{Frame, FrameKind, Module, Profile, ProfileBuilder, Sample, ValueType};

/// 100 Hz sampling: one sample stands for 10 ms of CPU.
pub const PERIOD: u64 = 10_000_000;
/// Seconds since the epoch of the fixture's window start.
pub const START_SECS: u64 = 1_700_000_000;
pub const DURATION_NS: u64 = 5_000_000_000;

pub fn frame(function: &str, kind: FrameKind, module: Option<usize>, address: u64) -> Frame {
    Frame { function: function.into(), file: None, line: None, module, address, kind, unsymbolized: false }
}

fn with_source(mut f: Frame, file: &str, line: u32) -> Frame {
    f.file = Some(file.into());
    f.line = Some(line);
    f
}

pub fn sample(pid: u32, tid: u32, process: &str, thread: &str, frames: Vec<usize>, value: u64) -> Sample {
    Sample {
        pid,
        tid,
        process_name: process.into(),
        thread_name: thread.into(),
        cpu: Some(1),
        frames,
        value,
        labels: Vec::new(),
    }
}

/// Frames in the fixture, by what the tests call them.
pub struct Ids {
    pub kernel: usize,
    pub inner_inline: usize,
    pub mid_inline: usize,
    pub outer: usize,
    pub main: usize,
    pub worker_loop: usize,
    pub libc_unsym: usize,
    pub unknown: usize,
}

/// An on-CPU profile of process `app` with two threads.
///
/// Samples (leaf first):
/// - tid 100 `app`:    inner_inline, mid_inline, outer, main      = 3
/// - tid 101 `worker`: do_syscall_64 [k], libc+0x1234, worker_loop, main = 2
/// - tid 101 `worker`: [unknown], main                            = 1
/// - tid 101 `worker`: main                                       = 0 (skipped)
pub fn on_cpu_profile() -> (Profile, Ids) {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(START_SECS);
    let mut p =
        Profile::new(ValueType::new("samples", "count"), Some(ValueType::new("cpu", "nanoseconds")), PERIOD, start);
    p.duration_ns = DURATION_NS;
    let mut b = ProfileBuilder::default();
    let kernel = b.module(&mut p, Module { path: "[kernel.kallsyms]".into(), build_id: None });
    let app = b.module(&mut p, Module { path: "/usr/bin/app".into(), build_id: Some("deadbeef01".into()) });
    let libc = b.module(&mut p, Module { path: "/usr/lib/libc.so.6".into(), build_id: Some("c0ffee".into()) });

    let mut f = |fr: Frame| b.frame(&mut p, fr);
    let ids = Ids {
        kernel: f(frame("do_syscall_64", FrameKind::Kernel, Some(kernel), 0xffff_ffff_8100_0010)),
        inner_inline: f(with_source(frame("inner_inline", FrameKind::Inlined, Some(app), 0x1100), "src/a.rs", 10)),
        mid_inline: f(with_source(frame("mid_inline", FrameKind::Inlined, Some(app), 0x1100), "src/a.rs", 20)),
        outer: f(with_source(frame("outer", FrameKind::User, Some(app), 0x1100), "src/a.rs", 30)),
        main: f(with_source(frame("main", FrameKind::User, Some(app), 0x1000), "src/main.rs", 5)),
        worker_loop: f(with_source(frame("worker_loop", FrameKind::User, Some(app), 0x1200), "src/w.rs", 7)),
        libc_unsym: f(Frame { unsymbolized: true, ..frame("libc.so.6+0x1234", FrameKind::User, Some(libc), 0x1234) }),
        unknown: f(Frame { unsymbolized: true, ..frame("[unknown]", FrameKind::User, None, 0) }),
    };

    p.samples = vec![
        sample(100, 100, "app", "app", vec![ids.inner_inline, ids.mid_inline, ids.outer, ids.main], 3),
        sample(100, 101, "app", "worker", vec![ids.kernel, ids.libc_unsym, ids.worker_loop, ids.main], 2),
        sample(100, 101, "app", "worker", vec![ids.unknown, ids.main], 1),
        sample(100, 101, "app", "worker", vec![ids.main], 0),
    ];
    (p, ids)
}
