//! On-CPU sampling of C workloads with frame pointers: stack shape, the split
//! of samples between two leaves, the sampling rate, and `--pid` filtering.

use std::time::{Duration, Instant};

use profiler_integration_tests::agent::RECORD_TIMEOUT;
use profiler_integration_tests::folded::frame_is;
use profiler_integration_tests::workload::{BUSY_C, C_FP_FLAGS, FP_RATIO_C};
use profiler_integration_tests::{record, require_root, spawn_record, RecordOutput, Workload};

const FREQUENCY: u64 = 99;
const DURATION_SECS: u64 = 5;

/// Allowed relative error of the leaf_alpha:leaf_beta sample ratio (expected
/// 3.0: same loop body, 3x the iterations). When the workload keeps its CPU,
/// single 5 s runs gave 2.75-3.24 (most within 3% of 3.0). When other work
/// preempts it, which sample hits which leaf is close to random: with ~125
/// leaf_beta samples the ratio's standard deviation is ~10-13%, and single
/// runs were seen at 3.48 and (4 busy loops on 2 CPUs) 3.80. So the ratio is
/// judged on the counts pooled over up to
/// RATIO_MAX_RECORDINGS recordings (one more only while the pooled ratio is
/// off); a real misattribution stays off however many runs are pooled.
const RATIO_TOLERANCE: f64 = 0.15;
const RATIO_MAX_RECORDINGS: usize = 3;

/// Allowed relative error of the workload's sample count (first recording)
/// against FREQUENCY x DURATION x (share of a CPU the workload actually got
/// during the sampling window, from /proc/<pid>/schedstat). On an idle machine
/// the share is ~1.0 and the expectation is 99 x 5 = 495 (measured 494-496);
/// on a VM shared with builds the workload gets less CPU even when reniced to
/// -20, which is not the agent's fault. The window starts when the agent holds
/// perf_event fds, so the agent's start-up is not counted.
const COUNT_TOLERANCE: f64 = 0.15;

/// Minimum fraction of leaf_alpha samples with the full main -> middle ->
/// leaf_alpha chain. Only samples on the leaf's 2-instruction prologue or
/// epilogue may lose `middle` in a frame-pointer walk.
const MIN_ORDERED_FRACTION: f64 = 0.95;

/// Records `w` for DURATION_SECS at FREQUENCY; returns the output and the
/// share of a CPU the workload got while the agent was sampling.
fn record_measuring_share(w: &Workload) -> (RecordOutput, f64) {
    let mut agent = spawn_record(&[
        "--pid",
        &w.pid_arg(),
        "--duration",
        &DURATION_SECS.to_string(),
        "--frequency",
        &FREQUENCY.to_string(),
    ]);
    // From the moment the agent has perf events attached, for DURATION_SECS.
    let (spawned, cpu_at_spawn) = (Instant::now(), w.cpu_time());
    let window = Duration::from_secs(DURATION_SECS);
    let attached = agent.wait_attached(Duration::from_secs(60));
    let (cpu0, t0) = (w.cpu_time(), Instant::now());
    if attached.is_some() {
        std::thread::sleep(window.saturating_sub(t0.elapsed()));
    }
    let (cpu, wall) = match attached {
        Some(_) => (w.cpu_time() - cpu0, t0.elapsed()),
        None => {
            // Not seen attaching (it may have exited): use its whole run.
            eprintln!("fp_ratio: agent not seen attaching; CPU share over its whole run");
            (w.cpu_time() - cpu_at_spawn, spawned.elapsed())
        }
    };
    let share = (cpu.as_secs_f64() / wall.as_secs_f64()).min(1.0);
    let out = agent.wait(RECORD_TIMEOUT);
    out.assert_success();
    (out, share)
}

#[test]
fn fp_stacks_leaf_ratio_and_sample_rate() {
    require_root();
    let mut w = Workload::c("fp_ratio", FP_RATIO_C, C_FP_FLAGS);
    w.boost();
    w.warm_up();

    let (out, share) = record_measuring_share(&w);
    let p = out.folded().process("fp_ratio");
    let ctx = format!("fp_ratio stacks:\n{}\n{}", p.top(15), out.context());

    let alpha = p.count_with_frame("leaf_alpha");
    let beta = p.count_with_frame("leaf_beta");
    let total = p.total();
    let nominal = (FREQUENCY * DURATION_SECS) as f64;
    let expected = nominal * share;
    eprintln!(
        "fp_ratio: alpha={alpha} beta={beta} ratio={:.3} total={total} expected={expected:.0} \
         (nominal {nominal:.0} x cpu share {share:.3})",
        alpha as f64 / beta as f64
    );
    assert!(alpha > 0, "no sample in leaf_alpha\n{ctx}");
    assert!(beta > 0, "no sample in leaf_beta\n{ctx}");

    // main -> middle -> leaf, the leaf being the innermost user frame.
    for leaf in ["leaf_alpha", "leaf_beta"] {
        let with_leaf = p.count_with_frame(leaf);
        let ordered = p.count_where(|s| {
            s.has_subsequence(&["main", "middle", leaf]) && s.last_user_frame().is_some_and(|f| frame_is(f, leaf))
        });
        let fraction = ordered as f64 / with_leaf as f64;
        assert!(
            fraction >= MIN_ORDERED_FRACTION,
            "only {ordered} of {with_leaf} {leaf} samples ({:.1}%) have main;middle;{leaf} \
             with {leaf} as the innermost user frame (want >= {:.0}%)\n{ctx}",
            fraction * 100.0,
            MIN_ORDERED_FRACTION * 100.0
        );
    }

    let error = (total as f64 - expected) / expected;
    assert!(
        error.abs() <= COUNT_TOLERANCE,
        "fp_ratio has {total} samples, expected {expected:.0} ± {:.0}% ({FREQUENCY} Hz x \
         {DURATION_SECS} s = {nominal:.0}, x {share:.3}, the share of a CPU the workload \
         got while sampled); off by {:+.1}%\n{ctx}",
        COUNT_TOLERANCE * 100.0,
        error * 100.0
    );

    let ratio_ok = |a: u64, b: u64| (a as f64 / b as f64 - 3.0).abs() <= 3.0 * RATIO_TOLERANCE;
    let mut runs = vec![(alpha, beta)];
    let (mut pooled_alpha, mut pooled_beta) = (alpha, beta);
    while !ratio_ok(pooled_alpha, pooled_beta) && runs.len() < RATIO_MAX_RECORDINGS {
        eprintln!(
            "fp_ratio: pooled ratio {pooled_alpha}:{pooled_beta} is off after {} recording(s); \
             recording again",
            runs.len()
        );
        let (more, _) = record_measuring_share(&w);
        let more = more.folded().process("fp_ratio");
        let (a, b) = (more.count_with_frame("leaf_alpha"), more.count_with_frame("leaf_beta"));
        runs.push((a, b));
        pooled_alpha += a;
        pooled_beta += b;
    }
    let ratio = pooled_alpha as f64 / pooled_beta as f64;
    assert!(
        ratio_ok(pooled_alpha, pooled_beta),
        "leaf_alpha:leaf_beta = {pooled_alpha}:{pooled_beta} = {ratio:.3} pooled over \
         {} recordings (alpha, beta per run: {runs:?}), want 3.0 ± {:.0}%\n{ctx}",
        runs.len(),
        RATIO_TOLERANCE * 100.0
    );
}

#[test]
fn pid_filter_samples_only_the_given_process() {
    require_root();
    let mut chosen = Workload::c("pid_chosen", BUSY_C, C_FP_FLAGS);
    let mut other = Workload::c("pid_other", BUSY_C, C_FP_FLAGS);
    chosen.warm_up();
    other.warm_up();

    let out = record(&["--pid", &chosen.pid_arg(), "--duration", "3"]);
    out.assert_success();
    let all = out.folded();
    let ctx = format!("cpu.folded:\n{}\n{}", all.top(20), out.context());

    let procs = all.processes();
    assert!(
        !procs.contains("pid_other"),
        "pid_other (pid {}) was not asked for but has {} samples\n{ctx}",
        other.pid(),
        all.process("pid_other").total()
    );
    assert_eq!(
        procs.iter().collect::<Vec<_>>(),
        vec!["pid_chosen"],
        "only pid_chosen (pid {}) may appear\n{ctx}",
        chosen.pid()
    );
    let chosen_samples = all.process("pid_chosen");
    assert!(chosen_samples.total() > 0, "pid_chosen has no samples\n{ctx}");
    assert!(
        chosen_samples.count_with_subsequence(&["main", "busy_loop"]) > 0,
        "no pid_chosen stack has main;busy_loop\n{ctx}"
    );
    chosen.assert_running();
    other.assert_running();
}

#[test]
fn repeated_pid_samples_each_given_process() {
    require_root();
    let mut first = Workload::c("pid_first", BUSY_C, C_FP_FLAGS);
    let mut second = Workload::c("pid_second", BUSY_C, C_FP_FLAGS);
    let mut third = Workload::c("pid_third", BUSY_C, C_FP_FLAGS);
    for w in [&mut first, &mut second, &mut third] {
        w.warm_up();
    }

    let out = record(&["--pid", &first.pid_arg(), "--pid", &second.pid_arg(), "--duration", "3"]);
    out.assert_success();
    let all = out.folded();
    let ctx = format!("cpu.folded:\n{}\n{}", all.top(20), out.context());

    let procs: Vec<String> = all.processes().into_iter().collect();
    assert_eq!(
        procs,
        vec!["pid_first".to_string(), "pid_second".to_string()],
        "want exactly the two --pid processes (pid_third, pid {}, must be absent)\n{ctx}",
        third.pid()
    );
}
