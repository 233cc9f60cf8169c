//! Hung threads: a thread blocked since before the agent started is found
//! (task iterator), with its kernel and user blocking stacks, counted from
//! the start of the recording, and still-blocked time is counted up to the
//! end of a recording or of each daemon interval, labelled
//! `state=still_blocked`, and never twice.

use std::time::Duration;

use profiler_integration_tests::daemon::Daemon;
use profiler_integration_tests::folded::{is_kernel, Stack};
use profiler_integration_tests::pprof;
use profiler_integration_tests::sched::{read_folded, record_windowed, Counters, COUNTERS_C};
use profiler_integration_tests::workload::C_FP_FLAGS;
use profiler_integration_tests::{require_root, Workload};

/// Length of the recording.
const DURATION: Duration = Duration::from_secs(4);

/// Allowed relative error of the hung thread's reported time against the
/// window. The agent counts from its start scan (just before it prints
/// `Recording`) to just after it detaches; the test's window edges are
/// polled every millisecond: tens of milliseconds in 4 s on a loaded VM.
const WINDOW_TOLERANCE: f64 = 0.05;

/// The pprof messages the checks need (profile.proto).
/// Nanoseconds of thread `tid` in an off-CPU pprof profile: (labelled
/// still_blocked, not labelled).
fn thread_ns(p: &pprof::Profile, tid: u32) -> (u64, u64) {
    let s = |i: i64| p.string_table.get(i as usize).map(String::as_str).unwrap_or("");
    let (mut still, mut other) = (0, 0);
    for sample in &p.sample {
        let of_tid = sample.label.iter().any(|l| s(l.key) == "tid" && l.num == tid as i64);
        if !of_tid {
            continue;
        }
        let labelled = sample.label.iter().any(|l| s(l.key) == "state" && s(l.str) == "still_blocked");
        let v = sample.value.first().copied().unwrap_or(0).max(0) as u64;
        if labelled {
            still += v;
        } else {
            other += v;
        }
    }
    (still, other)
}

/// One thread blocks in `read()` on a pipe nobody writes, from
/// `wait_for_input`, through glibc (no frame pointers: CFI unwinding);
/// main ticks every 2 ms. counters[2]: the hung thread's tid, counters[0]:
/// ticks. Built with `-DHANG_LATER`, the thread blocks in `read()` only once
/// the test sets counters[3] (polling every 5 ms until then).
const HUNG_C: &str = r#"
static int fds[2];

__attribute__((noinline)) void wait_for_input(void) {
    char c;
    volatile ssize_t r = read(fds[0], &c, 1);
    (void)r;
}

static void *hung(void *arg) {
    (void)arg;
    counters[2] = (uint64_t)syscall(SYS_gettid);
#ifdef HANG_LATER
    while (counters[3] == 0)
        usleep(5000);
#endif
    wait_for_input();
    return 0;
}

__attribute__((noinline)) void tick(void) {
    usleep(2000);
    counters[0]++;
}

int main(int argc, char **argv) {
    (void)argc;
    counters_open(argv[0]);
    if (pipe(fds) != 0) return 3;
    pthread_t t;
    if (pthread_create(&t, 0, hung, 0) != 0) return 4;
    for (;;)
        tick();
}
"#;

fn start_hung() -> (Workload, u32) {
    let mut flags = C_FP_FLAGS.to_vec();
    flags.push("-pthread");
    let mut w = Workload::c("offcpu_hung", &format!("{COUNTERS_C}{HUNG_C}"), &flags);
    w.warm_up();
    let counters = Counters::open(&w);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counters.read()[2] == 0 {
        assert!(std::time::Instant::now() < deadline, "the hung thread never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Blocked well before the agent starts.
    std::thread::sleep(Duration::from_millis(300));
    let tid = counters.read()[2] as u32;
    (w, tid)
}

fn in_wait_for_input(s: &Stack) -> bool {
    s.has_subsequence(&["wait_for_input"])
        && s.has_kernel_frames()
        && s.kernel_frames_innermost()
        && s.functions().iter().any(|f| is_kernel(f) && f.contains("read"))
}

#[test]
fn thread_blocked_before_the_start_is_reported_for_the_whole_recording() {
    require_root();
    let (w, tid) = start_hung();
    let r = record_windowed(&["--off-cpu", "--pid", &w.pid_arg()], DURATION, || ());
    let off = read_folded(&r.out, "off-cpu.folded");
    let ctx = format!("off-CPU stacks:\n{}\n{}", off.top(10), r.out.context());
    let window = r.window.as_nanos() as f64;

    // Under its blocking function, with the kernel side of the read.
    let hung = off.count_where(in_wait_for_input) as f64;
    let err = (hung - window) / window;
    assert!(
        err.abs() <= WINDOW_TOLERANCE,
        "the hung thread has {:.3} s under wait_for_input -> read (kernel); the recording lasted {:.3} s \
         ({:+.1}%, want ± {:.0}%)\n{ctx}",
        hung / 1e9,
        window / 1e9,
        err * 100.0,
        WINDOW_TOLERANCE * 100.0
    );
    // The whole stack: started by glibc, through the thread's function.
    assert!(
        off.count_with_subsequence(&["start_thread", "hung", "wait_for_input"]) as f64 >= 0.99 * hung,
        "the hung thread's user stack does not reach start_thread\n{ctx}"
    );

    // The label, on exactly that thread's time, in pprof.
    let p = pprof::read(&r.out.path("off-cpu.pb.gz"));
    let (still, other) = thread_ns(&p, tid);
    assert!(
        ((still as f64) - window).abs() <= WINDOW_TOLERANCE * window,
        "state=still_blocked time of tid {tid}: {still} ns over a {window} ns window\n{ctx}"
    );
    assert_eq!(other, 0, "tid {tid} never woke: all its time is still blocked\n{ctx}");

    // The summary names it.
    let stderr = &r.out.stderr;
    let line = stderr
        .lines()
        .skip_while(|l| !l.starts_with("Longest still blocked"))
        .find(|l| l.contains(&format!("/{tid}")))
        .unwrap_or_else(|| panic!("the summary does not list tid {tid} as still blocked\n{ctx}"));
    assert!(line.contains("read") || line.contains("wait_for_input"), "{line}\n{ctx}");
    assert!(stderr.contains("threads already blocked at the start"), "{ctx}");
}

#[test]
fn daemon_shows_a_hung_thread_in_every_interval_once() {
    require_root();
    let (w, tid) = start_hung();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap().to_owned();
    let d = Daemon::start(&["--off-cpu", "--pid", &w.pid_arg(), "--output-dir", &out]);
    let off_cpu_files = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("off-cpu-") && name.ends_with(".pb.gz")
            })
            .collect();
        v.sort();
        v
    };
    // The first interval is written once the daemon is up (loading takes
    // seconds on a busy machine); then two more and the final partial one.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while off_cpu_files().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the daemon wrote no interval within 90 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    assert!(d.stop().success(), "the daemon failed");
    let files = off_cpu_files();
    // At a 2 s interval: the first, two more in 5 s, the final partial one.
    assert!(files.len() >= 3, "{files:?}");
    let (mut sum_hung, mut sum_len) = (0u64, 0u64);
    for f in &files {
        let p = pprof::read(f);
        let (still, other) = thread_ns(&p, tid);
        let len = p.duration_nanos as u64;
        eprintln!("{}: interval {len} ns, hung thread still blocked {still} ns, other {other} ns", f.display());
        assert_eq!(other, 0, "{}: the hung thread has time not labelled still_blocked", f.display());
        // Each interval shows it for the whole interval (its cut and the
        // profile's clock are read a few ms apart; the first interval also
        // holds the few ms between the start scan and sampling).
        let slack = len / 20 + 50_000_000;
        assert!(
            still.abs_diff(len) <= slack,
            "{}: the hung thread shows {still} ns in a {len} ns interval",
            f.display()
        );
        sum_hung += still;
        sum_len += len;
    }
    // Across intervals nothing is counted twice nor lost.
    assert!(
        sum_hung.abs_diff(sum_len) <= sum_len / 50 + 50_000_000,
        "the hung thread sums to {sum_hung} ns over intervals lasting {sum_len} ns"
    );
}

/// Sampled mode (`--off-cpu-sample 1024`), `HUNG_C` built to hang on the
/// test's signal: a block that starts during the
/// recording is almost surely left unsampled by the coin (1023 in 1024),
/// yet once it has lasted a second the cut takes its stacks, so the hung
/// thread still shows under its blocking function, labelled, for nearly
/// the whole recording; its total stays exact.
#[test]
fn sampled_mode_still_shows_a_thread_that_hangs_during_the_recording() {
    require_root();
    let mut flags = C_FP_FLAGS.to_vec();
    flags.extend(["-pthread", "-DHANG_LATER"]);
    let mut w = Workload::c("offcpu_hung_later", &format!("{COUNTERS_C}{HUNG_C}"), &flags);
    w.warm_up();
    let counters = Counters::open(&w);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counters.read()[2] == 0 {
        assert!(std::time::Instant::now() < deadline, "the thread never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let tid = counters.read()[2] as u32;
    let args = ["--off-cpu", "--off-cpu-sample", "1024", "--pid", &w.pid_arg()];
    let r = record_windowed(&args, DURATION, || counters.write(3, 1));
    let off = read_folded(&r.out, "off-cpu.folded");
    let ctx = format!("off-CPU stacks:\n{}\n{}", off.top(10), r.out.context());
    let window = r.window.as_nanos() as f64;

    // It blocks in read within ~5 ms of the window's start; the first
    // cut's second of it is in the thread's total only, and the scaling to
    // that total puts it on the thread's stacks, nearly all of them read.
    let hung = off.count_where(in_wait_for_input) as f64;
    assert!(
        hung >= 0.9 * window,
        "the hung thread has {:.3} s under wait_for_input -> read (kernel) in a {:.3} s recording\n{ctx}",
        hung / 1e9,
        window / 1e9
    );
    assert!(
        off.count_with_subsequence(&["start_thread", "hung", "wait_for_input"]) as f64 >= 0.99 * hung,
        "the user stack taken at the cut does not reach start_thread\n{ctx}"
    );
    let p = pprof::read(&r.out.path("off-cpu.pb.gz"));
    let (still, other) = thread_ns(&p, tid);
    let total = (still + other) as f64;
    assert!(
        (total - window).abs() <= WINDOW_TOLERANCE * window,
        "tid {tid}: {total} ns off-CPU in all over a {window} ns window: the total is exact in sampled mode\n{ctx}"
    );
    assert!(still as f64 >= 0.9 * window, "tid {tid}: only {still} ns labelled still_blocked\n{ctx}");
    assert!(r.out.stderr.contains("only timed"), "the summary says the stacks were sampled\n{ctx}");
}
