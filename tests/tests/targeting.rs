//! Targeting in the kernel: `--cgroup`, `--process-name` and
//! `--container-id` select processes in the BPF filter, so a busy process
//! outside the selection is neither in the profile nor unwound (its samples
//! cost a map lookup: the on-CPU program's BPF time per run drops).
//! Bad selectors fail before anything is attached.

use std::{os::fd::OwnedFd, time::Duration};

use profiler_integration_tests::{
    cgroup::{fresh_ids, v2_root, TestCgroup},
    record, require_root, run_agent,
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

/// `on_cpu_sample` ns per run from the summary's `BPF time per run:` line.
fn sample_ns_per_run(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("BPF time per run: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_prefix("on_cpu_sample ")))
        .and_then(|p| p.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no on_cpu_sample run time in the summary:\n{stderr}"))
}

/// A BUSY_C workload with its own name, moved into `cgroup`.
fn busy_in(name: &str, cgroup: &TestCgroup) -> Workload {
    let w = Workload::c(name, BUSY_C, C_FP_FLAGS);
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
    let baseline_ns = sample_ns_per_run(&both.stderr);

    // The parent cgroup selects its subtree: the leaf's process is in.
    let by_cgroup = record(&["-d", "4", "-F", "199", "--cgroup", &format!("{root}/selected")]);
    by_cgroup.assert_success();
    let by_name = record(&["-d", "4", "-F", "199", "--process-name", "^tgt_want"]);
    by_name.assert_success();
    for (what, run) in [("--cgroup", &by_cgroup), ("--process-name", &by_name)] {
        let f = run.folded();
        let ctx = format!("{what}\n{}\n{}", f.top(10), run.context());
        assert!(f.process("tgt_wanted").count_with_leaf("busy_loop") > 100, "the selected process is sampled\n{ctx}");
        assert_eq!(f.process("tgt_busy").total(), 0, "the busy process is excluded\n{ctx}");
        assert_eq!(f.processes().len(), 1, "nothing else is sampled: {:?}\n{ctx}", f.processes());
        let ns = sample_ns_per_run(&run.stderr);
        // The excluded process's samples stop at the filter: about half the
        // samples cost a lookup instead of a stack walk.
        assert!(
            (ns as f64) < 0.8 * baseline_ns as f64,
            "{what}: {ns} ns per sample against {baseline_ns} with both unwound\n{ctx}"
        );
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
    let run = record(&["-d", "4", "-F", "99", "--cgroup", &path]);
    run.assert_success();
    let f = run.folded();
    let burn = f.count_with_frame("child_burn");
    // ~60% of one CPU for 4 s at 99 Hz is ~240 samples; a rescan-only
    // filter would catch the children for at most a few of them.
    assert!(burn > 80, "{burn} child_burn samples\n{}\n{}", f.top(10), run.context());
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
    assert!(f.process("tgt_container").count_with_leaf("busy_loop") > 50, "{ctx}");
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
