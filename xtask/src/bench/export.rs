//! `cargo xtask bench export`: how many bytes `profiler-agent run` exports per
//! process and interval, as OTLP profiles and as pprof files, gzip and raw,
//! and what its CPU use is with and without the OTLP exporter.
//!
//! Two workloads built with gcc (see workload.rs): a CPU-bound one with a few
//! hot functions, and one recursing 40-100 frames deep through several
//! functions into varying leaves. For each and at 19 Hz (the daemon default)
//! and 99 Hz, the daemon runs `--pid <workload> -o DIR --otlp-endpoint
//! http://127.0.0.1:PORT --otlp-protocol http/protobuf` against a loopback
//! receiver (receiver.rs) for N+1 intervals; the first interval is skipped,
//! and so is the partial one SIGTERM flushes. OTLP sizes are the request
//! bodies as received (gzip) and gunzipped; pprof sizes are the
//! `cpu-*.pb.gz` files and their gunzipped size. The same daemon run with
//! only `-o DIR` gives the CPU baseline.

mod receiver;
mod workload;

use std::{
    env,
    fs::{self, File},
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use flate2::read::GzDecoder;

use super::{
    measure::{install_signal_handlers, interrupted},
    TmpDir, FREQUENCIES,
};
use crate::{build, is_root, step};
use receiver::{Receiver, Request};
use workload::{Workload, WORKLOADS};

/// Target: gzip bytes per process and 10 s profile for a typical service.
const TARGET_BYTES: usize = 4096;
const TARGET_INTERVAL: u64 = 10;
/// What the daemon logs (at info) once its programs are attached and its
/// exporters started.
const READY: &str = "profiling at";

/// What every daemon run shares.
struct Plan {
    agent: PathBuf,
    /// An empty config file, so /etc/profiler-agent/config.toml is not read.
    config: PathBuf,
    dir: PathBuf,
    interval: u64,
    /// Measured intervals; the daemon runs one more.
    intervals: usize,
}

/// One folded file: samples, unique stacks, deepest stack (frames).
#[derive(Clone, Copy, Default)]
struct Folded {
    samples: u64,
    stacks: usize,
    depth: usize,
}

/// What one daemon run gave, for the measured intervals only.
struct DaemonRun {
    /// user+sys CPU from start until just before SIGTERM, and at READY (ms).
    cpu_ms: f64,
    startup_ms: f64,
    /// Per interval: the `cpu-*.pb.gz` file's size and its gunzipped size.
    pprof: Vec<(usize, usize)>,
    folded: Vec<Folded>,
    /// Per interval: the OTLP request (empty without a receiver).
    otlp: Vec<Request>,
}

struct Row {
    workload: &'static str,
    hz: u32,
    with_otlp: DaemonRun,
    files_only: DaemonRun,
}

pub fn run(interval: u64, intervals: usize) -> Result<()> {
    ensure!(interval > 0, "--interval must be at least 1 second");
    ensure!(intervals > 0, "--intervals must be at least 1");
    if !is_root() {
        bail!(
            "the export bench loads the agent's eBPF programs, which needs root; \
             run `sudo -E cargo xtask bench export`"
        );
    }
    let agent = build::run(true)?;
    let tmp = TmpDir::new()?;
    install_signal_handlers();
    let config = tmp.0.join("empty.toml");
    fs::write(&config, "# cargo xtask bench export: the built-in defaults\n")
        .with_context(|| format!("cannot write {}", config.display()))?;
    let plan = Plan { agent, config, dir: tmp.0.clone(), interval, intervals };
    let runs = intervals + 1;
    let mut rows = Vec::new();
    for (name, source) in WORKLOADS {
        step(format!("bench: building and starting the {name} workload"));
        let mut w = workload::start(name, source, &tmp.0)?;
        for hz in FREQUENCIES {
            step(format!("bench: {name} at {hz} Hz, OTLP/HTTP + files: {runs} x {interval} s"));
            let receiver = Receiver::start()?;
            let with_otlp = plan.daemon(&mut w, hz, Some(&receiver))?;
            step(format!("bench: {name} at {hz} Hz, files only: {runs} x {interval} s"));
            let files_only = plan.daemon(&mut w, hz, None)?;
            rows.push(Row { workload: name, hz, with_otlp, files_only });
        }
    }
    print_table(&rows, &plan);
    Ok(())
}

impl Plan {
    /// Runs the daemon on `w` for `intervals + 1` intervals (until that many
    /// have been exported), then stops it with SIGTERM.
    fn daemon(&self, w: &mut Workload, hz: u32, receiver: Option<&Receiver>) -> Result<DaemonRun> {
        w.check()?;
        let tag = format!("{}-{hz}-{}", w.name, if receiver.is_some() { "otlp" } else { "files" });
        let out = self.dir.join(&tag);
        let log = self.dir.join(format!("{tag}.log"));
        let mut cmd = Command::new(&self.agent);
        cmd.args(["--log-level", "info", "run", "--config"])
            .arg(&self.config)
            .args(["--pid", &w.pid().to_string(), "-F", &hz.to_string()])
            .args(["--export-interval", &format!("{}s", self.interval), "--http-listen", "127.0.0.1:0", "-o"])
            .arg(&out);
        if let Some(r) = receiver {
            cmd.args(["--otlp-endpoint", &r.endpoint(), "--otlp-protocol", "http/protobuf"]);
        }
        // Only the flags above: no OTEL_* settings, no proxy for loopback.
        for (key, _) in env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("OTEL_") || k.eq_ignore_ascii_case("PROFILER_LOG")) {
                cmd.env_remove(key);
            }
        }
        for key in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
            cmd.env_remove(key);
        }
        let file = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
        let mut daemon = Daemon { child, log };
        let pid = daemon.child.id();

        let started = Instant::now();
        while !fs::read_to_string(&daemon.log).is_ok_and(|t| t.contains(READY)) {
            daemon.check_running("before it was ready")?;
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the agent was not ready within 60 s:\n{}",
                daemon.tail()
            );
            thread::sleep(Duration::from_millis(20));
        }
        let startup = cpu_ticks(pid);

        let runs = self.intervals + 1;
        let deadline = Instant::now() + Duration::from_secs(self.interval * runs as u64 + 60);
        loop {
            let files = pprof_files(&out).len();
            let requests = receiver.map_or(runs, |r| r.requests().len());
            if files >= runs && requests >= runs {
                break;
            }
            if let Some(e) = receiver.and_then(|r| r.errors().into_iter().next()) {
                bail!("the OTLP receiver failed: {e}");
            }
            daemon.check_running("early")?;
            ensure!(!interrupted(), "interrupted; the agent was stopped");
            ensure!(
                Instant::now() < deadline,
                "after {runs} intervals + 60 s the agent had written {files} pprof files and sent {requests} \
                 OTLP requests; its output:\n{}",
                daemon.tail()
            );
            thread::sleep(Duration::from_millis(100));
        }
        let total = cpu_ticks(pid);
        let status = daemon.stop()?;
        ensure!(status.success(), "the agent exited with {status} after SIGTERM; its output:\n{}", daemon.tail());
        if let Some(e) = receiver.and_then(|r| r.errors().into_iter().next()) {
            bail!("the OTLP receiver failed: {e}");
        }

        let (Some(startup), Some(total)) = (startup, total) else {
            bail!("cannot read the agent's CPU time from /proc/{pid}/stat");
        };
        // SAFETY: sysconf has no preconditions.
        let tick_ms = 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // The first interval is skipped; so is anything after the last whole one.
        let measured = 1..runs;
        let mut pprof = Vec::new();
        let mut folded = Vec::new();
        for path in &pprof_files(&out)[measured.clone()] {
            let gz = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut raw = Vec::new();
            GzDecoder::new(gz.as_slice())
                .read_to_end(&mut raw)
                .with_context(|| format!("{} does not gunzip", path.display()))?;
            pprof.push((gz.len(), raw.len()));
            let name = path.to_string_lossy();
            let folded_path = PathBuf::from(format!("{}.folded", name.trim_end_matches(".pb.gz")));
            folded.push(folded_stats(&folded_path)?);
        }
        let otlp = receiver.map_or_else(Vec::new, |r| r.requests()[measured].to_vec());
        Ok(DaemonRun {
            cpu_ms: total as f64 * tick_ms / runs as f64,
            startup_ms: startup as f64 * tick_ms,
            pprof,
            folded,
            otlp,
        })
    }
}

/// The agent, stopped with SIGTERM (then SIGKILL) on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn check_running(&mut self, when: &str) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the agent exited {when} ({status}); its output:\n{}", self.tail());
        }
        Ok(())
    }

    /// SIGTERM, then waits for it to export the last interval and exit.
    fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        // export.shutdown_deadline is 10 s.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the agent did not exit within 20 s of SIGTERM; its output:\n{}", self.tail());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.stop().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `cpu-<stamp>.pb.gz` files in `dir`, oldest first (the stamp is the
/// interval's start).
fn pprof_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("cpu-") && n.ends_with(".pb.gz")))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Samples, unique stacks and the deepest stack (frames below the process
/// name) of a folded file: `process;outermost;...;leaf COUNT` lines.
fn folded_stats(path: &Path) -> Result<Folded> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut f = Folded::default();
    for line in text.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else { continue };
        f.samples += count.parse::<u64>().unwrap_or(0);
        f.stacks += 1;
        f.depth = f.depth.max(stack.split(';').count() - 1);
    }
    Ok(f)
}

/// utime + stime of all threads of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the comm: state is field 3, utime 14 and stime 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

fn print_table(rows: &[Row], plan: &Plan) {
    let (interval, n) = (plan.interval, plan.intervals);
    println!();
    println!(
        "Export size per process and {interval} s profile: mean of {n} interval{} (the first of {} skipped), \
         one process per run; bytes.",
        if n == 1 { "" } else { "s" },
        n + 1
    );
    println!(
        "{:<9} {:>3} {:>7} {:>6} {:>5} | {:>9} {:>9} {:>6} {:>9} | {:>10} {:>10} | {:>14} | {:>11} {:>10} {:>7}",
        "workload",
        "Hz",
        "samples",
        "stacks",
        "depth",
        "OTLP gzip",
        "OTLP raw",
        "dict %",
        "gzip max",
        "pprof gzip",
        "pprof raw",
        format!("<= {TARGET_BYTES} B gzip"),
        "CPU ms/int.",
        "files only",
        "OTLP +"
    );
    let mut multi = false;
    for r in rows {
        let folded = &r.with_otlp.folded;
        let otlp = &r.with_otlp.otlp;
        let per_process = |bytes: usize, q: &Request| bytes as f64 / q.resources.max(1) as f64;
        multi |= otlp.iter().any(|q| q.resources != 1);
        let gz_max = otlp.iter().map(|q| per_process(q.sent, q)).fold(0.0, f64::max);
        let pprof_max = r.with_otlp.pprof.iter().map(|p| p.0).max().unwrap_or(0);
        let verdict = if interval != TARGET_INTERVAL {
            "n/a".to_owned()
        } else {
            let ok = |b: f64| if b <= TARGET_BYTES as f64 { "met" } else { "NOT met" };
            format!("{}/{}", ok(gz_max), ok(pprof_max as f64))
        };
        let raw = mean(otlp.iter().map(|q| q.raw as f64));
        let dict = mean(otlp.iter().map(|q| q.dictionary as f64));
        println!(
            "{:<9} {:>3} {:>7.0} {:>6.0} {:>5} | {:>9.0} {:>9.0} {:>6.1} {:>9.0} | {:>10.0} {:>10.0} | {:>14} | {:>11.1} \
             {:>10.1} {:>7.1}",
            r.workload,
            r.hz,
            mean(folded.iter().map(|f| f.samples as f64)),
            mean(folded.iter().map(|f| f.stacks as f64)),
            folded.iter().map(|f| f.depth).max().unwrap_or(0),
            mean(otlp.iter().map(|q| per_process(q.sent, q))),
            mean(otlp.iter().map(|q| per_process(q.raw, q))),
            if raw > 0.0 { dict / raw * 100.0 } else { 0.0 },
            gz_max,
            mean(r.with_otlp.pprof.iter().map(|p| p.0 as f64)),
            mean(r.with_otlp.pprof.iter().map(|p| p.1 as f64)),
            verdict,
            r.with_otlp.cpu_ms,
            r.files_only.cpu_ms,
            r.with_otlp.cpu_ms - r.files_only.cpu_ms,
        );
    }
    println!(
        "Target: at most 4 KB ({TARGET_BYTES} bytes) gzip per process per {TARGET_INTERVAL} s profile for a typical \
         service; the column gives OTLP/pprof for the largest interval{}.",
        if interval == TARGET_INTERVAL { "" } else { " (n/a: rerun with --interval 10)" }
    );
    println!(
        "samples, stacks (unique folded stacks), depth (deepest stack, frames): from the cpu-*.folded files. \
         OTLP gzip/raw: request bodies as received (Content-Encoding: gzip) and gunzipped; dict %: share of the \
         raw request that is its shared dictionary. pprof: the cpu-*.pb.gz files and their gunzipped size."
    );
    let startup = rows.iter().flat_map(|r| [r.with_otlp.startup_ms, r.files_only.startup_ms]);
    let (lo, hi) = startup.fold((f64::MAX, 0.0f64), |(lo, hi), s| (lo.min(s), hi.max(s)));
    println!(
        "CPU ms/int.: the daemon's user+sys CPU from start until just before SIGTERM (/proc/PID/stat, \
         {:.0} ms ticks), divided by the {} intervals run, with OTLP + files; files only: the same daemon with \
         just -o, run right after. This includes start-up ({lo:.0}-{hi:.0} ms of CPU before it was ready), \
         sampling and symbolization, not just export; OTLP +: the difference, i.e. roughly what the OTLP \
         exporter adds (encode, gzip, send), within the tick resolution and run-to-run noise.",
        // SAFETY: sysconf has no preconditions.
        1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64,
        n + 1
    );
    if multi {
        println!("Note: some OTLP requests held more than one process; their sizes were divided by the count.");
    }
    if rows.iter().any(|r| r.with_otlp.otlp.iter().any(|q| !q.gzip)) {
        println!("Note: some OTLP requests were not gzip-encoded; for them gzip = raw.");
    }
}
