//! Scheduler-map cleanup after threads exit, `--off-cpu-min-block`, and the
//! per-thread wall-clock view (`record --off-cpu`).

use profiler_integration_tests::offcpu::{
    args, ms, pid_args, relative_error, secondary_threads, start, summary, BLOCKED_TOLERANCE, DURATION,
};
use profiler_integration_tests::require_root;
use profiler_integration_tests::sched::{
    read_folded, record_windowed, thread_ids, thread_name, thread_sched, Counters, Windowed,
};

/// Allowed relative error of a thread's wall-clock total (on-CPU samples x
/// period + off-CPU ns) against the window. The on-CPU half is a sample
/// count: ~250 samples at 99 Hz have a ~6% standard deviation, ~3% of the
/// total; time the thread spends preempted (runnable, not running) is
/// neither on- nor off-CPU and is missing (the workload is reniced to -20 to
/// keep it small, and it is printed).
const WALL_TOLERANCE: f64 = 0.15;

/// `--off-cpu-min-block` of the min-block test, and the workload's blocks.
const MIN_BLOCK: &str = "5ms";

/// Waits for the test's go (counters[3] = 1), then creates and joins
/// THREADS threads, BATCH at a time; each spins a little and sleeps 200 us,
/// so it blocks at least once. Then main sleeps 50 ms in a loop.
///
/// counters[0]: threads created; [1]: threads joined; [2]: 1 when all are
/// joined; [3]: set by the test.
const CHURN_THREADS: u64 = 1000;
const CHURN_C: &str = r#"
#define THREADS 1000
#define BATCH 10

__attribute__((noinline)) void short_life(void) {
    volatile uint64_t acc = 0;
    for (uint64_t i = 0; i < 20000; i++)
        acc += i;
    struct timespec ts = {0, 200000};
    nanosleep(&ts, 0);
}

static void *thread_main(void *arg) {
    (void)arg;
    short_life();
    return 0;
}

int main(int argc, char **argv) {
    (void)argc;
    counters_open(argv[0]);
    while (!counters[3]) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, 0);
    }
    for (int done = 0; done < THREADS; done += BATCH) {
        pthread_t t[BATCH];
        for (int i = 0; i < BATCH; i++) {
            if (pthread_create(&t[i], 0, thread_main, 0) != 0) exit(3);
            counters[0]++;
        }
        for (int i = 0; i < BATCH; i++) {
            pthread_join(t[i], 0);
            counters[1]++;
        }
    }
    counters[2] = 1;
    for (;;) {
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, 0);
    }
}
"#;

#[test]
fn exited_threads_leave_no_map_entries() {
    require_root();
    let mut w = start("thread_churn", CHURN_C);
    w.warm_up();
    let counters = Counters::open(&w);
    let pid = w.pid();
    let mut go = Some(());
    let r: Windowed<Vec<u64>> = record_windowed(&args(&pid_args(&w)), DURATION, || {
        let now = counters.read();
        if go.take().is_some() {
            counters.write(3, 1);
        }
        now
    });
    let live = thread_ids(pid);
    let s = summary(&r.out);
    let ctx = format!("summary: {s:?}\nlive threads: {live:?}\n{}", r.out.context());
    eprintln!(
        "thread_churn: created {} threads in the window; maps at exit: {} blocked, {} waiting \
         to run, {:?} threads tracked; {} live threads; {} blocks captured",
        r.end[0] - r.start[0],
        s.still_blocked,
        s.waiting_to_run,
        s.threads_tracked,
        live.len(),
        s.blocks
    );
    assert_eq!(r.start[0], 0, "threads were created before the recording\n{ctx}");
    assert_eq!(
        (r.end[1], r.end[2]),
        (CHURN_THREADS, 1),
        "the {CHURN_THREADS} threads were not all joined within the window\n{ctx}"
    );
    // The threads were seen: each blocked at least once in its sleep.
    assert!(
        s.blocks >= CHURN_THREADS,
        "only {} blocks captured for {CHURN_THREADS} threads that each sleep\n{ctx}",
        s.blocks
    );
    if let Some(tracked) = s.threads_tracked {
        assert!(
            tracked <= live.len() as u64,
            "{tracked} threads tracked in the scheduler maps at exit, but thread_churn has \
             only {} live threads (its exited threads leaked entries)\n{ctx}",
            live.len()
        );
    }
    assert!(
        s.still_blocked + s.waiting_to_run <= live.len() as u64,
        "{} threads still blocked + {} waiting to run left in the scheduler maps, but \
         thread_churn has only {} live threads (its exited threads leaked entries)\n{ctx}",
        s.still_blocked,
        s.waiting_to_run,
        live.len()
    );
}

/// Alternates a 100 us sleep in `short_block` and a 20 ms sleep in
/// `long_block`, each through its own syscall instruction.
///
/// counters: [0] short blocks, [1] their ns, [2] short blocks that took at
/// least SLOW_NS (5 ms, the test's --off-cpu-min-block) after all, [3] their
/// ns, [4] long blocks, [5] their ns.
const MIN_BLOCK_C: &str = r#"
#define SHORT_NS 100000ull
#define LONG_NS 20000000ull
#define SLOW_NS 5000000ull

__attribute__((noinline)) void short_block(void) {
    volatile long ret;
    uint64_t t0 = now_ns();
    SLEEP_SYSCALL(ret, SHORT_NS);
    uint64_t d = now_ns() - t0;
    counters[0]++;
    counters[1] += d;
    if (d >= SLOW_NS) {
        counters[2]++;
        counters[3] += d;
    }
    (void)ret;
}

__attribute__((noinline)) void long_block(void) {
    volatile long ret;
    uint64_t t0 = now_ns();
    SLEEP_SYSCALL(ret, LONG_NS);
    counters[5] += now_ns() - t0;
    counters[4]++;
    (void)ret;
}

__attribute__((noinline)) void worker(void) {
    volatile int running = 1;
    while (running) {
        short_block();
        long_block();
    }
}

int main(int argc, char **argv) {
    (void)argc;
    counters_open(argv[0]);
    worker();
    return 0;
}
"#;

/// Allowed relative error (plus MIN_BLOCK_COUNT_SLACK) of the summary's
/// count of blocks shorter than --off-cpu-min-block against the short
/// sleeps the workload did in the window (each blocks exactly once).
const MIN_BLOCK_COUNT_TOLERANCE: f64 = 0.20;
const MIN_BLOCK_COUNT_SLACK: u64 = 5;

#[test]
fn min_block_filters_short_blocks() {
    require_root();
    let mut w = start("min_block", MIN_BLOCK_C);
    // At nice -20 the 100 us sleeps are rarely delayed past 5 ms by other
    // load; those that are (the workload counts them) are legitimately long.
    w.boost();
    w.warm_up();
    let counters = Counters::open(&w);
    let mut a = pid_args(&w);
    a.extend(["--off-cpu-min-block".into(), MIN_BLOCK.into()]);
    let r = record_windowed(&args(&a), DURATION, || counters.read());
    let off = read_folded(&r.out, "off-cpu.folded");
    let p = off.process("min_block");
    let s = summary(&r.out);
    let ctx = format!("summary: {s:?}\noff-CPU stacks:\n{}\n{}", off.top(15), r.out.context());
    let d = |i: usize| r.end[i] - r.start[i];
    let (short, slow_short, slow_short_ns, long_ns) = (d(0), d(2), d(3), d(5) as f64);
    let short_recorded = p.count_with_frame("short_block");
    let long_recorded = p.count_with_frame("long_block") as f64;
    eprintln!(
        "min_block: workload: {short} short blocks ({slow_short} took >= {MIN_BLOCK}), {} long \
         blocks, {} long; agent: long_block {}, short_block {}, {} shorter than min-block",
        d(4),
        ms(long_ns),
        ms(long_recorded),
        ms(short_recorded as f64),
        s.short_blocks
    );

    assert!(long_recorded > 0.0, "long_block is missing from off-cpu.folded\n{ctx}");
    let error = relative_error(long_recorded, long_ns);
    assert!(
        error.abs() <= BLOCKED_TOLERANCE,
        "long_block has {} off-CPU, the workload measured {}: off by {:+.1}%, want ± {:.0}%\n{ctx}",
        ms(long_recorded),
        ms(long_ns),
        error * 100.0,
        BLOCKED_TOLERANCE * 100.0
    );
    // No short_block, unless some 100 us sleeps really took >= 5 ms.
    assert!(
        short_recorded <= slow_short_ns,
        "short_block has {} off-CPU with --off-cpu-min-block {MIN_BLOCK}; only {slow_short} of \
         its sleeps ({}) took that long\n{ctx}",
        ms(short_recorded as f64),
        ms(slow_short_ns as f64)
    );
    assert!(s.short_blocks > 0, "no block counted as shorter than --off-cpu-min-block\n{ctx}");
    let fast = short - slow_short;
    let allowed = (fast as f64 * MIN_BLOCK_COUNT_TOLERANCE) as u64 + MIN_BLOCK_COUNT_SLACK;
    assert!(
        s.short_blocks.abs_diff(fast) <= allowed,
        "{} blocks counted as shorter than {MIN_BLOCK}; the workload did {fast} sleeps of \
         100 us that took less (want ± {:.0}% + {MIN_BLOCK_COUNT_SLACK})\n{ctx}",
        s.short_blocks,
        MIN_BLOCK_COUNT_TOLERANCE * 100.0
    );
}

/// A thread named `mixer` alternates spinning in `spin_here` and sleeping in
/// `block_here` (own syscall), each for 4-10 ms drawn at random, so ~50% of
/// each, and the cycle does not alias with 99 Hz sampling. Main waits in
/// pthread_join (blocked since before the recording; only the mixer is
/// checked).
const WALL_C: &str = r#"
static uint64_t rng = 88172645463325252ull;

static uint64_t random_4_to_10_ms(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return 4000000ull + rng % 6000000ull;
}

__attribute__((noinline)) void spin_here(uint64_t ns) {
    volatile uint64_t acc = 0;
    uint64_t end = now_ns() + ns;
    do {
        for (int i = 0; i < 10000; i++)
            acc += i;
    } while (now_ns() < end);
}

__attribute__((noinline)) void block_here(uint64_t ns) {
    volatile long ret;
    SLEEP_SYSCALL(ret, ns);
    (void)ret;
}

static void *mixer(void *arg) {
    (void)arg;
    for (;;) {
        spin_here(random_4_to_10_ms());
        block_here(random_4_to_10_ms());
    }
    return 0;
}

int main(void) {
    pthread_t t;
    if (pthread_create(&t, 0, mixer, 0) != 0) exit(3);
    pthread_setname_np(t, "mixer");
    pthread_join(t, 0);
    return 0;
}
"#;

#[test]
fn wall_view_adds_on_and_off_cpu_per_thread() {
    require_root();
    let mut w = start("wall_mix", WALL_C);
    w.boost();
    w.warm_up();
    let pid = w.pid();
    let tids = secondary_threads(pid);
    assert_eq!(tids.len(), 1, "wall_mix should have one mixer thread: {tids:?}");
    let tid = tids[0];
    assert_eq!(thread_name(pid, tid).as_deref(), Some("mixer"));
    // Boost renices the main thread only (nice is per thread): do the mixer too.
    // SAFETY: setpriority(2) on a thread of our own child; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -20) };
    assert_eq!(rc, 0, "setpriority: {}", std::io::Error::last_os_error());

    let r = record_windowed(&args(&pid_args(&w)), DURATION, || thread_sched(pid, tid).expect("mixer alive"));
    let wall = read_folded(&r.out, "wall.folded");
    let thread_frame = format!("mixer [{tid}]");
    let mine = wall.filter(|s| s.process() == "wall_mix" && s.frames.get(1) == Some(&thread_frame));
    let ctx =
        format!("wall.folded ({} lines for {thread_frame}):\n{}\n{}", mine.stacks.len(), wall.top(15), r.out.context());
    let total = mine.total() as f64;
    let spin = mine.count_with_frame("spin_here") as f64;
    let block = mine.count_with_frame("block_here") as f64;
    let window = r.window.as_nanos() as f64;
    let delta = r.end.since(&r.start);
    eprintln!(
        "wall_mix: {thread_frame} wall {} in a {} window: spin_here {}, block_here {}; \
         schedstat: on-CPU {}, waiting on a run queue {}",
        ms(total),
        ms(window),
        ms(spin),
        ms(block),
        ms(delta.cpu_ns as f64),
        ms(delta.runq_wait_ns as f64)
    );
    assert!(spin > 0.0, "spin_here is missing from {thread_frame}'s wall lines\n{ctx}");
    assert!(block > 0.0, "block_here is missing from {thread_frame}'s wall lines\n{ctx}");
    let error = relative_error(total, window);
    assert!(
        error.abs() <= WALL_TOLERANCE,
        "{thread_frame}'s wall lines sum to {}, the window is {}: off by {:+.1}%, \
         want ± {:.0}%\n{ctx}",
        ms(total),
        ms(window),
        error * 100.0,
        WALL_TOLERANCE * 100.0
    );
}
