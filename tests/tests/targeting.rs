//! Targeting in the kernel: `--cgroup`, `--process-name` and
//! `--container-id` select processes in the BPF filter, so a busy process
//! outside the selection is neither in the profile nor unwound (its samples
//! cost a map lookup: the on-CPU program's BPF time per run drops).
//! Bad selectors fail before anything is attached.

use std::{os::fd::OwnedFd, time::Duration};

use profiler_integration_tests::{
    cgroup::{fresh_ids, v2_root, TestCgroup},
    record, require_root, run_agent, spawn_record,
    workload::{BUSY_C, C_FP_FLAGS},
    Workload,
};

/// Holds the kernel's BPF run-time statistics on (`BPF_ENABLE_STATS`), for
/// as long as the fd lives; other users' settings are untouched.
fn bpf_stats() -> OwnedFd {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let attr: [u32; 2] = [0, 0];
    // SAFETY: attr is a valid, zero-padded bpf_attr of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    assert!(fd >= 0, "BPF_ENABLE_STATS failed: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// What one record run's summary says about the sampling program.
#[derive(Debug)]
struct SampleCost {
    ns_per_run: f64,
    runs: f64,
    /// Runs that returned early: idle CPU, or a process outside the selection.
    cheap: f64,
}

/// From the `BPF time per run:` and `Dropped:` lines of the summary.
fn sample_cost(stderr: &str) -> SampleCost {
    let numbers = |s: &str| -> Vec<f64> {
        s.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).filter_map(|w| w.parse().ok()).collect()
    };
    let run = stderr
        .lines()
        .find_map(|l| l.strip_prefix("BPF time per run: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_prefix("on_cpu_sample ")))
        .map(numbers)
        .unwrap_or_else(|| panic!("no on_cpu_sample run time in the summary:\n{stderr}"));
    let not_sampled = stderr
        .lines()
        .find_map(|l| l.split_once("Not sampled: ").map(|(_, rest)| numbers(rest)))
        .unwrap_or_else(|| panic!("no `Not sampled:` in the summary:\n{stderr}"));
    let cheap = not_sampled[0] + not_sampled[1];
    SampleCost { ns_per_run: run[0], runs: run[1], cheap }
}

/// BUSY_C's loop at the bottom of 100 frames, so that unwinding a sample
/// costs clearly more than filtering it out.
const DEEP_BUSY_C: &str = r#"
#include <stdint.h>
__attribute__((noinline)) void busy_loop(void) {
    volatile uint64_t acc = 0;
    for (uint64_t i = 0; i < 1000000UL; i++)
        acc += i;
}
__attribute__((noinline)) int deep(int n) {
    volatile int pad = n;
    if (n == 0)
        for (;;)
            busy_loop();
    return deep(n - 1) + pad;
}
int main(void) { return deep(100); }
"#;

/// A deep busy workload with its own name, moved into `cgroup`.
fn busy_in(name: &str, cgroup: &TestCgroup) -> Workload {
    let w = Workload::c(name, DEEP_BUSY_C, C_FP_FLAGS);
    cgroup.add(w.pid());
    w
}

#[test]
fn cgroup_and_process_name_exclude_a_busy_process_and_its_bpf_cost_drops() {
    require_root();
    let root = format!("/profiler-test-{}", std::process::id());
    let selected = TestCgroup::create(&v2_root(), &format!("{root}/selected/leaf"));
    let other = TestCgroup::create(&v2_root(), &format!("{root}/other"));
    let mut wanted = busy_in("tgt_wanted", &selected);
    let mut busy = busy_in("tgt_busy", &other);
    wanted.warm_up();
    busy.warm_up();
    let _stats = bpf_stats();

    // Baseline: both selected, so every sample of either is unwound.
    let both = record(&["-d", "4", "-F", "199", "--pid", &wanted.pid_arg(), "--pid", &busy.pid_arg()]);
    both.assert_success();
    let folded = both.folded();
    assert!(folded.process("tgt_busy").total() > 0, "baseline sees the busy process\n{}", both.context());
    let baseline = sample_cost(&both.stderr);

    // The parent cgroup selects its subtree: the leaf's process is in.
    let by_cgroup = record(&["-d", "4", "-F", "199", "--cgroup", &format!("{root}/selected")]);
    by_cgroup.assert_success();
    let by_name = record(&["-d", "4", "-F", "199", "--process-name", "^tgt_want"]);
    by_name.assert_success();
    for (what, run) in [("--cgroup", &by_cgroup), ("--process-name", &by_name)] {
        let f = run.folded();
        let ctx = format!("{what}\n{}\n{}", f.top(10), run.context());
        // The machine may be shared: a few dozen samples are plenty to tell.
        assert!(f.process("tgt_wanted").count_with_leaf("busy_loop") > 20, "the selected process is sampled\n{ctx}");
        assert_eq!(f.process("tgt_busy").total(), 0, "the busy process is excluded\n{ctx}");
        assert_eq!(f.processes().len(), 1, "nothing else is sampled: {:?}\n{ctx}", f.processes());
        // The excluded process's samples stop at the filter: its share of
        // the runs costs a lookup instead of a 100-frame walk, so the mean
        // BPF time per run drops. (Other processes of a shared machine are
        // filtered in both runs; `cargo xtask bench filter` has the
        // per-event figures.)
        let cost = sample_cost(&run.stderr);
        let costs = format!("{cost:?} against {baseline:?}");
        assert!(
            cost.cheap / cost.runs > baseline.cheap / baseline.runs,
            "{what}: the busy process's samples end early: {costs}\n{ctx}"
        );
        assert!(cost.ns_per_run < baseline.ns_per_run, "{what}: the mean cost did not drop: {costs}\n{ctx}");
        eprintln!("{what}: {costs}");
    }
    wanted.assert_running();
    busy.assert_running();
}

/// A process that forks a short-lived child every 100 ms, each burning
/// ~60 ms in `child_burn`: children live far less than the 2 s rescan, so
/// only the kernel's cgroup check (the task's cgroup ancestors) catches them.
const FORKER_C: &str = r#"
#include <stdint.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

__attribute__((noinline)) void child_burn(void) {
    volatile uint64_t acc = 0;
    uint64_t end = now_ms() + 60;
    while (now_ms() < end)
        for (int i = 0; i < 10000; i++) acc += i;
}

int main(void) {
    for (;;) {
        pid_t p = fork();
        if (p == 0) {
            child_burn();
            _exit(0);
        }
        waitpid(p, 0, 0);
        usleep(40 * 1000);
    }
}
"#;

#[test]
fn new_processes_in_a_selected_cgroup_are_caught_in_the_kernel() {
    require_root();
    let path = format!("/profiler-test-fork-{}", std::process::id());
    let cgroup = TestCgroup::create(&v2_root(), &path);
    let mut forker = Workload::c("tgt_forker", FORKER_C, C_FP_FLAGS);
    cgroup.add(forker.pid());
    forker.warm_up();
    // The cgroup's own CPU time while the agent samples says how many
    // samples its processes should get (cgroup v2 keeps cpu.stat without
    // any controller enabled).
    let usage_us = || -> u64 {
        let stat = std::fs::read_to_string(cgroup.dir().join("cpu.stat")).unwrap();
        stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).unwrap().trim().parse().unwrap()
    };
    let mut agent = spawn_record(&["-d", "4", "-F", "99", "--cgroup", &path]);
    agent.wait_attached(Duration::from_secs(60)).expect("the agent attached");
    // The recording's 4 s, not the symbolization after it.
    let before = usage_us();
    std::thread::sleep(Duration::from_secs(4));
    let used_us = usage_us() - before;
    let run = agent.wait(Duration::from_secs(120));
    run.assert_success();
    let f = run.folded();
    let samples = f.process("tgt_forker").total();
    let expected = used_us as f64 * 99.0 / 1e6;
    // Each child lives ~60 ms and a rescan every 2 s would select at most
    // the one alive at that moment, for the rest of its life: a few % of
    // the expected samples. The kernel's cgroup check catches them all
    // (less what is spent between the agent stopping and the stat read).
    let ctx =
        format!("{samples} samples, {expected:.0} expected from {used_us} us of CPU\n{}\n{}", f.top(10), run.context());
    assert!(f.count_with_frame("child_burn") > 0, "{ctx}");
    assert!(samples as f64 >= 0.5 * expected, "{ctx}");
    forker.assert_running();
}

#[test]
fn container_id_selects_a_container_by_its_short_id() {
    require_root();
    let (id, uid) = fresh_ids("container-id");
    let uid_ = uid.replace('-', "_");
    // containerd with the systemd driver.
    let cgroup = TestCgroup::create(
        &v2_root(),
        &format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{id}.scope"
        ),
    );
    let mut inside = busy_in("tgt_container", &cgroup);
    let mut outside = Workload::c("tgt_outside", BUSY_C, C_FP_FLAGS);
    inside.warm_up();
    outside.warm_up();
    // The 12-digit id `docker ps` and `crictl ps` show.
    let run = record(&["-d", "3", "-F", "99", "--container-id", &id[..12]]);
    run.assert_success();
    let f = run.folded();
    let ctx = format!("{}\n{}", f.top(10), run.context());
    assert!(f.process("tgt_container").count_with_leaf("busy_loop") > 10, "{ctx}");
    assert_eq!(f.process("tgt_outside").total(), 0, "{ctx}");
    inside.assert_running();
    outside.assert_running();
}

#[test]
fn bad_selectors_fail_before_anything_is_attached() {
    require_root();
    for (args, expect) in [
        (vec!["record", "-d", "1", "--cgroup", "/no/such/cgroup.slice"], "--cgroup /no/such/cgroup.slice"),
        (vec!["record", "-d", "1", "--cgroup", "relative.slice"], "starting with `/`"),
        (vec!["record", "-d", "1", "--process-name", "post(gres"], "invalid regular expression"),
        (vec!["record", "-d", "1", "--container-id", "nothex"], "--container-id nothex"),
    ] {
        let run = run_agent(&args, Duration::from_secs(30));
        assert!(!run.status.success(), "{args:?} should fail\n{}", run.context());
        assert!(run.stderr.contains(expect), "{args:?}: expected {expect:?}\n{}", run.context());
        assert!(run.elapsed < Duration::from_secs(5), "failed fast, before loading: {:?}", run.elapsed);
        assert!(!run.stderr.contains("loading the eBPF"), "{}", run.context());
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[targets]\nnamespaces = [\"Not_A_Namespace\"]\n[kubernetes]\nenabled = true\napi_url = \"http://127.0.0.1:1\"\nnode_name = \"n\"\n").unwrap();
    let run = run_agent(
        &["run", "--config", config.to_str().unwrap(), "-o", dir.path().to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(!run.status.success() && run.stderr.contains("Not_A_Namespace"), "{}", run.context());
    std::fs::write(&config, "[targets]\npod_selector = \"tier in web\"\n[kubernetes]\nenabled = true\napi_url = \"http://127.0.0.1:1\"\nnode_name = \"n\"\n").unwrap();
    let run = run_agent(
        &["run", "--config", config.to_str().unwrap(), "-o", dir.path().to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(!run.status.success() && run.stderr.contains("tier in web"), "{}", run.context());
}
