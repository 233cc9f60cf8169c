//! Workloads: small C or Rust programs compiled by the test, run as child
//! processes, and killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// gcc flags that keep every frame on a frame-pointer-walkable stack.
pub const C_FP_FLAGS: &[&str] =
    &["-O1", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer", "-fno-optimize-sibling-calls", "-fno-inline"];

/// How long a workload runs before the agent is started, so it is hot and
/// has its mappings in place.
pub const WARMUP: Duration = Duration::from_millis(500);

/// Spends CPU in `leaf_alpha` and `leaf_beta` (3:1 by iteration count of the
/// same loop body), both called by `middle`, called by `main`, forever.
///
/// Each round draws its length at random (0.5-1.5 UNIT, the same for both
/// leaves, so every round is 3:1): with a fixed length a round took ~2.0 ms
/// here, a fifth of the 99 Hz period, and the samples stayed in phase with
/// the rounds for seconds, so the ratio of a 9 s daemon run came out
/// anywhere from 2.2 to 4.1.
pub const FP_RATIO_C: &str = r#"
#include <stdint.h>

#define UNIT 1000000UL

static uint64_t rng = 88172645463325252ull;

static uint64_t round_length(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return UNIT / 2 + rng % UNIT;
}

/* The accumulator is a volatile local: the loop cannot be deleted, and the
 * stack slot makes gcc 12 give the leaf a frame-pointer prologue (with a
 * static accumulator it omits it despite -mno-omit-leaf-frame-pointer, and a
 * frame-pointer walk then skips `middle`). */
#define SPIN(n)                                  \
    volatile uint64_t acc = 0;                   \
    for (uint64_t i = 0; i < (n); i++) acc += i

/* Same alignment, so both loops sit at the same offset in a cache line and
 * run at the same speed per iteration (unaligned, they differed by ~15%). */
__attribute__((noinline, aligned(64))) void leaf_alpha(uint64_t n) { SPIN(n); }
__attribute__((noinline, aligned(64))) void leaf_beta(uint64_t n) { SPIN(n); }

__attribute__((noinline)) void middle(void) {
    uint64_t n = round_length();
    leaf_alpha(3 * n);
    leaf_beta(n);
}

int main(void) {
    for (;;)
        middle();
}
"#;

/// A single-threaded busy loop in `busy_loop`.
pub const BUSY_C: &str = r#"
#include <stdint.h>

__attribute__((noinline)) void busy_loop(void) {
    volatile uint64_t acc = 0; /* local: forces a frame pointer, see FP_RATIO_C */
    for (uint64_t i = 0; i < 1000000UL; i++)
        acc += i;
}

int main(void) {
    for (;;)
        busy_loop();
}
"#;

/// A compiled workload program that is running.
pub struct Workload {
    child: Child,
    name: String,
    bin: PathBuf,
    _dir: TempDir,
}

impl Workload {
    /// Compiles `source` with `gcc <flags>` into a binary called `name` (so the
    /// process' comm is `name`; keep it under 16 bytes) and starts it.
    pub fn c(name: &str, source: &str, flags: &[&str]) -> Workload {
        let dir = workdir();
        let src = dir.path().join(format!("{name}.c"));
        std::fs::write(&src, source).expect("write C source");
        let bin = dir.path().join(name);
        let mut cmd = Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()));
        cmd.args(flags).arg("-o").arg(&bin).arg(&src);
        compile(cmd);
        Self::start(name, bin, dir)
    }

    /// Compiles `source` with `rustc -C opt-level=1 -C force-frame-pointers=yes -g
    /// <extra>` into a binary called `name` (also the crate name) and starts it.
    pub fn rust(name: &str, source: &str, extra: &[&str]) -> Workload {
        let dir = workdir();
        let src = dir.path().join(format!("{name}.rs"));
        std::fs::write(&src, source).expect("write Rust source");
        let bin = dir.path().join(name);
        let mut cmd = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
        cmd.args(["--edition", "2021", "--crate-type", "bin", "--crate-name", name])
            .args(["-C", "opt-level=1", "-C", "force-frame-pointers=yes", "-g"])
            .args(extra)
            .arg("-o")
            .arg(&bin)
            .arg(&src);
        compile(cmd);
        Self::start(name, bin, dir)
    }

    /// Runs an existing program (e.g. `/usr/bin/python3`) with `args`; `name`
    /// is the process name (comm) the agent should report for it.
    pub fn spawn(name: &str, program: &Path, args: &[&str]) -> Workload {
        let dir = workdir();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start workload {}: {e}", program.display()));
        let mut w = Workload { child, name: name.to_string(), bin: program.to_path_buf(), _dir: dir };
        std::thread::sleep(Duration::from_millis(50));
        w.assert_running();
        w
    }

    /// Runs an already-built binary.
    fn start(name: &str, bin: PathBuf, dir: TempDir) -> Workload {
        let child = Command::new(&bin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start workload {}: {e}", bin.display()));
        let mut w = Workload { child, name: name.to_string(), bin, _dir: dir };
        std::thread::sleep(Duration::from_millis(50));
        w.assert_running();
        w
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pid_arg(&self) -> String {
        self.pid().to_string()
    }

    /// The process name (comm) the agent should report.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Sleeps [`WARMUP`] and checks the workload is still alive.
    pub fn warm_up(&mut self) {
        std::thread::sleep(WARMUP);
        self.assert_running();
    }

    /// Renices the workload to -20 so that builds running on the same (small)
    /// machine barely take CPU from it and it stays on a CPU all the time.
    pub fn boost(&self) {
        // SAFETY: setpriority(2) on our own child; no memory is passed.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, self.pid() as libc::id_t, -20) };
        assert_eq!(rc, 0, "setpriority(-20) failed: {}", std::io::Error::last_os_error());
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait workload") {
            panic!("workload {} exited early: {status}", self.name);
        }
    }

    /// CPU time consumed so far by the (single-threaded) workload.
    pub fn cpu_time(&self) -> Duration {
        let pid = self.pid();
        // schedstat: "<ns on cpu> <ns waiting> <timeslices>", nanosecond precision.
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/schedstat")) {
            if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
                return Duration::from_nanos(ns);
            }
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
        let rest = &stat[stat.rfind(')').expect("comm in stat") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_nanos(ticks * 1_000_000_000 / hz)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Compiles `source` with `gcc <flags>` into `dir/<name>` without running it
/// (e.g. a shared library, with `-shared -fPIC` in `flags`); returns its path.
pub fn build_c(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).expect("write C source");
    let out = dir.join(name);
    let mut cmd = Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()));
    cmd.args(flags).arg("-o").arg(&out).arg(&src);
    compile(cmd);
    out
}

fn workdir() -> TempDir {
    tempfile::Builder::new().prefix("profiler-workload-").tempdir().expect("create workload tempdir")
}

fn compile(mut cmd: Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "compiling workload failed: {cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three deep, two leaves with the same loop body; the heavy one runs 3x
/// the iterations. Line numbers matter: the pprof check names them. Each
/// round's length is drawn at random (as in the C 3:1 workload): a fixed
/// round of ~2 ms stayed in phase with 99 Hz sampling and put the split
/// anywhere from 3.0 to past 3.75 in single runs. python.rs runs it plain,
/// jit_python.rs under `-X perf` / `-X perf_jit`.
pub const SPLIT_PY: &str = "\
import random
def py_leaf_heavy(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
def py_leaf_light(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
def py_middle(n):
    return py_leaf_heavy(3 * n) + py_leaf_light(n)
def py_outer():
    while True:
        py_middle(random.randint(5000, 15000))
py_outer()
";
