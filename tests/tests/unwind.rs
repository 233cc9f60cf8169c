//! CFI (`.eh_frame`) unwinding of user stacks (`record --unwinder cfi`, the
//! default): code built without frame pointers, as distributions build it,
//! must still give complete stacks, on-CPU and off-CPU, through glibc, in a
//! stripped distribution binary (`/usr/bin/python3`), in a library loaded
//! with dlopen() after the recording started, and across a signal frame;
//! and the tables of files that several processes map (libc, ld.so, the
//! vDSO) are built once.
//!
//! The C workloads are built `-O2 -fomit-frame-pointer` and checked with
//! objdump: no function sets up %rbp, and every call the tests look for is
//! a real call (noinline, with work after it so it is not a tail call).
//! Folded stacks are root first: process, then `_start`, ..., the leaf.
//!
//! Frame-pointer-only builds of the agent fail these tests (that is what
//! they are for); see the control recording in the first test for how badly.

use std::time::{Duration, Instant};

use profiler_integration_tests::agent::RECORD_TIMEOUT;
use profiler_integration_tests::folded::{frame_is, is_kernel, Folded, Stack};
use profiler_integration_tests::sched::read_folded;
use profiler_integration_tests::unwind::{
    assert_calls, assert_no_frame_pointer, parse_unwind_tables, pct, reaches_start, record_pids, share, spawn_pids,
    unwinder, unwinding, user_leaf_is, UnwindTables, C_NOFP_FLAGS, LIBC_START,
};
use profiler_integration_tests::workload::build_c;
use profiler_integration_tests::{require_root, RecordOutput, Workload};

// ---------------------------------------------------------------------------
// 1. On-CPU: main -> middle -> leaf_a / leaf_b without frame pointers.
// ---------------------------------------------------------------------------

/// `middle` calls `leaf_a` then `leaf_b` (the same loop, the same number of
/// iterations: ~50/50), `main` calls `middle` forever. Built with
/// [`C_NOFP_FLAGS`]: `main` and `middle` only move %rsp (`sub $N,%rsp`: the
/// CFA is %rsp + N there), the leaves touch no stack at all; %rbp is never
/// set, so a frame-pointer walk from a leaf cannot find `middle`.
const CHAIN_C: &str = r#"
#include <stdint.h>

#define UNIT 2000000UL

static volatile uint64_t sink;

/* The asm keeps the loop (its value is opaque to the optimizer). */
#define SPIN(n)                                      \
    uint64_t acc = 0;                                \
    for (uint64_t i = 0; i < (n); i++) {             \
        acc += i ^ (acc >> 3);                       \
        __asm__ volatile("" : "+r"(acc));            \
    }                                                \
    return acc

/* Same alignment, so both loops run at the same speed. */
__attribute__((noinline, aligned(64))) uint64_t leaf_a(uint64_t n) { SPIN(n); }
__attribute__((noinline, aligned(64))) uint64_t leaf_b(uint64_t n) { SPIN(n); }

/* The stores after each call keep them calls (not a tail call to leaf_b);
 * the volatile array gives middle a stack frame of its own. */
__attribute__((noinline)) void middle(uint64_t n) {
    volatile uint64_t scratch[8];
    scratch[0] = leaf_a(n);
    scratch[1] = leaf_b(n);
    sink += scratch[0] ^ scratch[1];
}

int main(void) {
    for (;;)
        middle(UNIT);
}
"#;

/// Minimum share of the workload's samples with the whole chain
/// main -> middle -> leaf_{a,b} (leaf innermost), and minimum share that also
/// reach `_start` through glibc. CFI describes every instruction of these
/// functions, so only samples outside the leaves (the few instructions of
/// `middle` and `main` between calls, ~0.01% of the time) may miss it; 5%
/// leaves room for samples the agent could not walk (e.g. a page of the
/// stack not yet readable), which must stay rare. Measured: 501 of 501.
const MIN_CHAIN_SHARE: f64 = 0.95;

/// Maximum share of full chains with `--unwinder frame-pointer`. Measured
/// 0 of 310 samples (and 0 of 438 with the agent from before CFI) with
/// `middle` in them: the stacks are just `uw_chain;leaf_a` and
/// `uw_chain;leaf_b` (the kernel's walk follows %rbp, which nothing here
/// sets up).
const MAX_FP_CHAIN_SHARE: f64 = 0.10;

/// Each leaf gets about half of the chain samples (same loop, same count);
/// below this share one leaf was lost or misattributed.
const MIN_LEAF_SHARE: f64 = 0.25;

/// Recording lengths of the CFI recording and of the frame-pointer control.
const CHAIN_SECS: u64 = 5;
const CONTROL_SECS: u64 = 3;

/// Samples of `p` with main -> middle -> leaf_{a,b}, the leaf innermost.
fn chain_samples(p: &Folded) -> u64 {
    p.count_where(|s| {
        ["leaf_a", "leaf_b"].iter().any(|leaf| s.has_subsequence(&["main", "middle", leaf]) && user_leaf_is(s, leaf))
    })
}

/// ... and reaching `_start` through glibc.
fn full_samples(p: &Folded) -> u64 {
    p.count_where(|s| {
        ["leaf_a", "leaf_b"].iter().any(|leaf| reaches_start(s, &["main", "middle", leaf]) && user_leaf_is(s, leaf))
    })
}

#[test]
fn cfi_completes_stacks_of_code_without_frame_pointers() {
    require_root();
    let mut w = Workload::c("uw_chain", CHAIN_C, C_NOFP_FLAGS);
    assert_no_frame_pointer(w.bin(), &["main", "middle", "leaf_a", "leaf_b"]);
    assert_calls(w.bin(), "main", "middle");
    assert_calls(w.bin(), "middle", "leaf_a");
    assert_calls(w.bin(), "middle", "leaf_b");
    w.boost();
    w.warm_up();

    let out = record_pids(&[w.pid()], CHAIN_SECS, &unwinder("cfi"));
    let p = out.folded().process("uw_chain");
    let ctx = format!("uw_chain stacks (--unwinder cfi):\n{}\n{}", p.top(15), out.context());
    let (total, chain, full) = (p.total(), chain_samples(&p), full_samples(&p));
    let (a, b) = (p.count_with_leaf("leaf_a"), p.count_with_leaf("leaf_b"));
    eprintln!(
        "uw_chain (cfi): {total} samples, {} with main;middle;leaf, {} also from _start through glibc \
         (leaf_a {a}, leaf_b {b}); {}",
        pct(share(chain, total)),
        pct(share(full, total)),
        unwinding(&out)
    );
    assert!(total > 0, "no samples for uw_chain (pid {})\n{ctx}", w.pid());
    assert!(
        share(chain, total) >= MIN_CHAIN_SHARE,
        "only {chain} of {total} uw_chain samples ({}) have main;middle;leaf_{{a,b}} with the leaf \
         innermost (want >= {})\n{ctx}",
        pct(share(chain, total)),
        pct(MIN_CHAIN_SHARE)
    );
    assert!(
        share(full, total) >= MIN_CHAIN_SHARE,
        "only {full} of {total} uw_chain samples ({}) reach _start;{};main;middle;leaf_{{a,b}} \
         ({chain} have main;middle;leaf): the walk stops in glibc (want >= {})\n{ctx}",
        pct(share(full, total)),
        LIBC_START.join("|"),
        pct(MIN_CHAIN_SHARE)
    );
    for (leaf, n) in [("leaf_a", a), ("leaf_b", b)] {
        assert!(
            share(n, a + b) >= MIN_LEAF_SHARE,
            "{leaf} is the leaf of {n} of {} leaf samples; the two leaves do the same work \
             (want >= {} each)\n{ctx}",
            a + b,
            pct(MIN_LEAF_SHARE)
        );
    }

    // Control: the same process walked with frame pointers only.
    let fp = record_pids(&[w.pid()], CONTROL_SECS, &unwinder("frame-pointer"));
    let fp_p = fp.folded().process("uw_chain");
    let (fp_total, fp_chain) = (fp_p.total(), chain_samples(&fp_p));
    eprintln!(
        "uw_chain (frame-pointer): {fp_total} samples, {} with main;middle;leaf; top:\n{}",
        pct(share(fp_chain, fp_total)),
        fp_p.top(5)
    );
    assert!(fp_total > 0, "no samples for uw_chain with --unwinder frame-pointer\n{}", fp.context());
    assert!(
        share(fp_chain, fp_total) <= MAX_FP_CHAIN_SHARE,
        "with --unwinder frame-pointer {fp_chain} of {fp_total} samples ({}) still have \
         main;middle;leaf, so this workload does not show what CFI adds (were frame pointers \
         built in after all?)\n{}\n{}",
        pct(share(fp_chain, fp_total)),
        fp_p.top(10),
        fp.context()
    );
}

// ---------------------------------------------------------------------------
// 2. Off-CPU through glibc's sleep functions.
// ---------------------------------------------------------------------------

/// `main` -> `middle` -> `waiter`, which sleeps 5 ms in glibc's usleep()
/// and then 5 ms in nanosleep() (both end in clock_nanosleep, built without
/// frame pointers), forever.
const OFFCPU_C: &str = r#"
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t sink;

__attribute__((noinline)) void waiter(void) {
    struct timespec ts = {0, 5000000};
    int a = usleep(5000);
    sink += (uint64_t)a;
    int b = nanosleep(&ts, 0);
    sink += (uint64_t)b + 1; /* work after the call: not a tail call */
}

__attribute__((noinline)) void middle(void) {
    for (;;) {
        waiter();
        __asm__ volatile("" ::: "memory");
    }
}

int main(void) {
    middle();
    return (int)sink;
}
"#;

/// Minimum share of the workload's off-CPU time whose stack has
/// main -> middle -> waiter with the kernel frames innermost. It only ever
/// blocks in waiter; the user registers at the switch-out are those of the
/// syscall in clock_nanosleep, whose CFI (and usleep's, nanosleep's) leads
/// back to waiter. 10% is room for blocks outside waiter (page faults at
/// start-up are before the recording) and the window edges. Measured 99.8%
/// (the frame-pointer walk: 0%, the stacks start in `__GI___clock_nanosleep`).
const MIN_OFFCPU_SHARE: f64 = 0.90;

const OFFCPU_SECS: u64 = 3;

#[test]
fn off_cpu_stacks_through_glibc_reach_the_caller() {
    require_root();
    let mut w = Workload::c("uw_offcpu", OFFCPU_C, C_NOFP_FLAGS);
    assert_no_frame_pointer(w.bin(), &["main", "middle", "waiter"]);
    assert_calls(w.bin(), "main", "middle");
    assert_calls(w.bin(), "middle", "waiter");
    w.warm_up();

    let out = record_pids(&[w.pid()], OFFCPU_SECS, &[vec!["--off-cpu"], unwinder("cfi")].concat());
    let p = read_folded(&out, "off-cpu.folded").process("uw_offcpu");
    let ctx = format!("uw_offcpu off-CPU stacks (ns):\n{}\n{}", p.top(10), out.context());
    let total = p.total();
    let attributed = p.count_where(|s| {
        s.has_subsequence(&["main", "middle", "waiter"]) && s.has_kernel_frames() && s.kernel_frames_innermost()
    });
    let from_start = p.count_where(|s| reaches_start(s, &["main", "middle", "waiter"]));
    // What sits between waiter and the kernel: glibc's sleep functions.
    let libc_frames: std::collections::BTreeSet<String> = p
        .stacks
        .iter()
        .filter_map(|s| {
            let f = s.functions();
            let i = f.iter().position(|x| frame_is(x, "waiter"))?;
            Some(f[i + 1..].iter().take_while(|x| !is_kernel(x)).cloned().collect::<Vec<_>>().join(";"))
        })
        .collect();
    eprintln!(
        "uw_offcpu: {:.1} ms off-CPU, {} in main;middle;waiter;...;<kernel>, {} from _start; \
         glibc frames below waiter: {libc_frames:?}; {}",
        total as f64 / 1e6,
        pct(share(attributed, total)),
        pct(share(from_start, total)),
        unwinding(&out)
    );
    // It sleeps ~100% of the time: expect ~OFFCPU_SECS of off-CPU time.
    assert!(total >= OFFCPU_SECS * 1_000_000_000 / 2, "uw_offcpu has only {total} ns off-CPU\n{ctx}");
    assert!(
        share(attributed, total) >= MIN_OFFCPU_SHARE,
        "only {} of uw_offcpu's off-CPU time has main;middle;waiter with the kernel frames \
         innermost (want >= {}): the walk from the syscall in glibc does not get back to the \
         caller\n{ctx}",
        pct(share(attributed, total)),
        pct(MIN_OFFCPU_SHARE)
    );
}

// ---------------------------------------------------------------------------
// 4. A library loaded with dlopen() after the recording started.
// ---------------------------------------------------------------------------

/// The plugin: `plugin_work` calls the hidden (so directly called, not
/// through the PLT) `plugin_leaf` twice and combines the results.
const PLUGIN_C: &str = r#"
#include <stdint.h>

__attribute__((noinline, visibility("hidden"))) uint64_t plugin_leaf(uint64_t n) {
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++) {
        acc += i ^ (acc >> 3);
        __asm__ volatile("" : "+r"(acc));
    }
    return acc;
}

__attribute__((noinline)) uint64_t plugin_work(uint64_t n) {
    volatile uint64_t r[4];
    r[0] = plugin_leaf(n);
    r[1] = plugin_leaf(n / 2);
    return r[0] ^ r[1];
}
"#;

/// Waits (sleeping, so it takes no samples) until the file `<argv0>.go`
/// exists, then dlopen()s PLUGIN_PATH and calls its `plugin_work` through
/// the pointer dlsym gave, from `call_plugin`, forever. Exits 3 if the
/// plugin cannot be loaded.
const DLOPEN_C: &str = r#"
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef uint64_t (*work_fn)(uint64_t);
static volatile uint64_t sink;

__attribute__((noinline)) void wait_for_go(const char *argv0) {
    char path[4096];
    snprintf(path, sizeof path, "%s.go", argv0);
    while (access(path, F_OK) != 0)
        usleep(10000);
}

__attribute__((noinline)) void call_plugin(work_fn work) {
    for (;;) {
        sink += work(2000000); /* work after the call: not a tail call */
        __asm__ volatile("" ::: "memory");
    }
}

int main(int argc, char **argv) {
    (void)argc;
    wait_for_go(argv[0]);
    void *h = dlopen(PLUGIN_PATH, RTLD_NOW);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); exit(3); }
    work_fn work = (work_fn)dlsym(h, "plugin_work");
    if (!work) { fprintf(stderr, "dlsym: %s\n", dlerror()); exit(3); }
    call_plugin(work);
    return (int)sink;
}
"#;

/// Minimum share of the samples in the plugin (innermost user frame
/// `plugin_leaf` or `plugin_work`) whose stack goes on through the caller in
/// the main program to `main`. The plugin's table has to be built after the
/// recording started, when the process maps it; until then its frames can
/// only be walked by frame pointer (which fails). 10% leaves room for that
/// delay (~the first 0.3 s of ~3 s of plugin samples). Measured: 392 of 396
/// (the 4 others: `frames outside known mappings`, right after the dlopen).
const MIN_PLUGIN_SHARE: f64 = 0.90;

/// Fewest plugin samples for the share to mean something (~300 expected:
/// 99 Hz over the ~3 s after the dlopen).
const MIN_PLUGIN_SAMPLES: u64 = 50;

/// Recording length; the dlopen happens PRE_DLOPEN after the agent attached.
const DLOPEN_SECS: u64 = 5;
const PRE_DLOPEN: Duration = Duration::from_secs(1);

#[test]
fn library_loaded_after_start_is_unwound() {
    require_root();
    let libdir = tempfile::Builder::new().prefix("profiler-plugin-").tempdir().expect("create tempdir");
    let mut plugin_flags = C_NOFP_FLAGS.to_vec();
    plugin_flags.extend(["-shared", "-fPIC"]);
    let plugin = build_c(libdir.path(), "libuwplugin.so", PLUGIN_C, &plugin_flags);
    assert_no_frame_pointer(&plugin, &["plugin_work", "plugin_leaf"]);
    assert_calls(&plugin, "plugin_work", "plugin_leaf");

    let source = format!("#define PLUGIN_PATH {:?}\n{DLOPEN_C}", plugin.display().to_string());
    let mut w = Workload::c("uw_dlopen", &source, C_NOFP_FLAGS);
    assert_no_frame_pointer(w.bin(), &["main", "call_plugin"]);
    w.boost();
    w.warm_up();
    let maps_path = format!("/proc/{}/maps", w.pid());
    let maps = || std::fs::read_to_string(&maps_path).unwrap_or_default();
    assert!(!maps().contains("libuwplugin"), "the plugin is mapped before the test let the workload load it");

    let mut agent = spawn_pids(&[w.pid()], DLOPEN_SECS, &unwinder("cfi"));
    let attached = agent.wait_attached(Duration::from_secs(60));
    assert!(attached.is_some(), "the agent did not attach\n{}", agent.wait(RECORD_TIMEOUT).context());
    std::thread::sleep(PRE_DLOPEN);
    let go = format!("{}.go", w.bin().display());
    std::fs::write(&go, b"").unwrap_or_else(|e| panic!("create {go}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !maps().contains("libuwplugin") {
        w.assert_running();
        assert!(Instant::now() < deadline, "the workload did not dlopen the plugin within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let loaded_after = attached.map(|t| t.elapsed());
    let out = agent.wait(RECORD_TIMEOUT);
    out.assert_success();
    w.assert_running();

    let p = out.folded().process("uw_dlopen");
    let ctx = format!("uw_dlopen stacks:\n{}\n{}", p.top(15), out.context());
    let in_plugin = |s: &Stack| user_leaf_is(s, "plugin_leaf") || user_leaf_is(s, "plugin_work");
    let plugin_samples = p.count_where(in_plugin);
    let through = p.count_where(|s| {
        in_plugin(s)
            && s.has_subsequence(&["main", "call_plugin", "plugin_work"])
            && (!user_leaf_is(s, "plugin_leaf")
                || s.has_subsequence(&["main", "call_plugin", "plugin_work", "plugin_leaf"]))
    });
    eprintln!(
        "uw_dlopen: plugin mapped {loaded_after:?} after attach; {plugin_samples} samples in the plugin, \
         {through} ({}) through main;call_plugin;plugin_work; {}",
        pct(share(through, plugin_samples)),
        unwinding(&out)
    );
    assert!(
        plugin_samples >= MIN_PLUGIN_SAMPLES,
        "only {plugin_samples} samples in the plugin (want >= {MIN_PLUGIN_SAMPLES}): were its \
         frames symbolized?\n{ctx}"
    );
    assert!(
        share(through, plugin_samples) >= MIN_PLUGIN_SHARE,
        "only {through} of {plugin_samples} samples in the dlopen()ed plugin ({}) reach \
         main;call_plugin;plugin_work (want >= {})\n{ctx}",
        pct(share(through, plugin_samples)),
        pct(MIN_PLUGIN_SHARE)
    );
}

// ---------------------------------------------------------------------------
// 5. Tables of shared files are built once.
// ---------------------------------------------------------------------------

/// Two different programs (different code, so different files with their
/// own tables), both dynamically linked to glibc and busy.
const TABLES_A_C: &str = r#"
#include <stdint.h>
static volatile uint64_t sink;
__attribute__((noinline)) uint64_t spin_a(uint64_t n) {
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++) { acc += i ^ (acc >> 3); __asm__ volatile("" : "+r"(acc)); }
    return acc;
}
int main(void) { for (;;) sink += spin_a(1000000); }
"#;

const TABLES_B_C: &str = r#"
#include <stdint.h>
static volatile uint64_t sink;
__attribute__((noinline)) uint64_t spin_b(uint64_t n) {
    uint64_t acc = 1;
    for (uint64_t i = 0; i < n; i++) { acc ^= i * 2654435761u; __asm__ volatile("" : "+r"(acc)); }
    return acc;
}
__attribute__((noinline)) void drive_b(void) { sink += spin_b(1000000); sink++; }
int main(void) { for (;;) drive_b(); }
"#;

/// Largest table memory B may add, as a share of A's. A's tables are
/// libc's (~23,800 rows in Debian 12's libc.so.6, `readelf -wF`), ld.so's
/// (~2,100), the vDSO's and A's executable's (~10 rows): libc is >90% of
/// them. B brings only its executable (~10 rows, <0.1% of A's); the rest
/// of what B maps is the same files. If libc, ld.so or the vDSO were
/// built again for B, the growth would be ~100%. 5% is room for per-file
/// overhead (headers, alignment) of B's one new table. Measured: A alone 4
/// files, 30,712 rows, 245,696 bytes; A and B 5 files, +12 rows, +96 bytes.
const MAX_ADDED_SHARE: f64 = 0.05;

const TABLES_SECS: u64 = 2;

fn tables(out: &RecordOutput) -> UnwindTables {
    parse_unwind_tables(&out.stderr)
        .unwrap_or_else(|| panic!("no `Unwind tables:` line in the agent's stderr\n{}", out.context()))
}

#[test]
fn tables_of_shared_files_are_built_once() {
    require_root();
    let mut a = Workload::c("uw_tables_a", TABLES_A_C, C_NOFP_FLAGS);
    let mut b = Workload::c("uw_tables_b", TABLES_B_C, C_NOFP_FLAGS);
    a.warm_up();
    b.warm_up();

    let only_a = record_pids(&[a.pid()], TABLES_SECS, &unwinder("cfi"));
    let both = record_pids(&[a.pid(), b.pid()], TABLES_SECS, &unwinder("cfi"));
    let (ta, tab) = (tables(&only_a), tables(&both));
    let ctx = format!(
        "A alone: {ta:?}\nA and B: {tab:?}\n--- A alone ---\n{}\n--- A and B ---\n{}\n{}",
        only_a.folded().top(10),
        both.folded().top(10),
        both.context()
    );
    eprintln!("uw_tables: A alone {ta:?}; A and B {tab:?}");
    let procs = both.folded().processes();
    assert!(
        procs.contains("uw_tables_a") && procs.contains("uw_tables_b"),
        "both programs must have been sampled (processes: {procs:?})\n{ctx}"
    );
    assert!(ta.files >= 3, "A alone maps its executable, libc and ld.so: want >= 3 tables\n{ctx}");
    assert_eq!(ta.evicted + tab.evicted, 0, "nothing may be evicted from the default budget\n{ctx}");
    // B shares libc, ld.so and the vDSO with A: only its executable is new.
    assert_eq!(
        tab.files,
        ta.files + 1,
        "recording B as well should add exactly one table (B's executable; libc, ld.so and the \
         vDSO are shared with A)\n{ctx}"
    );
    let added = tab.bytes.saturating_sub(ta.bytes);
    assert!(
        tab.bytes >= ta.bytes && (added as f64) <= MAX_ADDED_SHARE * ta.bytes as f64,
        "adding B grew the table memory from {} to {} bytes (+{added}, {} of A's): want <= {} \
         (B's executable only; A's bytes are mostly libc's table)\n{ctx}",
        ta.bytes,
        tab.bytes,
        pct(share(added, ta.bytes)),
        pct(MAX_ADDED_SHARE)
    );
}

// ---------------------------------------------------------------------------
// The predicates above, on stacks shaped like complete ones (no root needed).
// ---------------------------------------------------------------------------

#[test]
fn predicates_accept_complete_stacks_and_reject_truncated_ones() {
    use profiler_integration_tests::parse_folded;
    let f = parse_folded(
        "uw_chain;_start;__libc_start_main_impl;__libc_start_call_main;main;middle;leaf_a 10\n\
         uw_chain;_start;__libc_start_main;main;middle;leaf_b.constprop.0 5\n\
         uw_chain;main;middle;leaf_a 3\n\
         uw_chain;leaf_b 2\n\
         uw_chain;_start;__libc_start_call_main;main;middle;leaf_a;asm_sysvec_apic_timer_interrupt_[k] 1\n",
    );
    assert_eq!((f.total(), chain_samples(&f), full_samples(&f)), (21, 19, 16));
}
