//! Runs one profiler process to completion and measures what it cost.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::step;

/// What one run cost.
#[derive(Default)]
pub struct Measured {
    pub wall: Duration,
    /// user + sys of the process, its threads and its reaped children.
    pub cpu: Duration,
    /// Peak resident set size.
    pub rss_kb: u64,
    /// Sum of `run_time_ns` / `run_cnt` over the process's BPF programs.
    pub bpf_ns: u64,
    pub bpf_runs: u64,
    /// How many BPF programs were seen (0 for perf, or if none were found).
    pub bpf_progs: usize,
}

/// One BPF program of the agent: our own fd (if we could open it) and the
/// highest counters read from the agent's fdinfo.
#[derive(Default)]
struct Prog {
    fd: Option<OwnedFd>,
    ns: u64,
    runs: u64,
}

/// Runs `cmd` to completion (stdout/stderr into `log`) and measures it; with
/// `bpf`, also the BPF programs it loads. Stops it (SIGINT, then SIGKILL) if it
/// runs 60 s past `duration` or the bench is interrupted.
pub fn measure(mut cmd: Command, name: &str, log: &Path, duration: u64, bpf: bool) -> Result<Measured> {
    let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("cannot start {name} ({cmd:?})"))?;
    let pid = child.id() as libc::pid_t;
    drop(child); // reaped below with wait4, which also returns its rusage
    let mut progs = BTreeMap::<u32, Prog>::new();
    let mut m = Measured::default();
    let deadline = start + Duration::from_secs(duration + 60);
    let mut stopping: Option<Instant> = None;
    let (status, rusage) = loop {
        if let Some(done) = try_reap(pid)? {
            break done;
        }
        if bpf {
            scan_progs(pid, &mut progs);
        }
        m.rss_kb = m.rss_kb.max(vm_hwm_kb(pid).unwrap_or(0));
        let now = Instant::now();
        match stopping {
            None if interrupted() || now > deadline => {
                // SAFETY: signalling our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGINT) };
                stopping = Some(now);
            }
            Some(t) if now > t + Duration::from_secs(10) => {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            _ => {}
        }
        thread::sleep(Duration::from_millis(100)); // wall time is measured to within this
    };
    m.wall = start.elapsed();
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    m.cpu = tv(rusage.ru_utime) + tv(rusage.ru_stime);
    m.rss_kb = m.rss_kb.max(rusage.ru_maxrss as u64);
    for prog in progs.values() {
        let own = prog.fd.as_ref().and_then(|fd| fdinfo_counters(&format!("/proc/self/fdinfo/{}", fd.as_raw_fd())));
        let (ns, runs) = own.unwrap_or_default();
        m.bpf_ns += ns.max(prog.ns);
        m.bpf_runs += runs.max(prog.runs);
    }
    m.bpf_progs = progs.len();

    ensure!(!interrupted(), "interrupted; {name} was stopped");
    if stopping.is_some() {
        bail!("{name} did not exit {duration} s + 60 s after it started; its output:\n{}", tail(log));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{name} failed (wait status {status:#x}); last lines of its output:\n{}", tail(log));
    }
    if bpf && !progs.is_empty() && m.bpf_runs == 0 {
        step("bench: warning: the BPF programs report 0 runs; were the kernel's BPF statistics turned off?");
    }
    if bpf && progs.is_empty() {
        step(format!("bench: warning: no BPF programs seen in /proc/{pid}/fdinfo; BPF figures are 0"));
    }
    Ok(m)
}

/// `Some((wait status, rusage))` once `pid` has exited, `None` while it runs.
fn try_reap(pid: libc::pid_t) -> Result<Option<(i32, libc::rusage)>> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals.
    let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    match r {
        0 => Ok(None),
        r if r == pid => Ok(Some((status, ru))),
        _ => {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            Err(err).context("wait4 on the measured process failed")
        }
    }
}

/// Finds the agent's BPF programs (prog and link fds both name a `prog_id`),
/// opens new ones by id, and keeps the highest counters seen.
fn scan_progs(pid: libc::pid_t, progs: &mut BTreeMap<u32, Prog>) {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return;
    };
    for entry in dir.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let is_prog = info.lines().any(|l| l.starts_with("prog_type:"));
        if !is_prog && !info.lines().any(|l| l.starts_with("link_type:")) {
            continue;
        }
        let Some(id) = field(&info, "prog_id:").and_then(|v| u32::try_from(v).ok()) else {
            continue;
        };
        let prog = progs.entry(id).or_insert_with(|| Prog { fd: prog_fd_by_id(id), ..Prog::default() });
        if is_prog {
            prog.ns = prog.ns.max(field(&info, "run_time_ns:").unwrap_or(0));
            prog.runs = prog.runs.max(field(&info, "run_cnt:").unwrap_or(0));
        }
    }
}

/// `BPF_PROG_GET_FD_BY_ID`: our own reference, so the program (and its
/// counters) outlives the agent until we close it.
fn prog_fd_by_id(id: u32) -> Option<OwnedFd> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // union bpf_attr { struct { __u32 prog_id, next_id, open_flags; } }
    let attr: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: attr is a valid, zero-padded bpf_attr of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, attr.as_ptr(), size_of_val(&attr)) };
    // SAFETY: on success the kernel returned a new fd that nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)`: run-time statistics stay on while
/// the returned fd is open.
pub fn bpf_enable_stats() -> Option<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; }, BPF_STATS_RUN_TIME = 0
    let attr: [u32; 2] = [0, 0];
    // SAFETY: attr is a valid, zero-padded bpf_attr of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), size_of_val(&attr)) };
    // SAFETY: on success the kernel returned a new fd that nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fdinfo_counters(path: &str) -> Option<(u64, u64)> {
    let info = fs::read_to_string(path).ok()?;
    Some((field(&info, "run_time_ns:")?, field(&info, "run_cnt:")?))
}

/// The number after `key` on the line starting with it.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok())
}

fn vm_hwm_kb(pid: libc::pid_t) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.split_whitespace().next()?.parse().ok()
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C / SIGTERM: stop the current run and clean up (load, bpf_stats_enabled)
/// instead of dying. Children get default handlers back when they exec.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
