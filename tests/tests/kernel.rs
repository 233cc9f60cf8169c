//! Kernel frames: a syscall-heavy workload must show `_[k]` frames, always as
//! the innermost part of the stack, below the user frame that made the call.

use profiler_integration_tests::folded::{frame_is, is_kernel, Folded};
use profiler_integration_tests::workload::C_FP_FLAGS;
use profiler_integration_tests::{record, require_root, Workload};

/// `do_getppid` issues the syscall itself (inline asm on x86_64), so the user
/// stack at syscall entry is main -> do_getppid, walkable with frame pointers
/// (the libc wrappers have none and would hide the caller).
const SYS_HEAVY_C: &str = r#"
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline)) long do_getppid(void) {
    volatile long ret; /* stack slot: gcc then keeps the frame-pointer prologue */
    long r;
#if defined(__x86_64__)
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "0"((long)SYS_getppid)
                     : "rcx", "r11", "memory");
#else
    r = syscall(SYS_getppid);
#endif
    ret = r;
    return ret;
}

int main(void) {
    for (;;)
        do_getppid();
}
"#;

/// Minimum fraction of the workload's samples that must have kernel frames.
/// perf shows ~55-60% of this loop's samples in the kernel (syscall entry and
/// exit dominate); 20% leaves room for a different sampling setup while still
/// failing if kernel stacks are dropped.
const MIN_KERNEL_SHARE: f64 = 0.20;

fn check_syscall_workload(all: &Folded, ctx_tail: &str) {
    let p = all.process("sys_heavy");
    let ctx = format!("sys_heavy stacks:\n{}\n{ctx_tail}", p.top(15));
    let total = p.total();
    assert!(total > 0, "no samples for sys_heavy\n{ctx}");

    let kernel = p.count_where(|s| s.has_kernel_frames());
    let share = kernel as f64 / total as f64;
    eprintln!("sys_heavy: {kernel} of {total} samples have kernel frames ({:.1}%)", share * 100.0);
    assert!(
        share >= MIN_KERNEL_SHARE,
        "only {kernel} of {total} sys_heavy samples ({:.1}%) have _[k] frames, want >= {:.0}%\n{ctx}",
        share * 100.0,
        MIN_KERNEL_SHARE * 100.0
    );

    let misplaced: Vec<String> = p.stacks.iter().filter(|s| !s.kernel_frames_innermost()).map(|s| s.line()).collect();
    assert!(misplaced.is_empty(), "user frames after (inner to) kernel frames in:\n{}\n{ctx}", misplaced.join("\n"));

    // The syscall is attributed to the user function that made it.
    let from_caller = p.count_where(|s| {
        s.has_kernel_frames()
            && s.has_subsequence(&["main", "do_getppid"])
            && s.last_user_frame().is_some_and(|f| frame_is(f, "do_getppid"))
    });
    assert!(from_caller > 0, "no sample has main;do_getppid followed directly by kernel frames\n{ctx}");
}

#[test]
fn syscall_kernel_frames_are_innermost_with_pid() {
    require_root();
    let mut w = Workload::c("sys_heavy", SYS_HEAVY_C, C_FP_FLAGS);
    w.warm_up();
    let out = record(&["--pid", &w.pid_arg(), "--duration", "3"]);
    out.assert_success();
    check_syscall_workload(&out.folded(), &out.context());
}

#[test]
fn system_wide_kernel_frames_are_innermost() {
    require_root();
    let mut w = Workload::c("sys_heavy", SYS_HEAVY_C, C_FP_FLAGS);
    w.warm_up();
    let out = record(&["--duration", "3"]);
    out.assert_success();
    let all = out.folded();
    check_syscall_workload(&all, &out.context());

    // Every process, not only ours: kernel frames only ever close a stack.
    let misplaced: Vec<String> =
        all.stacks.iter().filter(|s| !s.kernel_frames_innermost()).map(|s| s.line()).take(20).collect();
    assert!(
        misplaced.is_empty(),
        "system-wide profile has user frames inner to kernel frames:\n{}",
        misplaced.join("\n")
    );
    assert!(
        all.stacks.iter().all(|s| s.functions().iter().all(|f| !f.is_empty())),
        "empty frame names in cpu.folded:\n{}",
        all.top(20)
    );
    let kernel_names = all.function_names().into_iter().filter(|f| is_kernel(f)).count();
    assert!(kernel_names > 0, "no kernel frame anywhere\n{}", all.top(20));
}
