//! Off-CPU profiling (`record --off-cpu`) of C workloads with frame
//! pointers: blocked time attributed to the function that blocks, blocking
//! through glibc, run-queue latency, scheduler-map cleanup after threads
//! exit, `--off-cpu-min-block`, and the per-thread wall-clock view.
//!
//! Expected values are measured, not assumed: the workloads count their own
//! blocks and time them with CLOCK_MONOTONIC into a file the test reads
//! (`sched::Counters`), and /proc gives per-thread CPU time and context
//! switches. Both are sampled when the agent starts recording and when it
//! detaches (`sched::record_windowed`), so they cover the same window as the
//! agent's scheduler programs, to within a few milliseconds.
//!
//! Window edges: the agent records a block when the thread is switched back
//! in, and only if it saw the switch-out. A block in progress when recording
//! starts is therefore missing from the profile but (if it ends inside the
//! window) present in the workload's count; a block in progress at the end
//! is in neither. With blocks of at most 20 ms in a 5 s window that is at
//! most 0.4% of the expected time, far inside the tolerances below.

use std::time::Duration;

use profiler_integration_tests::agent::RECORD_TIMEOUT;
use profiler_integration_tests::folded::{frame_is, is_kernel, Folded, Stack};
use profiler_integration_tests::sched::{
    cpu_times, latency_row, parse_sched_summary, read_folded, read_latency, record_windowed, thread_ids, thread_name,
    thread_sched, Counters, LatencyRow, SchedSummary, ThreadSched, Windowed, COUNTERS_C,
};
use profiler_integration_tests::workload::C_FP_FLAGS;
use profiler_integration_tests::{require_root, spawn_record, RecordOutput, Workload};

/// Length of each recording.
const DURATION: Duration = Duration::from_secs(5);

/// Allowed relative error of recorded blocked time against the blocked time
/// the workload measured itself. The agent measures switch-out -> switch-in
/// with the kernel clock, the workload syscall entry -> return: they differ
/// by the syscall entry/exit (microseconds per 10 ms block, < 0.1%) plus the
/// window edges (< 0.4%, see the module comment). 10% leaves room for a
/// loaded VM while still catching lost or double-counted blocks.
const BLOCKED_TOLERANCE: f64 = 0.10;

/// Allowed relative error of a thread's wall-clock total (on-CPU samples x
/// period + off-CPU ns) against the window. The on-CPU half is a sample
/// count: ~250 samples at 99 Hz have a ~6% standard deviation, ~3% of the
/// total; time the thread spends preempted (runnable, not running) is
/// neither on- nor off-CPU and is missing (the workload is reniced to -20 to
/// keep it small, and it is printed).
const WALL_TOLERANCE: f64 = 0.15;

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

/// `--off-cpu-min-block` of the min-block test, and the workload's blocks.
const MIN_BLOCK: &str = "5ms";

/// Minimum fraction of the sleeper's off-CPU time whose stack has main ->
/// worker -> block_here with kernel frames inside block_here. Every block
/// happens there; only a failed user-stack capture can lose the user frames.
const MIN_ATTRIBUTED_SHARE: f64 = 0.95;

fn c_flags() -> Vec<&'static str> {
    let mut flags = C_FP_FLAGS.to_vec();
    flags.push("-pthread");
    flags
}

/// Compiles `body` after [`COUNTERS_C`] and starts it.
fn start(name: &str, body: &str) -> Workload {
    Workload::c(name, &format!("{COUNTERS_C}{body}"), &c_flags())
}

fn pid_args(w: &Workload) -> Vec<String> {
    vec!["--off-cpu".into(), "--pid".into(), w.pid_arg()]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn summary(out: &RecordOutput) -> SchedSummary {
    parse_sched_summary(&out.stderr).unwrap_or_else(|| panic!("no scheduler summary in stderr\n{}", out.context()))
}

fn relative_error(got: f64, want: f64) -> f64 {
    (got - want) / want
}

fn ms(ns: f64) -> String {
    format!("{:.1} ms", ns / 1e6)
}

/// Sleeps 10 ms per iteration in `block_here`, through its own syscall
/// instruction, called by `worker`, called by `main`. Every function has a
/// volatile local: gcc 12 drops the frame-pointer setup of leaves that use no
/// stack despite -mno-omit-leaf-frame-pointer.
///
/// counters[0]: blocks done; counters[1]: ns spent in them (syscall entry to
/// return, CLOCK_MONOTONIC).
const SLEEPER_C: &str = r#"
#define BLOCK_NS 10000000ull

__attribute__((noinline)) void block_here(void) {
    volatile long ret;
    uint64_t t0 = now_ns();
    SLEEP_SYSCALL(ret, BLOCK_NS);
    counters[1] += now_ns() - t0;
    counters[0]++;
    (void)ret;
}

__attribute__((noinline)) void worker(void) {
    volatile int running = 1;
    while (running)
        block_here();
}

int main(int argc, char **argv) {
    (void)argc;
    counters_open(argv[0]);
    worker();
    return 0;
}
"#;

/// True if the stack is main -> worker -> `leaf` with kernel frames (only)
/// inside `leaf`.
fn attributed_to(s: &Stack, leaf: &str) -> bool {
    s.has_subsequence(&["main", "worker", leaf])
        && s.last_user_frame().is_some_and(|f| frame_is(f, leaf))
        && s.has_kernel_frames()
        && s.kernel_frames_innermost()
}

#[test]
fn blocked_time_is_attributed_to_the_blocking_function() {
    check_blocked_time(&[]);
}

/// The same through the raw-tracepoint programs, the fallback for kernels
/// whose BTF lacks the scheduler tracepoints.
#[test]
fn raw_tracepoint_fallback_attributes_blocked_time_the_same_way() {
    check_blocked_time(&["--off-cpu-raw-tracepoints"]);
}

fn check_blocked_time(extra: &[&str]) {
    require_root();
    let mut w = start("offcpu_sleep", SLEEPER_C);
    w.warm_up();
    let counters = Counters::open(&w);
    let pid = w.pid();
    let mut agent_args = pid_args(&w);
    agent_args.extend(extra.iter().map(|a| a.to_string()));
    let r = record_windowed(&args(&agent_args), DURATION, || {
        (counters.read(), thread_sched(pid, pid).expect("sleeper alive"))
    });
    let p = read_folded(&r.out, "off-cpu.folded").process("offcpu_sleep");
    let ctx = format!("offcpu_sleep off-CPU stacks:\n{}\n{}", p.top(10), r.out.context());

    let blocks = r.end.0[0] - r.start.0[0];
    let measured = (r.end.0[1] - r.start.0[1]) as f64;
    let cpu = r.end.1.since(&r.start.1).cpu_ns as f64;
    let window = r.window.as_nanos() as f64;
    let not_running = window - cpu;
    let with_leaf = p.count_with_frame("block_here") as f64;
    let attributed = p.count_where(|s| attributed_to(s, "block_here")) as f64;
    eprintln!(
        "offcpu_sleep: block_here {} off-CPU ({} in main;worker;block_here;<kernel>), \
         process {}; workload measured {} in {blocks} blocks; window {} - on-CPU {} = {}",
        ms(with_leaf),
        ms(attributed),
        ms(p.total() as f64),
        ms(measured),
        ms(window),
        ms(cpu),
        ms(not_running)
    );
    assert!(blocks > 0, "the workload did not block during the window\n{ctx}");

    // Against the workload's own timing of its blocks.
    let error = relative_error(with_leaf, measured);
    assert!(
        error.abs() <= BLOCKED_TOLERANCE,
        "block_here has {} off-CPU; the workload measured {} blocked in {blocks} blocks \
         during the window: off by {:+.1}%, want ± {:.0}%\n{ctx}",
        ms(with_leaf),
        ms(measured),
        error * 100.0,
        BLOCKED_TOLERANCE * 100.0
    );
    // Independently: a thread that only sleeps is off-CPU whenever it is not
    // running (its wake-up run-queue waits count as off-CPU; it is never
    // preempted in a 10 ms cycle of microseconds of work).
    let error = relative_error(with_leaf, not_running);
    assert!(
        error.abs() <= BLOCKED_TOLERANCE,
        "block_here has {} off-CPU; window {} minus {} on-CPU (schedstat) = {}: \
         off by {:+.1}%, want ± {:.0}%\n{ctx}",
        ms(with_leaf),
        ms(window),
        ms(cpu),
        ms(not_running),
        error * 100.0,
        BLOCKED_TOLERANCE * 100.0
    );

    // Stack order: main -> worker -> block_here, then the kernel frames of
    // the sleep, innermost.
    let misordered: Vec<String> = p
        .stacks
        .iter()
        .filter(|s| s.functions().iter().any(|f| frame_is(f, "block_here")))
        .filter(|s| !attributed_to(s, "block_here"))
        .map(Stack::line)
        .collect();
    assert!(
        misordered.is_empty(),
        "stacks with block_here that are not main;...;worker;...;block_here;<kernel frames>:\n{}\n{ctx}",
        misordered.join("\n")
    );
    let share = attributed / p.total().max(1) as f64;
    assert!(
        share >= MIN_ATTRIBUTED_SHARE,
        "only {:.1}% of offcpu_sleep's off-CPU time is in main;worker;block_here;<kernel> \
         (want >= {:.0}%)\n{ctx}",
        share * 100.0,
        MIN_ATTRIBUTED_SHARE * 100.0
    );
    let in_nanosleep =
        p.count_where(|s| s.functions().iter().any(|f| is_kernel(f) && frame_is(f, "do_nanosleep"))) as f64;
    assert!(
        in_nanosleep >= MIN_ATTRIBUTED_SHARE * with_leaf,
        "block_here's off-CPU stacks lack the kernel's do_nanosleep_[k]\n{ctx}"
    );
}

/// Off-CPU stacks whose kernel part does not end in the scheduler: the
/// contract is that kernel stacks are captured at switch-out, so they end
/// `...;schedule_[k];__schedule_[k]`, without the machinery that ran the
/// agent's tracepoint program (`bpf_trace_runN`, the program itself, and
/// `__traceiter_sched_switch`, the loop the kernel calls instead of the
/// single probe when a tracepoint has more than one).
fn stacks_not_ending_in_the_scheduler(p: &Folded) -> Vec<String> {
    p.stacks
        .iter()
        .filter(|s| s.has_kernel_frames())
        .filter(|s| !(frame_is(s.leaf(), "__schedule") || frame_is(s.leaf(), "schedule")))
        .map(Stack::line)
        .collect()
}

/// Two agents record the same sleeper at once, as happens whenever another
/// profiler, perf or bpftrace also traces sched_switch: the tracepoint then
/// has two probes and the kernel reaches them through
/// `__traceiter_sched_switch`. Each agent's kernel stacks must still end in
/// the scheduler. (With a single agent the stacks were seen to end in
/// `__schedule_[k]`; with two, in `__schedule_[k];__traceiter_sched_switch_[k]`.)
#[test]
fn off_cpu_kernel_stacks_end_in_the_scheduler() {
    require_root();
    let mut w = start("offcpu_kstack", SLEEPER_C);
    w.warm_up();
    let a = pid_args(&w);
    let other = spawn_record(&[&args(&a)[..], &["--duration", "4"]].concat());
    let r = record_windowed(&args(&a), Duration::from_secs(2), || ());
    let other = other.wait(RECORD_TIMEOUT);
    other.assert_success();
    for (name, out) in [("first agent", &r.out), ("second agent", &other)] {
        let p = read_folded(out, "off-cpu.folded").process("offcpu_kstack");
        let ctx = format!("{name}: offcpu_kstack off-CPU stacks:\n{}\n{}", p.top(10), out.context());
        assert!(p.total() > 0, "no off-CPU time for offcpu_kstack\n{ctx}");
        let wrong = stacks_not_ending_in_the_scheduler(&p);
        assert!(
            wrong.is_empty(),
            "{name}: off-CPU kernel stacks must end in __schedule_[k] (the switch-out), \
             these end elsewhere:\n{}\n{ctx}",
            wrong.join("\n")
        );
    }
}

/// As SLEEPER_C but sleeping through glibc's usleep(), which (like all of
/// glibc here) is built without frame pointers.
///
/// counters[0]: blocks done; counters[1]: ns spent in usleep().
const LIBC_SLEEPER_C: &str = r#"
#define BLOCK_US 10000

__attribute__((noinline)) void block_in_libc(void) {
    volatile int rc;
    uint64_t t0 = now_ns();
    rc = usleep(BLOCK_US);
    counters[1] += now_ns() - t0;
    counters[0]++;
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
fn blocking_through_glibc() {
    require_root();
    let mut w = start("offcpu_libc", LIBC_SLEEPER_C);
    w.warm_up();
    let counters = Counters::open(&w);
    let r = record_windowed(&args(&pid_args(&w)), DURATION, || counters.read());
    let off = read_folded(&r.out, "off-cpu.folded");
    let p = off.process("offcpu_libc");
    let ctx = format!("off-CPU stacks:\n{}\n{}", off.top(15), r.out.context());

    let blocks = r.end[0] - r.start[0];
    let measured = (r.end[1] - r.start[1]) as f64;
    let total = p.total() as f64;
    // For the record: the frame-pointer walk starts in glibc's sleep function
    // with the caller's frame pointer, so the caller of usleep()
    // (block_in_libc) is expected to be missing. CFI unwinding (a later
    // issue) will recover it; this test does not assert it either way.
    eprintln!(
        "offcpu_libc: {} off-CPU, workload measured {} in {blocks} blocks; stacks:\n{}",
        ms(total),
        ms(measured),
        p.top(5)
    );
    eprintln!(
        "offcpu_libc: block_in_libc {} in the stacks",
        if p.count_with_frame("block_in_libc") > 0 { "IS" } else { "is NOT" }
    );
    assert!(
        off.processes().contains("offcpu_libc"),
        "offcpu_libc (pid {}) is missing from off-cpu.folded\n{ctx}",
        w.pid()
    );
    assert!(blocks > 0, "the workload did not block during the window\n{ctx}");
    let error = relative_error(total, measured);
    assert!(
        error.abs() <= BLOCKED_TOLERANCE,
        "offcpu_libc has {} off-CPU; the workload measured {} in usleep() during the \
         window: off by {:+.1}%, want ± {:.0}%\n{ctx}",
        ms(total),
        ms(measured),
        error * 100.0,
        BLOCKED_TOLERANCE * 100.0
    );
    // The kernel side of the stack does not depend on user unwinding.
    let in_nanosleep =
        p.count_where(|s| s.functions().iter().any(|f| is_kernel(f) && frame_is(f, "do_nanosleep"))) as f64;
    assert!(
        in_nanosleep >= MIN_ATTRIBUTED_SHARE * total,
        "only {} of offcpu_libc's {} off-CPU is under do_nanosleep_[k]\n{ctx}",
        ms(in_nanosleep),
        ms(total)
    );
}

/// Two threads spinning forever, both pinned to CPU 0; main waits in
/// pthread_join (blocked since before the recording, so it contributes no
/// off-CPU time: the agent never saw it switch out).
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

/// The threads of `pid` other than its main thread.
fn secondary_threads(pid: u32) -> Vec<u32> {
    thread_ids(pid).into_iter().filter(|&t| t != pid).collect()
}

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
    let off = read_folded(&r.out, "off-cpu.folded").process("rq_pair");
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
/// pthread_join (blocked since before the recording: no wall time).
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
