//! CPython frames: Debian's stripped /usr/bin/python3 (3.11) running
//! scripts the tests write. The kernel walks the interpreter's frames at
//! each `_PyEval_EvalFrameDefault` frame; the agent names them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use profiler_integration_tests::agent::RECORD_TIMEOUT;
use profiler_integration_tests::folded::frame_is;
use profiler_integration_tests::pprof;
use profiler_integration_tests::sched::read_folded;
use profiler_integration_tests::workload::SPLIT_PY;
use profiler_integration_tests::{require_root, spawn_record, Folded, RecordOutput, Stack, Workload};

/// Debian's interpreter, not `python3` from PATH (which may be a pyenv build).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
const SECS: u64 = 5;

/// `def py_leaf_heavy`, and the lines a sample in it may be at: its loop,
/// and the def line itself. A sample taken as the function is entered is
/// at its first instruction (RESUME), which CPython maps to the def line;
/// CI once saw that once in 5021 samples.
const HEAVY_DEF_LINE: u32 = 2;
const HEAVY_BODY: std::ops::RangeInclusive<u32> = HEAVY_DEF_LINE..=6;

/// Expected heavy:light ratio, and the relative error allowed. The loops
/// are identical, so the split is 3:1 less the calls' fixed costs (py-spy
/// sees 2.8-2.9).
const RATIO: f64 = 3.0;
const RATIO_TOLERANCE: f64 = 0.25;
/// The rate of the ratio's recording. At 99 Hz (~500 samples) the ratio
/// p/(1-p) of a 0.74 share moves 0.3 per point of binomial noise, and on a
/// contended VM the sampler's phase against scheduler slices adds more:
/// runs with two CPU hogs beside the script gave 2.67-3.91 at 99 Hz and
/// 2.84-2.89 at 999 Hz, and CI once saw 1.82. py-spy keeps its own 99 Hz.
const FREQUENCY: &str = "999";
/// Share of the process's samples whose stack holds the whole Python
/// chain: all its time is in these functions (and the C they call).
const MIN_CHAIN_SHARE: f64 = 0.85;
/// How far apart our and py-spy's heavy-leaf shares may be (points).
const MAX_SHARE_GAP: f64 = 0.10;

fn python() -> &'static Path {
    let p = Path::new(SYSTEM_PYTHON);
    assert!(p.exists(), "{SYSTEM_PYTHON} is missing (the tests need Debian's python3 package)");
    p
}

/// Writes `source` into a fresh directory and runs `interpreter` on it.
fn run_script(interpreter: &Path, name: &str, source: &str) -> (Workload, tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("profiler-py-").tempdir().expect("tempdir");
    let script = dir.path().join(format!("{name}.py"));
    std::fs::write(&script, source).expect("write script");
    let comm = interpreter.file_name().and_then(|n| n.to_str()).unwrap_or("python3").to_string();
    let mut w = Workload::spawn(&comm, interpreter, &[script.to_str().expect("utf-8 path")]);
    w.warm_up();
    (w, dir, script)
}

fn record_pid(pid: u32, extra: &[&str]) -> RecordOutput {
    let pid = pid.to_string();
    let secs = SECS.to_string();
    let mut args = vec!["--pid", pid.as_str(), "--duration", secs.as_str()];
    args.extend_from_slice(extra);
    let mut agent = spawn_record(&args);
    agent.wait_attached(Duration::from_secs(90));
    let out = agent.wait(RECORD_TIMEOUT);
    out.assert_success();
    out
}

fn share(part: u64, whole: u64) -> f64 {
    part as f64 / whole.max(1) as f64
}

/// The innermost Python frame of a stack among `names`, if any.
fn has(s: &Stack, name: &str) -> bool {
    s.functions().iter().any(|f| frame_is(f, name))
}

/// `py-spy record -f raw` on `pid` for `secs`, without pausing it; the
/// folded lines it writes (`func (file:line);... count`).
fn py_spy(pid: u32, secs: u64) -> std::process::Child {
    let bin = which("py-spy")
        .unwrap_or_else(|| panic!("py-spy is not installed (`python3 -m pip install py-spy`; .ci/run installs it)"));
    Command::new(bin)
        .args(["record", "--nonblocking", "-r", "99", "-f", "raw", "-d", &secs.to_string(), "-p", &pid.to_string()])
        .arg("-o")
        .arg(std::env::temp_dir().join(format!("py-spy-{pid}.txt")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start py-spy")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// (heavy, light, total) sample counts in py-spy's raw output.
fn py_spy_counts(text: &str) -> (u64, u64, u64) {
    let (mut heavy, mut light, mut total) = (0, 0, 0);
    for line in text.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else { continue };
        let Ok(n) = n.parse::<u64>() else { continue };
        total += n;
        if stack.contains("py_leaf_heavy (") {
            heavy += n;
        } else if stack.contains("py_leaf_light (") {
            light += n;
        }
    }
    (heavy, light, total)
}

#[test]
fn python_functions_split_lines_and_py_spy_agree() {
    require_root();
    let (mut w, _dir, script) = run_script(python(), "split", SPLIT_PY);
    let spy = py_spy(w.pid(), SECS);
    let out = record_pid(w.pid(), &["--frequency", FREQUENCY]);
    let spy = spy.wait_with_output().expect("wait for py-spy");
    w.assert_running();

    let p = out.folded().process("python3");
    let ctx = format!("python3 stacks:\n{}\n{}", p.top(12), out.context());
    let total = p.total();
    assert!(total > 50, "too few samples ({total})\n{ctx}");
    let heavy = p.count_where(|s| s.has_subsequence(&["<module>", "py_outer", "py_middle", "py_leaf_heavy"]));
    let light = p.count_where(|s| s.has_subsequence(&["<module>", "py_outer", "py_middle", "py_leaf_light"]));
    let chain = share(heavy + light, total);
    eprintln!("python3: {heavy} heavy + {light} light of {total} samples ({:.1}% with the chain)", chain * 100.0);
    assert!(chain >= MIN_CHAIN_SHARE, "only {:.1}% of samples have the Python chain\n{ctx}", chain * 100.0);
    let ratio = heavy as f64 / light.max(1) as f64;
    assert!(
        (ratio - RATIO).abs() <= RATIO * RATIO_TOLERANCE,
        "heavy:light = {ratio:.2}, want {RATIO} +- {:.0}%\n{ctx}",
        RATIO_TOLERANCE * 100.0
    );
    // Python frames are named, never left as interpreter frames.
    let raw_eval = p.count_where(|s| has(s, "_PyEval_EvalFrameDefault"));
    assert!(share(raw_eval, total) < 0.05, "{raw_eval} samples still show the interpreter loop\n{ctx}");

    // pprof: the function's file and first line, and lines inside its body.
    let prof = decode_pprof(&out);
    let s = |i: i64| prof.string_table.get(i as usize).map_or("", String::as_str);
    let f = prof
        .function
        .iter()
        .find(|f| s(f.name) == "py_leaf_heavy")
        .unwrap_or_else(|| panic!("no pprof function py_leaf_heavy\n{ctx}"));
    assert_eq!(s(f.filename), script.to_str().unwrap(), "py_leaf_heavy's filename");
    assert_eq!(f.start_line, i64::from(HEAVY_DEF_LINE), "py_leaf_heavy's start line");
    let lines: Vec<i64> =
        prof.location.iter().flat_map(|l| &l.line).filter(|l| l.function_id == f.id).map(|l| l.line).collect();
    assert!(!lines.is_empty(), "no location of py_leaf_heavy");
    assert!(
        lines.iter().all(|l| HEAVY_BODY.contains(&(*l as u32))),
        "py_leaf_heavy's lines {lines:?} are outside its body {HEAVY_BODY:?}"
    );

    // py-spy on the same process at the same time.
    let spy_err = String::from_utf8_lossy(&spy.stderr).into_owned();
    let raw = std::fs::read_to_string(std::env::temp_dir().join(format!("py-spy-{}.txt", w.pid())))
        .unwrap_or_else(|e| panic!("py-spy wrote nothing ({e}): {spy_err}"));
    let (spy_heavy, spy_light, spy_total) = py_spy_counts(&raw);
    assert!(spy_total > 50, "py-spy took {spy_total} samples: {spy_err}");
    let (ours, theirs) = (share(heavy, total), share(spy_heavy, spy_total));
    let (ours_l, theirs_l) = (share(light, total), share(spy_light, spy_total));
    eprintln!(
        "shares ours/py-spy: heavy {:.1}%/{:.1}%, light {:.1}%/{:.1}%",
        ours * 100.0,
        theirs * 100.0,
        ours_l * 100.0,
        theirs_l * 100.0
    );
    assert!((ours - theirs).abs() <= MAX_SHARE_GAP, "heavy: ours {ours:.3}, py-spy {theirs:.3}\n{ctx}");
    assert!((ours_l - theirs_l).abs() <= MAX_SHARE_GAP, "light: ours {ours_l:.3}, py-spy {theirs_l:.3}\n{ctx}");
}

/// The main thread compresses (C code in zlib called from Python), a
/// second thread sleeps, off the GIL, under a named function.
const THREADS_PY: &str = "\
import os, threading, time, zlib
DATA = os.urandom(1 << 16) * 8
def py_sleeper():
    while True:
        time.sleep(0.02)
def py_compressor():
    while True:
        zlib.compress(DATA, 6)
threading.Thread(target=py_sleeper, daemon=True).start()
py_compressor()
";

/// Share of on-CPU samples of the compressing thread with zlib's C code
/// under `py_compressor`: nearly all its time is in deflate.
const MIN_ZLIB_SHARE: f64 = 0.70;

#[test]
fn c_extension_under_python_and_sleep_off_cpu() {
    require_root();
    let (mut w, _dir, _) = run_script(python(), "threads", THREADS_PY);
    let out = record_pid(w.pid(), &["--off-cpu"]);
    w.assert_running();

    let p = out.folded().process("python3");
    let ctx = format!("on-CPU:\n{}\n{}", p.top(10), out.context());
    let main = p.filter(|s| has(s, "py_compressor"));
    // zlib's code: libz's functions, named from .dynsym or as libz+0x...
    let in_zlib = main.count_where(|s| {
        let f = s.functions();
        let at = f.iter().position(|x| frame_is(x, "py_compressor")).unwrap_or(usize::MAX);
        f.iter()
            .skip(at.saturating_add(1))
            .any(|x| x.contains("deflate") || x.contains("libz.so") || x.contains("zlib_"))
    });
    let total = p.count_where(|s| !has(s, "py_sleeper"));
    assert!(
        share(in_zlib, total) >= MIN_ZLIB_SHARE,
        "{in_zlib} of {total} samples have zlib under py_compressor\n{ctx}"
    );

    let off: Folded = read_folded(&out, "off-cpu.folded").process("python3");
    let octx = format!("off-CPU:\n{}\n{}", off.top(10), out.context());
    let sleeping = off.count_where(|s| s.has_subsequence(&["py_sleeper"]) && s.leaf().ends_with("_[k]"));
    // The thread sleeps nearly the whole recording: several seconds of it
    // must be under py_sleeper.
    assert!(sleeping >= 1_000_000_000, "only {sleeping} ns off-CPU under py_sleeper\n{octx}");
}

/// A copy of python3 whose `Py_Version` says 3.99: an interpreter the
/// agent has no layout for. Its stacks keep their native frames, the
/// summary counts it, and the agent warns once.
/// Interpreters of the other supported versions on this host: pyenv's
/// builds (`$PYENV_ROOT/versions/3.1x.y/bin/python3.1x`, by default under
/// ~/.pyenv). Neither Debian 12 nor PyPI ships another CPython, so these
/// are what a host offers; none are installed by the tests.
fn other_interpreters() -> Vec<PathBuf> {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")))
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"));
    let mut found = Vec::new();
    for minor in [10, 12, 13] {
        let Ok(entries) = std::fs::read_dir(root.join("versions")) else { break };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.strip_prefix(&format!("3.{minor}.")).is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()))
            })
            .collect();
        dirs.sort();
        if let Some(bin) = dirs.last().map(|d| d.join(format!("bin/python3.{minor}"))).filter(|b| b.is_file()) {
            found.push(bin);
        }
    }
    found
}

/// The 3-deep chain and the 3:1 split on every other supported version the
/// host has: 3.10 and 3.12 through their offset tables, 3.13 through its
/// `_Py_DebugOffsets`.
#[test]
fn other_cpython_versions_give_the_python_chain() {
    require_root();
    let interpreters = other_interpreters();
    if interpreters.is_empty() {
        eprintln!("no CPython 3.10, 3.12 or 3.13 under $PYENV_ROOT/versions: only 3.11 is tested on this host");
        return;
    }
    for interpreter in interpreters {
        let name = interpreter.file_name().unwrap().to_str().unwrap().to_owned();
        let (mut w, _dir, _) = run_script(&interpreter, "split", SPLIT_PY);
        let out = record_pid(w.pid(), &["--frequency", FREQUENCY]);
        w.assert_running();
        let p = out.folded().process(&name);
        let ctx = format!("{} stacks:\n{}\n{}", interpreter.display(), p.top(12), out.context());
        let total = p.total();
        assert!(total > 50, "too few samples ({total})\n{ctx}");
        let heavy = p.count_where(|s| s.has_subsequence(&["<module>", "py_outer", "py_middle", "py_leaf_heavy"]));
        let light = p.count_where(|s| s.has_subsequence(&["<module>", "py_outer", "py_middle", "py_leaf_light"]));
        let chain = share(heavy + light, total);
        let ratio = heavy as f64 / light.max(1) as f64;
        eprintln!(
            "{name}: {heavy} heavy + {light} light of {total} ({:.1}% with the chain, {ratio:.2}:1)",
            chain * 100.0
        );
        assert!(chain >= MIN_CHAIN_SHARE, "{name}: only {:.1}% of samples have the chain\n{ctx}", chain * 100.0);
        assert!(
            (ratio - RATIO).abs() <= RATIO * RATIO_TOLERANCE,
            "{name}: heavy:light = {ratio:.2}, want {RATIO} +- {:.0}%\n{ctx}",
            RATIO_TOLERANCE * 100.0
        );
        assert!(!out.stderr.contains("is not supported"), "{name} was not recognised\n{ctx}");
    }
}

#[test]
fn unknown_version_keeps_native_frames() {
    require_root();
    let dir = tempfile::Builder::new().prefix("profiler-py399-").tempdir().expect("tempdir");
    let copy = dir.path().join("python3.11");
    let mut bytes = std::fs::read(python()).expect("read python3");
    let at = py_version_offset(&bytes);
    assert_eq!(&bytes[at..at + 4][3..], &[3], "Py_Version of Debian's python3 is 3.x");
    bytes[at..at + 4].copy_from_slice(&0x0363_00f0u32.to_le_bytes());
    std::fs::write(&copy, &bytes).expect("write copy");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let (mut w, _sdir, _) = run_script(&copy, "split", SPLIT_PY);
    let out = record_pid(w.pid(), &[]);
    w.assert_running();

    let p = out.folded().process("python3.11");
    let ctx = format!("stacks:\n{}\n{}", p.top(8), out.context());
    assert!(p.total() > 20, "too few samples\n{ctx}");
    assert_eq!(p.count_where(|s| has(s, "py_outer") || has(s, "py_leaf_heavy")), 0, "named frames\n{ctx}");
    assert!(
        share(p.count_where(|s| has(s, "_PyEval_EvalFrameDefault")), p.total()) > 0.8,
        "the interpreter's native frames are gone\n{ctx}"
    );
    assert_eq!(out.stderr.matches("CPython 3.99 is not supported").count(), 1, "one warning\n{ctx}");
    assert!(out.stderr.contains("1 processes with an unsupported interpreter"), "the summary counts it\n{ctx}");
}

/// File offset of `Py_Version`'s value, through `.dynsym` and the segments.
fn py_version_offset(elf: &[u8]) -> usize {
    let out = Command::new("readelf").args(["-W", "--dyn-syms", SYSTEM_PYTHON]).output().expect("readelf");
    let text = String::from_utf8_lossy(&out.stdout);
    let vaddr = text
        .lines()
        .find(|l| l.split_whitespace().last() == Some("Py_Version"))
        .and_then(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .expect("Py_Version in .dynsym");
    let out = Command::new("readelf").args(["-W", "-l", SYSTEM_PYTHON]).output().expect("readelf");
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines().filter(|l| l.trim_start().starts_with("LOAD")) {
        let f: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .take(4)
            .filter_map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .collect();
        let (offset, va, filesz) = (f[0], f[1], f[3]);
        if vaddr >= va && vaddr < va + filesz {
            let at = (offset + vaddr - va) as usize;
            assert!(at + 4 <= elf.len());
            return at;
        }
    }
    panic!("Py_Version is in no LOAD segment");
}

/// The few pprof messages (profile.proto) the checks need.
fn decode_pprof(out: &RecordOutput) -> pprof::Profile {
    pprof::decode_gz(&out.read("cpu.pb.gz")).unwrap_or_else(|e| panic!("cpu.pb.gz {e}"))
}
