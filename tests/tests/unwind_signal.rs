//! CFI unwinding through the signal trampoline: a handler's stack goes on
//! past `__restore_rt` to the code the signal interrupted; split from
//! unwind.rs.

use profiler_integration_tests::folded::{frame_is, Stack};
use profiler_integration_tests::unwind::{
    assert_calls, assert_no_frame_pointer, pct, record_pids, share, unwinder, unwinding, user_leaf_is, C_NOFP_FLAGS,
};
use profiler_integration_tests::{require_root, Workload};

/// `main` -> `interrupted` -> `interrupted_leaf` burns CPU; ITIMER_PROF
/// sends SIGPROF every 10 ms of CPU time, and the handler `on_signal` burns
/// in `handler_leaf` for a few ms (perf: ~42% of the samples; with twice the
/// iterations the handler outlasts the interval and takes ~80%). The
/// handler returns to glibc's `__restore_rt` (the sa_restorer), whose CFI
/// describes the interrupted registers saved in the signal frame.
const SIGNAL_C: &str = r#"
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/time.h>

static volatile uint64_t sink;

#define SPIN(n)                                      \
    uint64_t acc = 0;                                \
    for (uint64_t i = 0; i < (n); i++) {             \
        acc += i ^ (acc >> 3);                       \
        __asm__ volatile("" : "+r"(acc));            \
    }                                                \
    return acc

__attribute__((noinline)) uint64_t handler_leaf(uint64_t n) { SPIN(n); }
__attribute__((noinline)) uint64_t interrupted_leaf(uint64_t n) { SPIN(n); }

__attribute__((noinline)) void on_signal(int sig) {
    sink += handler_leaf(5000000);
    sink += (uint64_t)sig; /* work after the call: not a tail call */
}

__attribute__((noinline)) void interrupted(void) {
    for (;;) {
        sink += interrupted_leaf(1000000);
        __asm__ volatile("" ::: "memory");
    }
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGPROF, &sa, 0) != 0) return 2;
    struct itimerval it = {{0, 10000}, {0, 10000}};
    if (setitimer(ITIMER_PROF, &it, 0) != 0) return 2;
    interrupted();
    return (int)sink;
}
"#;

/// Minimum share of the handler's samples (innermost user frame
/// `handler_leaf`) that continue through the signal frame to the
/// interrupted code and `main`. The interrupted instruction can be any
/// instruction of `interrupted_leaf` or `interrupted`, all covered by CFI;
/// 10% is room for the few samples taken while the kernel is setting up or
/// tearing down the signal frame. Measured: 110 of 110.
const MIN_SIGNAL_SHARE: f64 = 0.90;

/// Fewest handler samples for the share to mean something (~40% of the
/// 150-300 samples of a busy process in SIGNAL_SECS, depending on load).
const MIN_HANDLER_SAMPLES: u64 = 30;

const SIGNAL_SECS: u64 = 3;

/// The frames between the interrupted code (`interrupted_leaf` or
/// `interrupted`) and the handler `on_signal`: the signal trampoline.
fn trampoline(s: &Stack) -> Option<&[String]> {
    let f = s.functions();
    let h = f.iter().position(|x| frame_is(x, "on_signal"))?;
    let i = f[..h].iter().rposition(|x| frame_is(x, "interrupted_leaf") || frame_is(x, "interrupted"))?;
    Some(&f[i + 1..h])
}

/// The signal trampoline's frame: glibc's `__restore_rt`. Like every caller
/// frame it is symbolized at its return address - 1, which is the padding
/// just before `__restore_rt` (the handler "returns" to its first byte), in
/// no symbol: the agent shows `libc.so.6+0x3c04f` (perf `[unknown]`).
fn is_trampoline(frame: &str) -> bool {
    frame_is(frame, "__restore_rt") || frame.starts_with("libc.so") || frame == "[unknown]"
}

#[test]
fn signal_handler_stacks_continue_to_the_interrupted_code() {
    require_root();
    let mut w = Workload::c("uw_signal", SIGNAL_C, C_NOFP_FLAGS);
    assert_no_frame_pointer(w.bin(), &["main", "interrupted", "interrupted_leaf", "on_signal", "handler_leaf"]);
    assert_calls(w.bin(), "main", "interrupted");
    assert_calls(w.bin(), "interrupted", "interrupted_leaf");
    assert_calls(w.bin(), "on_signal", "handler_leaf");
    w.boost();
    w.warm_up();

    let out = record_pids(&[w.pid()], SIGNAL_SECS, &unwinder("cfi"));
    let p = out.folded().process("uw_signal");
    let ctx = format!("uw_signal stacks:\n{}\n{}", p.top(15), out.context());
    let in_handler = |s: &Stack| user_leaf_is(s, "handler_leaf");
    let handler = p.count_where(in_handler);
    let through = p.count_where(|s| {
        in_handler(s)
            && s.has_subsequence(&["main", "interrupted", "on_signal", "handler_leaf"])
            && trampoline(s).is_some_and(|t| t.len() == 1 && is_trampoline(&t[0]))
    });
    let through_leaf = p.count_where(|s| {
        in_handler(s) && s.has_subsequence(&["main", "interrupted", "interrupted_leaf", "on_signal", "handler_leaf"])
    });
    let trampolines: std::collections::BTreeSet<String> =
        p.stacks.iter().filter(|s| in_handler(s)).filter_map(|s| Some(trampoline(s)?.join(";"))).collect();
    eprintln!(
        "uw_signal: {} samples, {handler} in the handler, {through} ({}) of those through the signal \
         frame to main;interrupted ({through_leaf} from interrupted_leaf); frames between the \
         interrupted code and on_signal: {trampolines:?}; {}",
        p.total(),
        pct(share(through, handler)),
        unwinding(&out)
    );
    assert!(handler >= MIN_HANDLER_SAMPLES, "only {handler} samples in handler_leaf\n{ctx}");
    assert!(
        share(through, handler) >= MIN_SIGNAL_SHARE,
        "only {through} of {handler} samples in the signal handler ({}) continue through the \
         signal frame (one frame, __restore_rt, between interrupted and on_signal) to \
         main;interrupted (want >= {})\n{ctx}",
        pct(share(through, handler)),
        pct(MIN_SIGNAL_SHARE)
    );
}
