//! Two callers that block through one function at the same stack depth
//! look the same to the block-site fingerprint: the user registers at
//! kernel entry and the two return addresses it reads are equal, only
//! deeper frames differ. Their stacks are then told apart by the periodic
//! re-walk of a site (`REFRESH_EVERY` and `REFRESH_AGE` in the eBPF crate),
//! which samples which caller is blocking at each walk. Checked here: no
//! time is lost, and each caller gets a share near its true half; a site
//! that were never walked again would give one caller all of it.

use std::time::Duration;

use profiler_integration_tests::offcpu::{args, ms, pid_args, relative_error, start, BLOCKED_TOLERANCE};
use profiler_integration_tests::require_root;
use profiler_integration_tests::sched::{read_folded, record_windowed, Counters};

/// Long enough for about thirty re-walks of the shared site.
const DURATION: Duration = Duration::from_secs(8);
/// Each caller's share of the two callers' recorded time (truth: half).
/// The walks land on either caller about equally, so the share is a
/// proportion over ~30 of them: a standard deviation under 0.1.
const SHARE_RANGE: (f64, f64) = (0.15, 0.85);

/// `main` alternates `via_a` and `via_b`, which differ only in a constant
/// (so gcc does not merge them) and call `middle` -> `block_here`, a 1 ms
/// nanosleep through its own syscall instruction. Nothing that changes
/// between blocks (no timestamp) is on `block_here`'s frame.
/// counters[0]/[1]: ns in and calls of via_a; [2]/[3] the same for via_b.
const SHARED_C: &str = r#"
#define BLOCK_NS 1000000ull

__attribute__((noinline)) void block_here(void) {
    volatile long ret;
    SLEEP_SYSCALL(ret, BLOCK_NS);
    (void)ret;
}

__attribute__((noinline)) void middle(void) {
    volatile int pad = 0;
    block_here();
    (void)pad;
}

__attribute__((noinline)) void via_a(void) {
    volatile int tag = 1;
    uint64_t t0 = now_ns();
    middle();
    counters[0] += now_ns() - t0;
    counters[1]++;
    (void)tag;
}

__attribute__((noinline)) void via_b(void) {
    volatile int tag = 2;
    uint64_t t0 = now_ns();
    middle();
    counters[2] += now_ns() - t0;
    counters[3]++;
    (void)tag;
}

int main(int argc, char **argv) {
    (void)argc;
    counters_open(argv[0]);
    for (;;) {
        via_a();
        via_b();
    }
}
"#;

#[test]
fn callers_sharing_a_block_site_each_get_their_share() {
    require_root();
    let mut w = start("offcpu_shared", SHARED_C);
    w.warm_up();
    let counters = Counters::open(&w);
    let r = record_windowed(&args(&pid_args(&w)), DURATION, || counters.read());
    let p = read_folded(&r.out, "off-cpu.folded").process("offcpu_shared");
    let ctx = format!("offcpu_shared off-CPU stacks:\n{}\n{}", p.top(10), r.out.context());

    let truth = |slot: usize| (r.end[slot] - r.start[slot]) as f64;
    let (truth_a, truth_b) = (truth(0), truth(2));
    let got_a = p.count_with_subsequence(&["via_a", "middle", "block_here"]) as f64;
    let got_b = p.count_with_subsequence(&["via_b", "middle", "block_here"]) as f64;
    eprintln!(
        "via_a {} (workload {} in {} calls), via_b {} (workload {} in {} calls)",
        ms(got_a),
        ms(truth_a),
        r.end[1] - r.start[1],
        ms(got_b),
        ms(truth_b),
        r.end[3] - r.start[3]
    );
    assert!(truth_a > 0.0 && truth_b > 0.0, "the workload did not block during the window\n{ctx}");

    // Nothing lost: the two callers' stacks hold all of their blocked time.
    let error = relative_error(got_a + got_b, truth_a + truth_b);
    assert!(
        error.abs() <= BLOCKED_TOLERANCE,
        "via_a and via_b have {} off-CPU together; the workload measured {}: off by {:+.1}%, want ± {:.0}%\n{ctx}",
        ms(got_a + got_b),
        ms(truth_a + truth_b),
        error * 100.0,
        BLOCKED_TOLERANCE * 100.0
    );
    // Both callers are seen, near their true shares.
    let share = got_a / (got_a + got_b);
    let true_share = truth_a / (truth_a + truth_b);
    assert!(
        (SHARE_RANGE.0..=SHARE_RANGE.1).contains(&share),
        "via_a has {:.0}% of the shared site's time (the workload: {:.0}%), want {:.0}..{:.0}%\n{ctx}",
        share * 100.0,
        true_share * 100.0,
        SHARE_RANGE.0 * 100.0,
        SHARE_RANGE.1 * 100.0
    );
}
