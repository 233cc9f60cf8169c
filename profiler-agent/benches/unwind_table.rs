//! Unwind table build time for files every profiled host maps: the table
//! thread builds one per new executable mapping, so this bounds how fast a
//! freshly started process becomes unwindable.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use profiler_agent::unwind::table;

const FILES: &[&str] = &["/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/python3.11"];

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("unwind_table");
    for path in FILES {
        let Ok(bytes) = std::fs::read(path) else {
            eprintln!("skipping {path}: not readable");
            continue;
        };
        let t = table::build(&bytes).expect("table builds");
        eprintln!(
            "{path}: {} rows ({} before merge), {} CFI bytes, {} FDEs, {} unsupported rows",
            t.rows.len(),
            t.stats.rows_before_merge,
            t.stats.cfi_bytes,
            t.stats.fdes,
            t.stats.unsupported_rows
        );
        // Throughput in CFI bytes: the work scales with the section, not
        // with the file.
        group.throughput(Throughput::Bytes(t.stats.cfi_bytes as u64));
        let name = path.rsplit('/').next().unwrap_or(path);
        group.bench_function(name, |b| b.iter(|| table::build(std::hint::black_box(&bytes))));
    }
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
