//! System-wide off-CPU stacks of processes that mostly block: every
//! process is known to the unwinder before its blocks are captured (start
//! scan for those already running, first sight in the switch program for
//! those started later), so blocks through glibc reach their caller as with
//! `--pid`.

use std::{cell::RefCell, time::Duration};

use profiler_integration_tests::sched::{read_folded, record_windowed, COUNTERS_C};
use profiler_integration_tests::workload::{build_c, C_FP_FLAGS};
use profiler_integration_tests::{require_root, Workload};

const DURATION: Duration = Duration::from_secs(6);
/// Share of each process's blocked time whose stack reaches the caller of
/// usleep() (issue 9: >= 95 % from the first second on).
const MIN_COMPLETE: f64 = 0.95;

/// Blocks in glibc's usleep(1 ms) from `block_in_libc`, forever.
const SLEEPER_C: &str = r#"
__attribute__((noinline)) void block_in_libc(void) {
    volatile int rc = usleep(1000);
    (void)rc;
}

__attribute__((noinline)) void worker(void) {
    volatile int running = 1;
    while (running)
        block_in_libc();
}

int main(int argc, char **argv) {
    (void)argc;
    counters_open(argv[0]);
    worker();
    return 0;
}
"#;

#[test]
fn system_wide_blocks_through_glibc_reach_the_caller_from_the_first_second() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let source = format!("{COUNTERS_C}{SLEEPER_C}");
    // Started before the agent: found by its start scan.
    let early_bin = build_c(dir.path(), "sw_sleep_early", &source, C_FP_FLAGS);
    // Started while it records: first seen by the switch program.
    let late_bin = build_c(dir.path(), "sw_sleep_late", &source, C_FP_FLAGS);
    let _early = Workload::spawn("sw_sleep_early", &early_bin, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let late: RefCell<Option<Workload>> = RefCell::new(None);
    let r = record_windowed(&["--off-cpu"], DURATION, || {
        if late.borrow().is_none() {
            *late.borrow_mut() = Some(Workload::spawn("sw_sleep_late", &late_bin, &[]));
        }
    });
    let off = read_folded(&r.out, "off-cpu.folded");
    for name in ["sw_sleep_early", "sw_sleep_late"] {
        let p = off.process(name);
        let total = p.total() as f64;
        let complete = p.count_with_subsequence(&["main", "worker", "block_in_libc"]) as f64;
        let ctx = format!("{name} off-CPU stacks:\n{}\n{}", p.top(8), r.out.context());
        eprintln!("{name}: {:.3} s off-CPU, {:.1}% reaching block_in_libc", total / 1e9, complete / total * 100.0);
        assert!(total > 0.5e9, "{name} has only {:.3} s off-CPU\n{ctx}", total / 1e9);
        assert!(
            complete >= MIN_COMPLETE * total,
            "{name}: {:.1}% of its blocked time reaches block_in_libc, want >= {:.0}%\n{ctx}",
            complete / total * 100.0,
            MIN_COMPLETE * 100.0
        );
    }
}
