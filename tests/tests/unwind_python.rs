//! CFI unwinding of Debian's stripped `/usr/bin/python3` (a big binary
//! without frame pointers), compared with `perf record --call-graph dwarf`
//! on the same process; split from unwind.rs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use profiler_integration_tests::agent::{run_command, RECORD_TIMEOUT};
use profiler_integration_tests::folded::Stack;
use profiler_integration_tests::unwind::{outermost_is_start, pct, share, spawn_pids, unwinder, unwinding, FREQUENCY};
use profiler_integration_tests::{require_root, Workload};

/// Debian's python3.11: stripped (no .symtab), built without frame
/// pointers; `Py_BytesMain`, `_PyEval_EvalFrameDefault` and `_start` are
/// dynamic symbols, `main` is not (and has no frame: it tail-calls
/// `Py_BytesMain`). Not `python3` from PATH: that may be a pyenv build.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// A function-call loop calling into C (str(), len()), so the stacks also
/// go through C functions below the interpreter loop.
const PY_SRC: &str = "
def work():
    total = 0
    for i in range(1000):
        total += len(str(i))
    return total
while True:
    work()
";

/// Minimum share of python3's samples passing through
/// `_PyEval_EvalFrameDefault` and reaching `Py_BytesMain`, with `_start`
/// outermost. All its CPU time is in the interpreter loop and what it calls;
/// perf --call-graph dwarf gets 100% here (220, 389 and 412 of as many
/// samples in three runs), and so did the agent (407 of 407; 0% with frame
/// pointers only).
const MIN_PYTHON_SHARE: f64 = 0.90;

/// How far (in share points) below perf's share ours may be.
const MAX_BELOW_PERF: f64 = 0.10;

const PYTHON_SECS: u64 = 4;

#[test]
fn python3_stacks_reach_py_bytes_main() {
    require_root();
    let python = Path::new(SYSTEM_PYTHON);
    assert!(python.exists(), "{SYSTEM_PYTHON} is missing (the test needs Debian's python3 package)");
    let mut w = Workload::spawn("python3", python, &["-c", PY_SRC]);
    w.boost();
    w.warm_up();

    let mut agent = spawn_pids(&[w.pid()], PYTHON_SECS, &unwinder("cfi"));
    // perf, at the same time on the same process, for reference.
    let attached = agent.wait_attached(Duration::from_secs(60));
    let perf = PerfRun::start(w.pid(), PYTHON_SECS);
    let out = agent.wait(RECORD_TIMEOUT);
    out.assert_success();
    let perf_share = perf.and_then(|p| p.finish());
    w.assert_running();

    let p = out.folded().process("python3");
    let ctx = format!("python3 stacks:\n{}\n{}", p.top(15), out.context());
    let total = p.total();
    let complete = p.count_where(python_complete);
    let ours = share(complete, total);
    let perf_note = match perf_share {
        Some((ok, n)) => format!("perf --call-graph dwarf: {ok} of {n} ({})", pct(share(ok, n))),
        None => "perf: not compared (see above)".to_string(),
    };
    eprintln!(
        "python3: {complete} of {total} samples ({}) pass through _PyEval_EvalFrameDefault to \
         Py_BytesMain from _start; {perf_note}; agent attached: {}; {}",
        pct(ours),
        attached.is_some(),
        unwinding(&out)
    );
    assert!(total > 0, "no samples for python3 (pid {})\n{ctx}", w.pid());
    assert!(
        ours >= MIN_PYTHON_SHARE,
        "only {complete} of {total} python3 samples ({}) have \
         _start;...;Py_BytesMain;...;_PyEval_EvalFrameDefault (want >= {}; {perf_note})\n{ctx}",
        pct(ours),
        pct(MIN_PYTHON_SHARE)
    );
    if let Some((ok, n)) = perf_share {
        let theirs = share(ok, n);
        assert!(
            ours >= theirs - MAX_BELOW_PERF,
            "our share {} is more than {} points below perf's {} on the same process\n{ctx}",
            pct(ours),
            MAX_BELOW_PERF * 100.0,
            pct(theirs)
        );
    }
}

/// `_start` outermost, then `Py_BytesMain`, then `_PyEval_EvalFrameDefault`
/// (perf), or the script's Python frames that the agent puts in its place.
fn python_complete(s: &Stack) -> bool {
    outermost_is_start(s)
        && (s.has_subsequence(&["_start", "Py_BytesMain", "_PyEval_EvalFrameDefault"])
            || s.has_subsequence(&["_start", "Py_BytesMain", "<module>"]))
}

/// `perf record --call-graph dwarf` running on one process.
struct PerfRun {
    child: std::process::Child,
    dir: tempfile::TempDir,
    started: Instant,
}

impl PerfRun {
    /// Starts `perf record --call-graph dwarf -p <pid> -F 99 -- sleep <secs>`;
    /// None (with a note) if perf cannot be run.
    fn start(pid: u32, secs: u64) -> Option<PerfRun> {
        let dir = tempfile::Builder::new().prefix("profiler-perf-").tempdir().expect("create tempdir");
        let child = Command::new("perf")
            .args(["record", "--call-graph", "dwarf", "-F", FREQUENCY, "-p", &pid.to_string(), "-o"])
            .arg(dir.path().join("perf.data"))
            .args(["--", "sleep", &secs.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("record.err")).expect("create perf stderr file"))
            .spawn();
        match child {
            Ok(child) => Some(PerfRun { child, dir, started: Instant::now() }),
            Err(e) => {
                eprintln!("note: perf not compared: cannot run perf: {e}");
                None
            }
        }
    }

    /// Waits for perf, runs `perf script`, and returns (samples whose stack
    /// is complete in the same sense as [`python_complete`], samples); None
    /// (with a note) if perf failed or recorded nothing.
    fn finish(mut self) -> Option<(u64, u64)> {
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for perf") {
                break status;
            }
            if self.started.elapsed() > RECORD_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                eprintln!("note: perf not compared: perf record did not exit within {RECORD_TIMEOUT:?}");
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let record_err = std::fs::read_to_string(self.dir.path().join("record.err")).unwrap_or_default();
        if !status.success() {
            eprintln!("note: perf not compared: perf record failed ({status}):\n{record_err}");
            return None;
        }
        let mut cmd = Command::new("perf");
        cmd.args(["script", "--no-inline", "-F", "comm,pid,ip,sym", "-i"]).arg(self.dir.path().join("perf.data"));
        let run = run_command(cmd, RECORD_TIMEOUT);
        if !run.status.success() {
            eprintln!("note: perf not compared: perf script failed\n{}", run.context());
            return None;
        }
        let samples = parse_perf_script(&run.stdout);
        let n = samples.len() as u64;
        if n == 0 {
            eprintln!("note: perf not compared: perf recorded no samples\n{record_err}");
            return None;
        }
        let ok = samples
            .iter()
            .filter(|frames| {
                // perf lists the leaf first.
                frames.last().is_some_and(|f| f == "_start")
                    && frames.iter().any(|f| f == "Py_BytesMain")
                    && frames.iter().any(|f| f == "_PyEval_EvalFrameDefault")
            })
            .count() as u64;
        Some((ok, n))
    }
}

impl Drop for PerfRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The call chains of `perf script` output (leaf first), one per sample:
/// a sample is a header line (`comm pid`) followed by indented
/// `address symbol+offset` lines.
fn parse_perf_script(text: &str) -> Vec<Vec<String>> {
    let mut samples: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            samples.push(Vec::new());
            continue;
        }
        let Some(sample) = samples.last_mut() else { continue };
        let mut parts = line.trim().splitn(2, char::is_whitespace);
        let _address = parts.next();
        let sym = parts.next().unwrap_or("[unknown]").trim();
        // Drop ` (dso)` if present, then `+0xOFFSET`.
        let sym = match sym.rfind(" (") {
            Some(i) if sym.ends_with(')') => &sym[..i],
            _ => sym,
        };
        let sym = match sym.rfind("+0x") {
            Some(i) => &sym[..i],
            None => sym,
        };
        sample.push(sym.to_string());
    }
    samples
}

#[test]
fn python_predicates_accept_complete_stacks_and_reject_truncated_ones() {
    use profiler_integration_tests::parse_folded;

    let py = parse_folded(
        "python3;_start;__libc_start_main;__libc_start_call_main;python3.11+0x227d10;Py_BytesMain;Py_RunMain;\
         [unknown];PyEval_EvalCode;_PyEval_EvalFrameDefault;PyObject_Str 4\n\
         python3;[unknown];_PyEval_EvalFrameDefault 1\n\
         python3;Py_BytesMain;_PyEval_EvalFrameDefault 1\n",
    );
    assert_eq!(py.count_where(python_complete), 4);

    let perf = parse_perf_script(
        "python3 17376 \n\
         \t          12b8ce _PyEval_EvalFrameDefault+0x7de (/usr/bin/python3.11)\n\
         \t          2456ee [unknown] (/usr/bin/python3.11)\n\
         \t          227d36 Py_BytesMain\n\
         \t           27304 __libc_start_main_impl+0x84 (inlined)\n\
         \t          227bd0 _start\n\
         \n\
         python3 17376 \n\
         \t          12b8ce _PyEval_EvalFrameDefault\n",
    );
    assert_eq!(perf.len(), 2);
    assert_eq!(perf[0], ["_PyEval_EvalFrameDefault", "[unknown]", "Py_BytesMain", "__libc_start_main_impl", "_start"]);
    assert_eq!(perf[1], ["_PyEval_EvalFrameDefault"]);
}
