//! `cargo xtask bench churn`: the daemon's memory while processes start and
//! exit at a high rate.
//!
//! The daemon runs with `--off-cpu`, exporting to files every 10 s. Its RSS
//! is read every second: idle first, then while a driver starts processes
//! at `--rate` per second for `--duration` seconds (a rotation of real
//! programs: a shell, coreutils, and a small C program that burns 1 ms, so
//! the mappings and stacks vary like a build's or a CGI service's). The
//! report gives idle RSS, peak RSS, the trend over the second half (least
//! squares, MB per minute), and where the memory is (anonymous vs file
//! pages, the process table's gauges).

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use super::{
    measure::{install_signal_handlers, interrupted},
    workload, TmpDir,
};
use crate::{build, is_root, step};

const CHURN_C: &str = include_str!("churn/churn.c");
const BURN_C: &str = include_str!("churn/burn.c");

/// Targets (issue 10, section 4).
const TARGET_PEAK_MB: f64 = 64.0;
const TARGET_IDLE_MB: f64 = 40.0;
/// "No growth trend": the second half's slope, in MB per minute.
const TARGET_SLOPE_MB_MIN: f64 = 0.2;
const IDLE_SECS: u64 = 20;

pub fn run(duration: u64, rate: u32, agent: Option<PathBuf>) -> Result<()> {
    ensure!(duration >= 10, "--duration must be at least 10 seconds");
    ensure!(rate > 0, "--rate must be at least 1 process a second");
    if !is_root() {
        bail!("the churn bench runs the daemon, which needs root; run `sudo -E cargo xtask bench churn`");
    }
    let agent = match agent {
        Some(a) => a,
        None => build::run(true)?,
    };
    let tmp = TmpDir::new()?;
    let cc = ("CC", "gcc");
    let churn = workload::build(&tmp.0, "churn", "c", CHURN_C, cc, &["-O2"])?;
    let burn = workload::build(&tmp.0, "burn1ms", "c", BURN_C, cc, &["-O2"])?;
    install_signal_handlers();

    step(format!("bench: starting {} run --off-cpu", agent.display()));
    let log = tmp.0.join("daemon.log");
    let out = tmp.0.join("out");
    let mut daemon = Daemon::start(&agent, &out, &log)?;
    let port = daemon.wait_ready(&log)?;

    step(format!("bench: idle for {IDLE_SECS} s"));
    let idle = daemon.watch(Duration::from_secs(IDLE_SECS), None)?;
    let idle_mb = idle.last().map_or(0.0, |s| s.1);

    step(format!("bench: {rate} processes/s for {duration} s"));
    let cpu_before = cpu_seconds(daemon.pid()).unwrap_or(0.0);
    let churn_start = Instant::now();
    let driver = Command::new(&churn)
        .args([rate.to_string(), duration.to_string()])
        .arg(&burn)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the churn driver")?;
    let mut driver = Driver(Some(driver));
    let samples = daemon.watch(Duration::from_secs(duration + 5), Some(&mut driver))?;
    let achieved = driver.finish()?;
    let cpu = cpu_seconds(daemon.pid()).unwrap_or(0.0) - cpu_before;
    let churn_secs = churn_start.elapsed().as_secs_f64();
    let metrics = http_get(port, "/metrics").unwrap_or_default();
    let rollup = fs::read_to_string(format!("/proc/{}/smaps_rollup", daemon.pid())).unwrap_or_default();
    daemon.stop();

    let peak = samples.iter().map(|s| s.1).fold(idle_mb, f64::max);
    let half: Vec<(f64, f64)> = samples.iter().skip(samples.len() / 2).copied().collect();
    let slope = slope_per_minute(&half);
    println!();
    println!("Daemon memory under process churn ({rate}/s asked, --off-cpu, {duration} s):");
    println!("  driver: {}", achieved.trim());
    println!(
        "  idle RSS {idle_mb:.1} MB, peak RSS {peak:.1} MB, RSS at end {:.1} MB",
        samples.last().map_or(0.0, |s| s.1)
    );
    println!("  second half: {slope:+.2} MB/min (least squares over {} s)", half.len());
    let spawned = spawned_count(&achieved);
    println!(
        "  daemon CPU (utime + stime, /proc/PID/stat): {:.1} % of a core over {churn_secs:.0} s{}",
        100.0 * cpu / churn_secs,
        spawned.map_or(String::new(), |n| format!(", {:.1} us per process spawned", 1e6 * cpu / n as f64))
    );
    for key in ["Rss:", "Anonymous:", "Private_Dirty:", "Shared_Clean:"] {
        if let Some(l) = rollup.lines().find(|l| l.starts_with(key)) {
            println!("  at end, {}", l.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    for name in [
        "profiler_processes ",
        "profiler_processes_exited ",
        "profiler_processes_evicted_total ",
        "profiler_unwind_processes ",
        "profiler_unwind_tables ",
        "profiler_symbol_cache_entries ",
        "profiler_symbol_cache_evictions_total ",
        "profiler_symbol_files_evicted_total ",
        "profiler_process_events_total{kind=\"exec\"}",
        "profiler_process_events_total{kind=\"lost\"}",
    ] {
        if let Some(l) = metrics.lines().find(|l| l.starts_with(name)) {
            println!("  {l}");
        }
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("Target: peak RSS <= {TARGET_PEAK_MB} MB: {peak:.1} MB ({})", verdict(peak <= TARGET_PEAK_MB));
    println!("Target: idle RSS <= {TARGET_IDLE_MB} MB: {idle_mb:.1} MB ({})", verdict(idle_mb <= TARGET_IDLE_MB));
    println!(
        "Target: no growth trend (second half <= {TARGET_SLOPE_MB_MIN} MB/min): {slope:+.2} MB/min ({})",
        verdict(slope <= TARGET_SLOPE_MB_MIN)
    );
    println!(
        "RSS per second (s, MB): {}",
        samples.iter().map(|(t, m)| format!("{t:.0}:{m:.1}")).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

/// Least-squares slope of (seconds, MB), in MB per minute.
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 60.0
    }
}

struct Daemon(Child);

impl Daemon {
    fn start(agent: &Path, out: &Path, log: &Path) -> Result<Daemon> {
        let file = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(agent)
            .args(["run", "--off-cpu", "--export-interval", "10s", "--http-listen", "127.0.0.1:0", "--output-dir"])
            .arg(out)
            .env("PROFILER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", agent.display()))?;
        Ok(Daemon(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits until `/readyz` answers 200 (programs attached); returns the port.
    fn wait_ready(&mut self, log: &Path) -> Result<u16> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.0.try_wait()? {
                bail!("the daemon exited ({status}):\n{}", fs::read_to_string(log).unwrap_or_default());
            }
            if let Some(port) = listening_port(self.pid()) {
                if http_get(port, "/readyz").is_some() {
                    return Ok(port);
                }
            }
            ensure!(Instant::now() < deadline && !interrupted(), "the daemon did not become ready within 120 s");
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// RSS (s since start, MB) every second for `span`, or until `driver`
    /// exits (then 5 s more).
    fn watch(&mut self, span: Duration, mut driver: Option<&mut Driver>) -> Result<Vec<(f64, f64)>> {
        let start = Instant::now();
        let mut out = Vec::new();
        let mut driver_done: Option<Instant> = None;
        while start.elapsed() < span && !interrupted() {
            thread::sleep(Duration::from_secs(1));
            if let Some(status) = self.0.try_wait()? {
                bail!("the daemon exited during the bench ({status})");
            }
            out.push((start.elapsed().as_secs_f64(), rss_mb(self.pid()).unwrap_or(0.0)));
            if let Some(d) = driver.as_deref_mut() {
                if driver_done.is_none() && d.exited()? {
                    driver_done = Some(Instant::now());
                }
            }
            if driver_done.is_some_and(|t| t.elapsed() >= Duration::from_secs(5)) {
                break;
            }
        }
        Ok(out)
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The churn driver, killed on drop.
struct Driver(Option<Child>);

impl Driver {
    fn exited(&mut self) -> Result<bool> {
        Ok(match &mut self.0 {
            Some(c) => c.try_wait()?.is_some(),
            None => true,
        })
    }

    /// Its report line ("spawned N processes in S s (R/s)").
    fn finish(&mut self) -> Result<String> {
        let Some(mut c) = self.0.take() else { return Ok(String::new()) };
        if c.try_wait()?.is_none() {
            let _ = c.kill();
        }
        let mut s = String::new();
        if let Some(mut out) = c.stdout.take() {
            let _ = out.read_to_string(&mut s);
        }
        let _ = c.wait();
        Ok(s)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// User plus system CPU seconds `pid` has used (fields 14 and 15 of
/// /proc/PID/stat, after the parenthesised command name).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

/// The process count from the driver's "spawned N processes ..." line.
fn spawned_count(line: &str) -> Option<u64> {
    line.split_whitespace().skip_while(|w| *w != "spawned").nth(1)?.parse().ok()
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// The TCP port `pid` listens on (the daemon binds port 0).
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect();
    let tcp = fs::read_to_string("/proc/net/tcp").ok()?;
    tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(3) != Some(&"0A") || !inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)) {
            return None;
        }
        u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()
    })
}

/// The body of a 200 answer to `GET path` on the loopback port.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.lines().next()?.contains(" 200 ").then(|| body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::{cpu_seconds, slope_per_minute, spawned_count};

    #[test]
    fn spawned_count_reads_the_driver_line() {
        assert_eq!(spawned_count("spawned 55068 processes in 60.0 s (918/s), 0 failed"), Some(55068));
        assert_eq!(spawned_count("nothing"), None);
    }

    #[test]
    fn own_cpu_seconds_are_read() {
        assert!(cpu_seconds(std::process::id()).is_some_and(|s| s >= 0.0));
    }

    #[test]
    fn slope_is_in_mb_per_minute() {
        let flat: Vec<(f64, f64)> = (0..30).map(|t| (t as f64, 40.0)).collect();
        assert_eq!(slope_per_minute(&flat), 0.0);
        let growing: Vec<(f64, f64)> = (0..30).map(|t| (t as f64, 40.0 + t as f64 / 60.0)).collect();
        assert!((slope_per_minute(&growing) - 1.0).abs() < 1e-9);
        assert_eq!(slope_per_minute(&[(1.0, 2.0)]), 0.0);
    }
}
