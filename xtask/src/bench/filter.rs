//! `cargo xtask bench filter`: what a sample of a process outside the
//! target selection costs in the kernel, against a sample that is unwound.
//!
//! Method. One Debian `python3` per CPU runs a mixed service-like loop
//! (JSON encode and decode, regular expressions, sorting, string
//! formatting, a little recursion), so the stacks vary as a real service's
//! do. With the kernel's BPF statistics on, each round runs
//! `profiler-agent record -F 99`:
//! - "unwound": `--pid` of every load process: their samples are unwound
//!   (CFI) and streamed;
//! - "filtered": `--cgroup` of an empty cgroup: every load sample stops at
//!   the target filter (`profiler-ebpf/src/filter.rs`: a pid lookup, the
//!   cgroup-level mask, one ancestor lookup).
//!
//! Per filtered-out event: the filtered run's `on_cpu_sample` time per run
//! (nearly every run is a load sample; idle runs are fewer than 1 in 50
//! with the load on every CPU). Per unwound event: the unwound run's total
//! minus its idle and filtered runs at the filtered run's cost, divided by
//! the runs that took a stack. Ratios are taken within a round and the
//! median reported (the machine is shared and noisy).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};

use super::{
    unwind::agent::{dropped, sample_run_time},
    BpfStats, TmpDir,
};
use crate::{build, is_root, step};

const HZ: &str = "99";
/// Target: a filtered-out sample costs at most this fraction of an unwound one.
const TARGET_RATIO: f64 = 0.2;

const SERVICE_PY: &str = r#"
import json, re, random
WORD = re.compile(r"[a-z]+\d*")
def handle(n):
    doc = {"id": n, "items": [{"sku": f"s{i}", "qty": i % 7, "tags": ["a", "b"]} for i in range(40)]}
    text = json.dumps(doc)
    back = json.loads(text)
    words = WORD.findall(text)
    words.sort()
    return len(back["items"]) + len(words) + depth(12)
def depth(k):
    return 1 if k == 0 else 1 + depth(k - 1)
n = 0
while True:
    handle(n)
    n += 1
"#;

/// One python3 per CPU, killed on drop.
struct Service(Vec<Child>);

impl Service {
    fn start(n: usize) -> Result<Service> {
        let mut s = Service(Vec::new());
        for _ in 0..n {
            let child = Command::new("python3")
                .args(["-c", SERVICE_PY])
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start python3 for the load")?;
            s.0.push(child);
        }
        Ok(s)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An empty cgroup under the v2 hierarchy, removed on drop.
struct EmptyCgroup {
    dir: PathBuf,
    path: String,
}

impl EmptyCgroup {
    fn create() -> Result<EmptyCgroup> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let root = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                if right.split(' ').next()? != "cgroup2" {
                    return None;
                }
                Some(PathBuf::from(left.split(' ').nth(4)?))
            })
            .context("no cgroup2 hierarchy is mounted")?;
        let path = format!("/profiler-bench-filter-{}", std::process::id());
        let dir = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(EmptyCgroup { dir, path })
    }
}

impl Drop for EmptyCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

struct Round {
    filtered_ns: f64,
    unwound_ns: f64,
}

fn record(agent: &Path, out: &Path, duration: u64, selector: &[String]) -> Result<String> {
    let output = Command::new(agent)
        .args(["record", "--duration", &duration.to_string(), "-F", HZ, "--format", "folded", "--output-dir"])
        .arg(out)
        .args(selector)
        .stdin(Stdio::null())
        .output()
        .context("cannot run profiler-agent record")?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        bail!("profiler-agent record {selector:?} failed ({}):\n{log}", output.status);
    }
    Ok(log)
}

pub fn run(duration: u64, rounds: usize) -> Result<()> {
    ensure!(duration > 0 && rounds > 0, "--duration and --rounds must be at least 1");
    if !is_root() {
        bail!(
            "the filter bench loads BPF programs and turns on BPF statistics: run `sudo -E cargo xtask bench filter`"
        );
    }
    let agent = build::run(true)?;
    let ncpu = thread::available_parallelism().map_or(1, |n| n.get());
    let tmp = TmpDir::new()?;
    let _stats = BpfStats::enable()?;
    let cgroup = EmptyCgroup::create()?;
    step(format!("bench: starting {ncpu} python3 services"));
    let service = Service::start(ncpu)?;
    thread::sleep(Duration::from_secs(2));
    let pids: Vec<String> = service.0.iter().flat_map(|c| ["--pid".to_owned(), c.id().to_string()]).collect();
    let empty = vec!["--cgroup".to_owned(), cgroup.path.clone()];

    let mut results = Vec::new();
    for round in 1..=rounds {
        step(format!(
            "bench: round {round}/{rounds}: unwound (--pid), then filtered out (--cgroup of an empty cgroup)"
        ));
        let u_log = record(&agent, &tmp.0.join(format!("u{round}")), duration, &pids)?;
        let f_log = record(&agent, &tmp.0.join(format!("f{round}")), duration, &empty)?;
        let (u, f) = (sample_run_time(&u_log)?, sample_run_time(&f_log)?);
        let (ud, fd) = (dropped(&u_log)?, dropped(&f_log)?);
        let filtered_ns = f.ns_per_run as f64;
        let cheap = ud.idle + ud.filtered;
        let unwinds = u.runs.saturating_sub(cheap).max(1);
        let unwound_ns = (u.ns_per_run as f64 * u.runs as f64 - filtered_ns * cheap as f64) / unwinds as f64;
        println!(
            "round {round}: filtered out {filtered_ns:.0} ns/event ({} runs, {} filtered, {} idle); \
             unwound {unwound_ns:.0} ns/event ({unwinds} unwinds of {} runs)",
            f.runs, fd.filtered, fd.idle, u.runs
        );
        results.push(Round { filtered_ns, unwound_ns });
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let f = median(results.iter().map(|r| r.filtered_ns).collect());
    let u = median(results.iter().map(|r| r.unwound_ns).collect());
    let ratio = median(results.iter().map(|r| r.filtered_ns / r.unwound_ns.max(1.0)).collect());
    println!();
    println!("| event | BPF ns per event (median of {rounds}) |");
    println!("|---|---|");
    println!("| filtered out by the target filter | {f:.0} |");
    println!("| unwound (CFI) and streamed | {u:.0} |");
    let verdict = if ratio <= TARGET_RATIO { "met" } else { "NOT met" };
    println!("Filtered / unwound: {ratio:.3} (median of per-round ratios); target <= {TARGET_RATIO}: {verdict}");
    drop(service);
    Ok(())
}
