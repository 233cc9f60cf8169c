//! Run-queue latency from the scheduler programs (`record --off-cpu`): two
//! CPU-bound threads sharing a CPU, and a lone thread waking on an idle CPU.
//! Expected values come from /proc (see offcpu.rs for the method).

use std::time::Duration;

use profiler_integration_tests::offcpu::{args, ms, pid_args, secondary_threads, start, DURATION};
use profiler_integration_tests::require_root;
use profiler_integration_tests::sched::{
    cpu_times, latency_row, read_folded, read_latency, record_windowed, thread_sched, LatencyRow, ThreadSched,
};

/// Allowed relative error (plus RUNQ_COUNT_SLACK) of the number of run-queue
/// waits against the context switches /proc counted in the same window. Each
/// switch-out of a CPU-bound thread is a preemption, and the switch-in that
/// follows ends one run-queue wait, so they match one to one; the edges
/// differ by one wait per thread (a preemption before the agent attached), and
/// the /proc snapshots are a few milliseconds off the agent's attach and
/// detach (at ~250 switches/s per CPU, a few switches).
const RUNQ_COUNT_TOLERANCE: f64 = 0.20;

const RUNQ_COUNT_SLACK: u64 = 20;

/// Bounds of the p50 run-queue latency of two CPU-bound threads sharing one
/// CPU. Each waits while the other runs its slice: EEVDF's base slice is
/// 0.75 ms x (1 + log2(CPUs)) = 1.5 ms here, but with HZ=250 preemption
/// happens at a tick, so ~4 ms is expected; other load on the VM and the
/// percentile's interpolation inside a log2 bucket (up to 2x) widen it.
const PAIR_P50_MIN: Duration = Duration::from_micros(100);

const PAIR_P50_MAX: Duration = Duration::from_millis(50);

/// Largest off-CPU time of the two CPU-bound threads, as a share of the
/// window: they never block (preemption is not off-CPU), so anything above a
/// page fault or two is misclassified preemption.
const PAIR_MAX_OFF_CPU_SHARE: f64 = 0.02;

/// Largest p50 run-queue latency of a thread that wakes up on an otherwise
/// idle CPU. Waking on an idle CPU takes a few microseconds (measured
/// ~5-30 us); other sessions on this 2-CPU VM may run on CPU 1, so 200 us.
const LONE_P50_MAX: Duration = Duration::from_micros(200);

/// Largest share of CPU 1 that other work may take for the lone-thread
/// premise to hold. With a nice-0 CPU hog on CPU 1 the p50 of the (nice -20)
/// sleeper was 850 us in some runs and 7 us in others: a busy CPU is not
/// what that test is about. Below 30% busy, most wake-ups still find the CPU
/// idle, so the p50 is unaffected. A p50 >= LONE_P50_MAX is excused only when
/// CPU 1 was busier than this; such a recording is repeated, up to
/// LONE_MAX_RECORDINGS.
const LONE_MAX_OTHER_BUSY: f64 = 0.30;

const LONE_MAX_RECORDINGS: usize = 3;

/// Fewest wake-ups of the lone thread in a recording for the premise to hold
/// (~4500 in 5 s on an idle CPU). The kernel (6.18, this VM) was seen to
/// leave a task that had just moved itself to a CPU 1 busy with a nice-0 CPU
/// hog runnable but unscheduled for 15 s and more (0 context switches in
/// /proc, also with no agent running); such a recording says nothing about
/// wake-up latency.
const LONE_MIN_WAKEUPS: u64 = 1000;

/// Two threads spinning forever, both pinned to CPU 0; main waits in
/// pthread_join (blocked since before the recording: found by the start
/// scan, off-CPU for the whole window, and left out of the checks below).
const PAIR_C: &str = r#"
static void pin_to_cpu0(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) exit(3);
}

__attribute__((noinline)) void spin_forever(void) {
    volatile uint64_t acc = 0;
    for (;;)
        acc++;
}

static void *spinner(void *arg) {
    (void)arg;
    pin_to_cpu0();
    spin_forever();
    return 0;
}

int main(void) {
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        if (pthread_create(&t[i], 0, spinner, 0) != 0) exit(4);
    pthread_join(t[0], 0);
    return 0;
}
"#;

fn sum_sched(pid: u32, tids: &[u32]) -> ThreadSched {
    tids.iter().map(|&t| thread_sched(pid, t).unwrap_or_else(|| panic!("thread {t} of {pid} is gone"))).fold(
        ThreadSched::default(),
        |a, b| ThreadSched {
            cpu_ns: a.cpu_ns + b.cpu_ns,
            runq_wait_ns: a.runq_wait_ns + b.runq_wait_ns,
            voluntary_switches: a.voluntary_switches + b.voluntary_switches,
            nonvoluntary_switches: a.nonvoluntary_switches + b.nonvoluntary_switches,
        },
    )
}

fn cpus_allowed(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn runq_row<'a>(rows: &'a [LatencyRow], pid: u32, ctx: &str) -> &'a LatencyRow {
    latency_row(rows, pid, "runqueue").unwrap_or_else(|| panic!("latency.csv has no runqueue row for pid {pid}\n{ctx}"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()
}

/// Checks the run-queue wait count against the switches /proc counted.
fn assert_count_matches_switches(count: u64, switches: u64, what: &str, ctx: &str) {
    let allowed = (switches as f64 * RUNQ_COUNT_TOLERANCE) as u64 + RUNQ_COUNT_SLACK;
    assert!(
        count.abs_diff(switches) <= allowed,
        "{what}: latency.csv counts {} run-queue waits, /proc counted {switches} context \
         switches of the same threads in the window (want ± {:.0}% + {RUNQ_COUNT_SLACK})\n{ctx}",
        count,
        RUNQ_COUNT_TOLERANCE * 100.0
    );
}

#[test]
fn run_queue_latency_of_two_threads_sharing_a_cpu() {
    require_root();
    let mut w = start("rq_pair", PAIR_C);
    w.warm_up();
    let pid = w.pid();
    let tids = secondary_threads(pid);
    assert_eq!(tids.len(), 2, "rq_pair should have 2 spinning threads: {tids:?}");
    for &t in &tids {
        assert_eq!(cpus_allowed(pid, t), "0", "thread {t} is not pinned to CPU 0");
    }
    let r = record_windowed(&args(&pid_args(&w)), DURATION, || sum_sched(pid, &tids));
    let rows = read_latency(&r.out);
    // The spinning threads only (main's stacks go through `main`).
    let off = read_folded(&r.out, "off-cpu.folded").process("rq_pair").filter(|s| !s.has_subsequence(&["main"]));
    let delta = r.end.since(&r.start);
    let ctx = format!(
        "latency.csv: {rows:#?}\n/proc in the window (both threads): {delta:?}\n\
         off-CPU stacks:\n{}\nload: {}\n{}",
        off.top(10),
        loadavg(),
        r.out.context()
    );
    let row = runq_row(&rows, pid, &ctx);
    eprintln!(
        "rq_pair: runqueue count {} p50 {} p95 {} max {}; /proc: {} switches ({} voluntary), \
         mean wait {} (schedstat); off-CPU {} in a {} window; load {}",
        row.count,
        ms(row.p50_ns),
        ms(row.p95_ns),
        ms(row.max_ns as f64),
        delta.switches(),
        delta.voluntary_switches,
        ms(delta.runq_wait_ns as f64 / delta.switches().max(1) as f64),
        ms(off.total() as f64),
        ms(r.window.as_nanos() as f64),
        loadavg()
    );

    let p50 = Duration::from_nanos(row.p50_ns as u64);
    assert!(
        (PAIR_P50_MIN..=PAIR_P50_MAX).contains(&p50),
        "p50 run-queue latency {p50:?} of two CPU-bound threads on one CPU is outside \
         [{PAIR_P50_MIN:?}, {PAIR_P50_MAX:?}] (the order of a scheduler slice)\n{ctx}"
    );
    assert_count_matches_switches(row.count, delta.switches(), "rq_pair", &ctx);

    let share = off.total() as f64 / r.window.as_nanos() as f64;
    assert!(
        share < PAIR_MAX_OFF_CPU_SHARE,
        "two threads that never block have {} off-CPU ({:.2}% of the window, want < {:.0}%): \
         preemption must not count as off-CPU\n{ctx}",
        ms(off.total() as f64),
        share * 100.0,
        PAIR_MAX_OFF_CPU_SHARE * 100.0
    );
}

/// Sleeps 1 ms in a loop on CPU 1.
const LONE_C: &str = r#"
int main(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(1, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) exit(3);
    for (;;) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, 0);
    }
}
"#;

#[test]
fn lone_thread_on_idle_cpu_has_near_zero_run_queue_latency() {
    require_root();
    let mut premise_failures = Vec::new();
    for attempt in 1..=LONE_MAX_RECORDINGS {
        // A fresh process each time: one left unscheduled by the kernel (see
        // LONE_MIN_WAKEUPS) stayed so for the following recordings too.
        let mut w = start("rq_lone", LONE_C);
        // Other sessions may run on CPU 1; at nice -20 their tasks delay the
        // wake-ups less.
        w.boost();
        w.warm_up();
        let pid = w.pid();
        assert_eq!(cpus_allowed(pid, pid), "1", "rq_lone is not pinned to CPU 1");
        let r = record_windowed(&args(&pid_args(&w)), DURATION, || {
            (thread_sched(pid, pid).expect("rq_lone alive"), cpu_times(1).expect("CPU 1 in /proc/stat"))
        });
        let rows = read_latency(&r.out);
        let delta = r.end.0.since(&r.start.0);
        // CPU 1's busy time minus rq_lone's own.
        let others = (r.end.1.busy_share_since(&r.start.1) - delta.cpu_ns as f64 / r.window.as_nanos() as f64).max(0.0);
        let ctx = format!(
            "latency.csv: {rows:#?}\n/proc in the window: {delta:?}; CPU 1 busy with other \
             work {:.0}% of the window\nload: {}\n{}",
            others * 100.0,
            loadavg(),
            r.out.context()
        );
        let row = latency_row(&rows, pid, "runqueue");
        let count = row.map_or(0, |r| r.count);
        eprintln!(
            "rq_lone (recording {attempt}): runqueue count {count} p50 {:.1} us p95 {:.1} us \
             max {:.1} us; /proc: {} switches, mean wait {:.1} us (schedstat); CPU 1 busy with \
             other work {:.0}%; load {}",
            row.map_or(0.0, |r| r.p50_ns) / 1e3,
            row.map_or(0.0, |r| r.p95_ns) / 1e3,
            row.map_or(0, |r| r.max_ns) as f64 / 1e3,
            delta.switches(),
            delta.runq_wait_ns as f64 / delta.switches().max(1) as f64 / 1e3,
            others * 100.0,
            loadavg()
        );
        // Every wake-up from a sleep ends in one switch-in, busy CPU or not.
        assert_count_matches_switches(count, delta.switches(), "rq_lone", &ctx);
        if delta.switches() >= LONE_MIN_WAKEUPS {
            let row = runq_row(&rows, pid, &ctx);
            let p50 = Duration::from_nanos(row.p50_ns as u64);
            if p50 < LONE_P50_MAX {
                return;
            }
            // Only a busy CPU 1 excuses a slow p50.
            assert!(
                others > LONE_MAX_OTHER_BUSY,
                "p50 run-queue latency of a lone thread waking on its own, mostly idle CPU is \
                 {p50:?}, want < {LONE_P50_MAX:?}\n{ctx}"
            );
        }
        premise_failures.push(format!(
            "{} wake-ups, p50 {:.1} us, CPU 1 {:.0}% busy with other work",
            delta.switches(),
            row.map_or(0.0, |r| r.p50_ns) / 1e3,
            others * 100.0
        ));
    }
    panic!(
        "in all {LONE_MAX_RECORDINGS} recordings rq_lone either woke fewer than \
         {LONE_MIN_WAKEUPS} times or had a p50 >= {LONE_P50_MAX:?} while CPU 1 was more than \
         {:.0}% busy with other work: {premise_failures:#?}\nThis test needs CPU 1 mostly idle.",
        LONE_MAX_OTHER_BUSY * 100.0
    );
}
