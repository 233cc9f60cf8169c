//! JIT-compiled code named from the files runtimes write for profilers:
//! perf maps (`/tmp/perf-<pid>.map`) and jitdump (`jit-<pid>.dump`).
//!
//! Real runtimes from the distribution: Node.js with `--perf-basic-prof`
//! (JavaScript calling `Math.sin`, native code above and below the JIT
//! frames) and HotSpot with `-XX:+PreserveFramePointer` and a map written by
//! `jcmd PID Compiler.perfmap` (its `0x`-prefixed format). The rest uses a
//! small C "runtime" this file writes: it copies machine code into
//! anonymous executable memory, describes it in a perf map or a jitdump
//! written to the spec, and runs it, which pins down what the agent must
//! read (malformed lines, a map that grows mid-recording, a private `/tmp`
//! in another mount and pid namespace, file and line from `DEBUG_INFO`).
//!
//! Folded JIT frames end in `_[j]`; V8's and jitdump's carry
//! ` file:line` before it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use profiler_integration_tests::agent::RECORD_TIMEOUT;
use profiler_integration_tests::folded::{base_name, frame_is, is_jit, is_kernel, Folded, Stack};
use profiler_integration_tests::pprof;
use profiler_integration_tests::sched::read_folded;
use profiler_integration_tests::workload::build_c;
use profiler_integration_tests::{require_root, spawn_record, RecordOutput};

/// The fake runtime. `gen perfmap`: runs `jit_alpha` (a spin loop) until
/// SIGUSR1, then appends `jit_beta` (which calls the native `native_leaf`,
/// built without frame pointers) to its map and runs that. Its map starts
/// with 3 malformed lines and gets a 4th with the append. `gen jitdump`:
/// `jit_dumped` (the same code as `jit_beta`) in a jitdump with line 42 of
/// `gen.js` up to the call and 43 after it, mapped `PROT_READ|PROT_EXEC`
/// like V8 and .NET map theirs. Both run until killed.
const GEN_C: &str = r#"
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <signal.h>

static volatile sig_atomic_t switched;
static void on_usr1(int sig) { (void)sig; switched = 1; }

__attribute__((noinline)) void native_leaf(void) {
    volatile uint64_t acc = 0;
    for (uint64_t i = 0; i < 200000; i++) acc += i;
}

/* push rbp; mov rbp,rsp; loop: dec rdi; jnz loop; pop rbp; ret */
static const uint8_t SPIN[] = {0x55, 0x48, 0x89, 0xe5, 0x48, 0xff, 0xcf, 0x75, 0xfb, 0x5d, 0xc3};
/* push rbp; mov rbp,rsp; push rbx; push rbx; mov rbx,rdi;
 * loop (9): movabs rax, native_leaf; call rax; (21) dec rbx; jnz loop;
 * pop rbx; pop rbx; pop rbp; ret */
static uint8_t CALLER[30] = {0x55, 0x48, 0x89, 0xe5, 0x53, 0x53, 0x48, 0x89, 0xfb, 0x48, 0xb8,
                             0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xd0, 0x48, 0xff, 0xcb, 0x75, 0xef,
                             0x5b, 0x5b, 0x5d, 0xc3};
#define CALL_RETURN 21

typedef void (*fn)(uint64_t);

/* Calls through a pointer from a frame-pointer main, so the JIT frame's
 * saved rbp and return address lead back here. */
__attribute__((noinline)) void run(fn f, uint64_t n, int until_signal) {
    while (!(until_signal && switched)) f(n);
}

static void put(FILE *f, const void *p, size_t n) { fwrite(p, 1, n, f); }
static void u32(FILE *f, uint32_t v) { put(f, &v, 4); }
static void u64(FILE *f, uint64_t v) { put(f, &v, 8); }

int main(int argc, char **argv) {
    uint8_t *code = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED) return 1;
    void *leaf = (void *)native_leaf;
    memcpy(CALLER + 11, &leaf, 8);
    uint8_t *alpha = code + 0x100, *beta = code + 0x200;
    memcpy(alpha, SPIN, sizeof SPIN);
    memcpy(beta, CALLER, sizeof CALLER);
    char path[64];
    if (argc > 1 && strcmp(argv[1], "jitdump") == 0) {
        snprintf(path, sizeof path, "/tmp/jit-%d.dump", getpid());
        FILE *f = fopen(path, "w+");
        if (!f) return 2;
        u32(f, 0x4A695444); u32(f, 1); u32(f, 40); u32(f, 62); u32(f, 0); u32(f, getpid());
        u64(f, 0); u64(f, 0);
        /* DEBUG_INFO: 2 entries, the second repeating the file with "\xff". */
        uint32_t dsize = 16 + 16 + (16 + 7) + (16 + 2);
        u32(f, 2); u32(f, dsize); u64(f, 0);
        u64(f, (uint64_t)beta); u64(f, 2);
        u64(f, (uint64_t)beta); u32(f, 42); u32(f, 0); put(f, "gen.js", 7);
        u64(f, (uint64_t)beta + CALL_RETURN); u32(f, 43); u32(f, 0); put(f, "\xff", 2);
        /* CODE_LOAD */
        uint32_t lsize = 16 + 40 + 11 + sizeof CALLER;
        u32(f, 0); u32(f, lsize); u64(f, 0);
        u32(f, getpid()); u32(f, getpid()); u64(f, (uint64_t)beta); u64(f, (uint64_t)beta);
        u64(f, sizeof CALLER); u64(f, 1); put(f, "jit_dumped", 11); put(f, CALLER, sizeof CALLER);
        fflush(f);
        if (mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fileno(f), 0) == MAP_FAILED) return 3;
        run((fn)beta, 50, 0);
    }
    if (argc > 1 && strcmp(argv[1], "nomap") == 0)
        run((fn)alpha, 20000000, 0);
    snprintf(path, sizeof path, "/tmp/perf-%d.map", getpid());
    FILE *m = fopen(path, "w");
    if (!m) return 2;
    fprintf(m, "this is not a perf map line\nzzzz 10 bad_hex\n%lx 0 empty_range\n", (unsigned long)alpha);
    fprintf(m, "%lx %zx jit_alpha\n", (unsigned long)alpha, sizeof SPIN);
    fflush(m);
    signal(SIGUSR1, on_usr1);
    run((fn)alpha, 20000000, 1);
    fprintf(m, "%lx %zx jit_beta\n%lx\n", (unsigned long)beta, sizeof CALLER, (unsigned long)beta);
    fflush(m);
    run((fn)beta, 50, 0);
}
"#;

/// A process the test started; killed (with its group) on drop.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(cmd: &mut Command) -> Proc {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    Proc(child)
}

/// Builds the fake runtime outside `/tmp`, so a process with a private
/// `/tmp` can still run it. `-fno-omit-frame-pointer` for `main`/`run`;
/// `native_leaf` is compiled without a frame pointer by its own attribute
/// below (it must be unwound by CFI).
fn build_gen(dir: &Path) -> PathBuf {
    let src = GEN_C.replace(
        "__attribute__((noinline)) void native_leaf",
        "__attribute__((noinline, optimize(\"omit-frame-pointer\"))) void native_leaf",
    );
    build_c(dir, "jitgen", &src, &["-O1", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls"])
}

fn gen_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("jit-gen-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

fn record_pid(pid: u32, secs: u64, format: &str) -> RecordOutput {
    let (pid, secs) = (pid.to_string(), secs.to_string());
    let out = spawn_record(&["--pid", &pid, "--duration", &secs, "--frequency", "199", "--format", format])
        .wait(RECORD_TIMEOUT);
    out.assert_success();
    out
}

fn share(part: u64, whole: u64) -> f64 {
    part as f64 / whole.max(1) as f64
}

/// Samples whose stack has a JIT frame for which `pred` holds.
fn count_jit(f: &Folded, pred: impl Fn(&str) -> bool) -> u64 {
    f.count_where(|s| s.functions().iter().any(|fr| is_jit(fr) && pred(base_name(fr))))
}

/// The `JIT: ...` summary line's malformed-line count.
fn malformed_lines(stderr: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.starts_with("JIT: "))?;
    let (_, rest) = line.split_once("skipped ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The stack from `main` down: `main;run;<jit>[;native_leaf]`.
fn through_jit(s: &Stack, jit: &str, native_above: bool) -> bool {
    let f = s.functions();
    let Some(i) = f.iter().position(|fr| is_jit(fr) && base_name(fr).starts_with(jit)) else { return false };
    let below = i >= 2 && frame_is(&f[i - 1], "run") && f[..i - 1].iter().any(|fr| frame_is(fr, "main"));
    let above =
        if native_above { f.get(i + 1).is_some_and(|fr| frame_is(fr, "native_leaf")) } else { i + 1 == f.len() };
    below && above
}

/// A map that grows during the recording, with malformed lines, read
/// incrementally: both functions named, with the native frames around
/// them, and each malformed line counted once although the file was read
/// several times.
#[test]
fn perf_map_growing_during_recording_with_malformed_lines() {
    require_root();
    let dir = gen_dir();
    let gen = build_gen(dir.path());
    let p = start(&mut Command::new(&gen));
    let pid = p.pid().to_string();
    let mut agent = spawn_record(&["--pid", &pid, "--duration", "4", "--frequency", "199", "--format", "folded"]);
    agent.wait_attached(Duration::from_secs(60)).expect("the agent attached");
    // Halfway (sampling starts a little after the attach): switch.
    std::thread::sleep(Duration::from_millis(2200));
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(p.pid() as i32, libc::SIGUSR1) }, 0);
    let out = agent.wait(RECORD_TIMEOUT);
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    out.assert_success();
    let f = read_folded(&out, "cpu.folded").process("jitgen");
    let total = f.total();
    let alpha = f.count_where(|s| through_jit(s, "jit_alpha", false));
    let beta = f.count_where(|s| through_jit(s, "jit_beta", true));
    let ctx = || format!("{}\n{}", f.top(12), out.stderr);
    // On a loaded machine the workload gets less than a CPU; the ratios
    // below hold whatever the count.
    assert!(total > 50, "too few samples: {total}\n{}", ctx());
    // alpha runs ~2 s of the 4 s, beta the rest; both well clear of 0.
    assert!(share(alpha, total) > 0.2, "jit_alpha in {alpha} of {total}\n{}", ctx());
    assert!(share(beta, total) > 0.3, "jit_beta (appended mid-recording) in {beta} of {total}\n{}", ctx());
    assert!(share(alpha + beta, total) > 0.9, "main;run;JIT;(native) in {} of {total}\n{}", alpha + beta, ctx());
    assert_eq!(malformed_lines(&out.stderr), Some(4), "3 malformed lines, then 1 appended\n{}", out.stderr);
    assert!(!out.stderr.contains("without a perf map"), "{}", out.stderr);
}

/// JIT code without a map: the frames stay anonymous, and the summary
/// names the process and what would help.
#[test]
fn jit_code_without_a_map_is_reported_with_a_hint() {
    require_root();
    let dir = gen_dir();
    let gen = build_gen(dir.path());
    let p = start(Command::new(&gen).arg("nomap"));
    std::thread::sleep(Duration::from_millis(200));
    let out = record_pid(p.pid(), 1, "folded");
    let f = read_folded(&out, "cpu.folded").process("jitgen");
    let anon = f.count_where(|s| s.functions().iter().any(|fr| fr.starts_with("[anon]+0x")));
    assert!(share(anon, f.total()) > 0.8, "{}\n{}", f.top(5), out.stderr);
    let hint = format!("jitgen (pid {}) ran JIT code without a perf map", p.pid());
    assert!(out.stderr.contains(&hint), "{}", out.stderr);
    assert!(out.stderr.contains("/tmp/perf-PID.map"), "{}", out.stderr);
}

/// The process has its own mount and pid namespaces and a private `/tmp`:
/// its map is `/tmp/perf-1.map` there, invisible from the host's `/tmp`.
#[test]
fn perf_map_in_a_private_tmp_of_another_namespace() {
    require_root();
    let dir = gen_dir();
    let gen = build_gen(dir.path());
    let script = format!("mount -t tmpfs tmpfs /tmp && exec {} perfmap", gen.display());
    let unshare =
        start(Command::new("unshare").args(["--mount", "--pid", "--fork", "--kill-child", "sh", "-c", &script]));
    let children = format!("/proc/{0}/task/{0}/children", unshare.pid());
    let mut pid = 0u32;
    wait_for("the namespaced process", Duration::from_secs(5), || {
        pid = std::fs::read_to_string(&children)
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        pid != 0 && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == gen)
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap().to_owned();
    assert!(nspid.ends_with("\t1"), "runs as pid 1 of its namespace: {nspid}");
    wait_for("its map", Duration::from_secs(5), || Path::new(&format!("/proc/{pid}/root/tmp/perf-1.map")).exists());
    assert!(!Path::new(&format!("/tmp/perf-{pid}.map")).exists());
    let out = record_pid(pid, 2, "folded");
    let f = read_folded(&out, "cpu.folded").process("jitgen");
    let named = count_jit(&f, |n| n == "jit_alpha" || n == "jit_beta");
    assert!(
        share(named, f.total()) > 0.8,
        "jit_alpha/jit_beta in {named} of {}\n{}\n{}",
        f.total(),
        f.top(10),
        out.stderr
    );
}

/// jitdump: found through the process's mappings, named with file and line
/// from `DEBUG_INFO` (the call site is line 42: a return address is looked
/// up one byte back, in the call). In pprof the name and the file are the
/// Function's own fields and the line its Line's, linked in the samples
/// between `native_leaf` and `run`.
#[test]
fn jitdump_names_with_file_and_line() {
    require_root();
    let dir = gen_dir();
    let gen = build_gen(dir.path());
    let p = start(Command::new(&gen).arg("jitdump"));
    let dump = PathBuf::from(format!("/tmp/jit-{}.dump", p.pid()));
    wait_for("the jitdump mapping", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{}/maps", p.pid())).is_ok_and(|m| m.contains(dump.to_str().unwrap()))
    });
    let out = record_pid(p.pid(), 2, "folded,pprof");
    let _ = std::fs::remove_file(&dump);
    let f = read_folded(&out, "cpu.folded").process("jitgen");
    let total = f.total();
    let at_call = f.count_where(|s| through_jit(s, "jit_dumped gen.js:42", true));
    assert!(share(at_call, total) > 0.8, "jit_dumped gen.js:42 in {at_call} of {total}\n{}\n{}", f.top(10), out.stderr);
    let named = count_jit(&f, |n| n.starts_with("jit_dumped gen.js:4"));
    assert!(share(named, total) > 0.9, "{named} of {total}\n{}", f.top(10));
    // pprof: the JIT function's Function carries the bare name and the
    // file, its Line the line, in the same stacks as the folded check.
    let prof = pprof::decode_gz(&out.read("cpu.pb.gz")).unwrap_or_else(|e| panic!("cpu.pb.gz {e}"));
    let pctx = || pprof_context(&prof);
    let funcs: Vec<&pprof::Function> = prof.function.iter().filter(|f| prof.string(f.name) == "jit_dumped").collect();
    assert!(!funcs.is_empty(), "no pprof Function named jit_dumped (bare, without the file)\n{}", pctx());
    for f in &funcs {
        assert_eq!(prof.string(f.filename), "gen.js", "jit_dumped's Function.filename\n{}", pctx());
    }
    let lines: Vec<i64> = prof
        .location
        .iter()
        .flat_map(|l| &l.line)
        .filter(|l| funcs.iter().any(|f| f.id == l.function_id))
        .map(|l| l.line)
        .collect();
    assert!(!lines.is_empty(), "no Location with a Line of jit_dumped\n{}", pctx());
    assert!(lines.iter().all(|l| *l == 42 || *l == 43), "jit_dumped's lines {lines:?}, DEBUG_INFO has 42 and 43");
    // Leaf first: native_leaf, called from jit_dumped at gen.js:42, called
    // from run, under main.
    let (mut p_total, mut p_at_call) = (0i64, 0i64);
    for s in &prof.sample {
        let n = s.value.first().copied().unwrap_or(0);
        p_total += n;
        let fr = prof.frames(s);
        let Some(i) = fr.iter().position(|x| x.name == "jit_dumped") else { continue };
        let jit = &fr[i];
        if jit.filename == "gen.js"
            && jit.line == 42
            && i >= 1
            && fr[i - 1].name == "native_leaf"
            && fr.get(i + 1).is_some_and(|x| x.name == "run")
            && fr[i + 1..].iter().any(|x| x.name == "main")
        {
            p_at_call += n;
        }
    }
    let folded_all = read_folded(&out, "cpu.folded").total();
    eprintln!("jitdump: folded {at_call} of {total} at gen.js:42; pprof {p_at_call} of {p_total}, lines {lines:?}");
    assert_eq!(p_total as u64, folded_all, "pprof and folded count the same samples");
    assert!(
        share(p_at_call as u64, p_total as u64) > 0.8,
        "pprof: native_leaf <- jit_dumped gen.js:42 <- run <- main in {p_at_call} of {p_total}\n{}",
        pctx()
    );
}

/// The heaviest pprof samples, leaf first, as `name file:line` frames.
fn pprof_context(prof: &pprof::Profile) -> String {
    let mut samples: Vec<&pprof::Sample> = prof.sample.iter().collect();
    samples.sort_by_key(|s| std::cmp::Reverse(s.value.first().copied().unwrap_or(0)));
    let mut out = String::new();
    for s in samples.iter().take(6) {
        let frames: Vec<String> =
            prof.frames(s)
                .iter()
                .map(|f| {
                    if f.filename.is_empty() {
                        f.name.clone()
                    } else {
                        format!("{} {}:{}", f.name, f.filename, f.line)
                    }
                })
                .collect();
        out.push_str(&format!("{:?}: {}\n", s.value, frames.join(" <- ")));
    }
    out
}

/// A JavaScript workload: `leafSin` (optimized by TurboFan, calling
/// `Math.sin`, which V8 compiles to a call of its C++ `ieee754::sin`) is
/// called by `middle`, which is never optimized so it cannot inline
/// `leafSin` (it runs as baseline or interpreted code; its own frame exists
/// either way).
const NODE_JS: &str = r#"
function leafSin(x) { let s = 0; for (let i = 0; i < 4000; i++) s += Math.sin(x + i); return s; }
function middle(n) { let t = 0; for (let i = 0; i < n; i++) t += leafSin(i); return t; }
%NeverOptimizeFunction(middle);
let r = 0;
for (;;) r += middle(50);
"#;

#[test]
fn node_perf_basic_prof() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let js = dir.path().join("work.js");
    std::fs::write(&js, NODE_JS).unwrap();
    // In the tempdir: V8 may write its log (isolate-*.log) into the cwd.
    let node = start(
        Command::new("node").args(["--perf-basic-prof", "--allow-natives-syntax"]).arg(&js).current_dir(dir.path()),
    );
    let map = PathBuf::from(format!("/tmp/perf-{}.map", node.pid()));
    // Warm up until TurboFan compiled leafSin (its `*` entry in the map).
    wait_for("TurboFan to compile leafSin", Duration::from_secs(20), || {
        std::fs::read_to_string(&map).is_ok_and(|m| m.contains("JS:*leafSin") || m.contains("LazyCompile:*leafSin"))
    });
    let out = record_pid(node.pid(), 4, "folded");
    let _ = std::fs::remove_file(&map);
    let f = read_folded(&out, "cpu.folded").process("node");
    let total = f.total();
    let ctx = || format!("{}\n{}", f.top(15), out.stderr);
    // Node 20's V8 writes `JS:*leafSin`, Node 18's `LazyCompile:*leafSin`.
    let is_fn = |n: &str, name: &str| {
        n.strip_prefix("JS:")
            .or_else(|| n.strip_prefix("LazyCompile:"))
            .is_some_and(|r| r.trim_start_matches(['*', '~', '^', '+']).starts_with(name))
    };
    let named = count_jit(&f, |n| is_fn(n, "leafSin ") || is_fn(n, "middle "));
    assert!(total > 50, "too few samples: {total}\n{}", ctx());
    assert!(share(named, total) >= 0.85, "workload JS functions in {named} of {total}\n{}", ctx());
    // Native code above (Math.sin's C++ implementation) and below (node's
    // C++ from `_start` through `node::Start`, an exported symbol, to V8's
    // JSEntry builtin) is named: a walk that stopped in the JIT code would
    // lose all of it.
    // (`main` itself does not show: it tail-calls `node::Start`.)
    let leaf_js = |s: &Stack| s.functions().iter().rposition(|fr| is_jit(fr) && is_fn(base_name(fr), "leafSin "));
    let with_leaf = f.count_where(|s| leaf_js(s).is_some());
    // Above: V8's C++ sine, which optimized code calls for `Math.sin`:
    // `v8::base::ieee754::sin(double)` (later V8 may call its
    // `ieee754::libm_sin`, or glibc's `sin`), named from NodeSource's
    // node's .symtab and equally from Debian's stripped libnode.so.108,
    // which exports it in .dynsym. The rest of leafSin's samples are in its
    // own code (the loop, the call's setup): 16% of them measured, with
    // ieee754::sin directly above in 83%.
    let is_sin = |fr: &str| {
        let name = fr.split('(').next().unwrap_or(fr);
        (fr.starts_with("v8::base::ieee754::") && (name.ends_with("::sin") || name.ends_with("::libm_sin")))
            || ["sin", "__sin", "__sin_fma"].contains(&name)
    };
    let sin_above =
        f.count_where(|s| leaf_js(s).is_some_and(|i| s.functions().get(i + 1).is_some_and(|fr| is_sin(fr))));
    // No native frame above leafSin is left as `file+0x..` or unknown code
    // (`__ieee754_rem_pio2`, which sin calls for large arguments, is named
    // too).
    let unnamed_above = f.count_where(|s| {
        leaf_js(s).is_some_and(|i| {
            s.functions()[i + 1..].iter().any(|fr| {
                !is_kernel(fr) && (fr.contains("+0x") || fr.starts_with("[unknown]") || fr.starts_with("[anon]"))
            })
        })
    });
    let main_below = f.count_where(|s| {
        leaf_js(s).is_some_and(|i| {
            let below = &s.functions()[..i];
            below.first().is_some_and(|fr| frame_is(fr, "_start"))
                && below.iter().any(|fr| fr.starts_with("node::Start("))
        })
    });
    eprintln!(
        "node: leafSin in {with_leaf} of {total}; ieee754::sin right above it in {sin_above}, \
         unnamed frames above it in {unnamed_above}; _start..node::Start below it in {main_below}"
    );
    assert!(
        share(sin_above, with_leaf) > 0.6,
        "v8::base::ieee754::sin right above leafSin in {sin_above} of {with_leaf}\n{}",
        ctx()
    );
    assert!(
        share(unnamed_above, with_leaf) < 0.05,
        "unnamed native frames above leafSin in {unnamed_above} of {with_leaf}\n{}",
        ctx()
    );
    assert!(
        share(main_below, with_leaf) > 0.9,
        "_start..node::Start..JSEntry below leafSin in {main_below} of {with_leaf}\n{}",
        ctx()
    );
}

const JAVA_SRC: &str = r#"
public class Hot {
    static double leaf(double x) { double s = 0; for (int i = 0; i < 1000; i++) s += Math.sqrt(x + i) * 1.0000001; return s; }
    static double outer(int n) { double t = 0; for (int i = 0; i < n; i++) t += leaf(i); return t; }
    public static void main(String[] a) { double r = 0; for (;;) r += outer(100); }
}
"#;

/// One JVM run: hot methods compiled by C2, the map written on demand by
/// `jcmd PID Compiler.perfmap` (`0x`-prefixed addresses), frame pointers
/// kept in compiled code. `Hot.leaf` is kept out of line
/// (`CompileCommand=dontinline`): C2 would inline it into `Hot.outer`, and
/// a stack of one JIT frame shows nothing of the walk through JIT code.
#[test]
fn java_perf_map_from_jcmd() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Hot.java"), JAVA_SRC).unwrap();
    let javac = Command::new("javac").arg("-d").arg(dir.path()).arg(dir.path().join("Hot.java")).status().unwrap();
    assert!(javac.success());
    let java = start(
        Command::new("java")
            .args(["-XX:+PreserveFramePointer", "-XX:CompileCommand=quiet", "-XX:CompileCommand=dontinline,Hot::leaf"])
            .args(["-Xss1m", "-cp"])
            .arg(dir.path())
            .arg("Hot"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let map = PathBuf::from(format!("/tmp/perf-{}.map", java.pid()));
    let jcmd = Command::new("jcmd").arg(java.pid().to_string()).arg("Compiler.perfmap").output().unwrap();
    assert!(jcmd.status.success(), "{}", String::from_utf8_lossy(&jcmd.stderr));
    let text = std::fs::read_to_string(&map).unwrap();
    assert!(text.lines().all(|l| l.starts_with("0x")), "HotSpot writes 0x-prefixed addresses");
    assert!(text.contains("Hot.leaf(double)"), "{}", &text[..text.len().min(2000)]);
    let out = record_pid(java.pid(), 3, "folded");
    let _ = std::fs::remove_file(&map);
    let f = read_folded(&out, "cpu.folded").process("java");
    let total = f.total();
    let ctx = || format!("{}\n{}", f.top(8), out.stderr);
    let java_method = |fr: &str, m: &str| is_jit(fr) && base_name(fr).contains(m);
    // The innermost Hot.leaf frame (kernel frames may follow it).
    let leaf_at = |s: &Stack| s.functions().iter().rposition(|fr| java_method(fr, "Hot.leaf(double)"));
    let with_leaf = f.count_where(|s| leaf_at(s).is_some());
    // Hot.outer's caller: `Hot.main` interpreted (`Interpreter`) or, once
    // C2 compiled its loop, `Hot.main` itself, entered from the call stub
    // (`StubRoutines`); every frame from the first JIT one up to Hot.outer
    // is JIT code.
    let outer_below = f.count_where(|s| {
        let fr = s.functions();
        leaf_at(s).is_some_and(|i| i >= 1 && java_method(&fr[i - 1], "Hot.outer(int)"))
    });
    // Below the JIT frames, HotSpot's C++ that called into Java
    // (`JavaCalls::call_helper`, libjvm) and the launcher's thread that runs
    // `main`: `clone3;start_thread;ThreadJavaMain;JavaMain` (libjli, glibc).
    let native_below = f.count_where(|s| {
        let fr = s.functions();
        let Some(i) = leaf_at(s) else { return false };
        let Some(first_jit) = fr.iter().position(|x| is_jit(x)) else { return false };
        first_jit >= 1
            && fr[first_jit..i].iter().all(|x| is_jit(x))
            && fr[first_jit - 1].starts_with("JavaCalls::call_helper(")
            && (frame_is(&fr[0], "clone3") || frame_is(&fr[0], "clone"))
            && s.has_subsequence(&["start_thread", "ThreadJavaMain", "JavaMain"])
    });
    eprintln!(
        "java: Hot.leaf in {with_leaf} of {total}; Hot.outer under it in {outer_below}; \
         call_helper..JavaMain..clone3 under the JIT frames in {native_below}"
    );
    assert!(total > 30, "too few samples: {total}\n{}", ctx());
    // Hot.leaf does all the work (Hot.outer's own loop is 1 in 1000 of it).
    assert!(share(with_leaf, total) > 0.7, "Hot.leaf in {with_leaf} of {total}\n{}", ctx());
    assert!(
        share(outer_below, with_leaf) > 0.9,
        "Hot.outer right under Hot.leaf in {outer_below} of {with_leaf}\n{}",
        ctx()
    );
    assert!(
        share(native_below, with_leaf) > 0.9,
        "clone3..JavaMain..JavaCalls::call_helper;<JIT frames> under Hot.leaf in {native_below} of {with_leaf}\n{}",
        ctx()
    );
}
