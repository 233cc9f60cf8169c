//! The Debian package and its systemd unit: `cargo xtask package deb` builds
//! the .deb from the agent under test; the tests list and extract it, verify
//! and score the unit with systemd-analyze, and run the extracted binary the
//! way the unit would (a non-root user with exactly the unit's ambient
//! capabilities, no_new_privs), then drop each capability in turn. The
//! maintainer scripts run as dpkg would run them, in a scratch system
//! (package/scripts.rs).

use std::{path::PathBuf, process::Command, sync::OnceLock, time::Duration};

use profiler_integration_tests::{
    agent::run_command,
    parse_folded,
    privilege::{as_nobody_with_caps, shared_tempdir, unit_capabilities},
    require_root, workspace_dir, AgentRun, Folded, Workload,
};

#[path = "package/scripts.rs"]
mod scripts;

/// The unit's `systemd-analyze security` exposure, as reached with the
/// hardening in packaging/systemd/profiler-agent.service. What keeps it
/// there is what eBPF profiling needs: network access for exporters,
/// CAP_SYS_PTRACE/CAP_BPF/CAP_SYSLOG/CAP_DAC_READ_SEARCH, and the whole /proc.
const MAX_EXPOSURE: f64 = 2.6;
const UNIT: &str = "usr/lib/systemd/system/profiler-agent.service";
const TIMEOUT: Duration = Duration::from_secs(120);

/// The package, built once per test binary, and its extracted tree.
struct Package {
    deb: PathBuf,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

fn package() -> &'static Package {
    static PACKAGE: OnceLock<Package> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        require_root();
        // 0755, so the extracted binary is reachable by the unprivileged user.
        let dir = shared_tempdir("profiler-deb-");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_dir())
            .args(["run", "--quiet", "--package", "xtask", "--", "package", "deb", "--binary"])
            .arg(profiler_integration_tests::agent_bin())
            .arg("--out-dir")
            .arg(dir.path().join("out"));
        let run = run_command(cmd, Duration::from_secs(600));
        assert!(run.status.success(), "cargo xtask package deb failed\n{}", run.context());
        let deb = PathBuf::from(run.stdout.trim());
        assert!(
            deb.is_file() && deb.starts_with(dir.path()),
            "xtask printed {:?}, not the .deb\n{}",
            deb,
            run.context()
        );
        let root = dir.path().join("root");
        ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root), "dpkg-deb -x");
        Package { deb, root, _dir: dir }
    })
}

fn ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unit_text() -> String {
    std::fs::read_to_string(package().root.join(UNIT)).expect("the unit is in the package")
}

#[test]
fn deb_has_the_agent_unit_conffile_man_page_and_scripts() {
    let p = package();
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&p.deb), "dpkg-deb -c");
    eprintln!("{}:\n{listing}", p.deb.display());
    for path in [
        "./usr/bin/profiler-agent",
        &format!("./{UNIT}"),
        "./etc/profiler-agent/config.toml",
        "./etc/default/profiler-agent",
        "./usr/share/man/man8/profiler-agent.8.gz",
        "./usr/lib/sysusers.d/profiler-agent.conf",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "{path} missing from the package:\n{listing}");
    }
    let field = |f: &str| ok(Command::new("dpkg-deb").args(["-f"]).arg(&p.deb).arg(f), "dpkg-deb -f").trim().to_owned();
    assert_eq!(field("Package"), "profiler-agent");
    assert!(field("Depends").starts_with("libc6 (>= 2."), "{}", field("Depends"));
    let info = ok(Command::new("dpkg-deb").arg("-I").arg(&p.deb), "dpkg-deb -I");
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(info.contains(script), "control member {script} missing:\n{info}");
    }
    let control = p.root.parent().unwrap().join("control");
    ok(Command::new("dpkg-deb").arg("-e").arg(&p.deb).arg(&control), "dpkg-deb -e");
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(conffiles.lines().any(|l| l == "/etc/profiler-agent/config.toml"), "{conffiles}");
    for script in ["postinst", "prerm", "postrm"] {
        ok(Command::new("sh").arg("-n").arg(control.join(script)), &format!("sh -n {script}"));
        let text = std::fs::read_to_string(control.join(script)).unwrap();
        // systemctl only when systemd runs: a chroot or image build has no /run/systemd/system.
        for line in text.lines().filter(|l| l.contains("systemctl ") && !l.trim_start().starts_with('#')) {
            assert!(line.contains("|| true"), "{script}: an unguarded systemctl can fail the install: {line}");
        }
        if text.contains("systemctl ") {
            assert!(
                text.contains("[ -d /run/systemd/system ]"),
                "{script} calls systemctl without checking for systemd"
            );
        }
    }

    // The conffile is all comments: the installed agent runs on defaults,
    // and the agent accepts it.
    let config = p.root.join("etc/profiler-agent/config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')), "{text}");
    assert!(text.contains("# [export.otlp]") && text.contains("# frequency = 19"), "{text}");
    let agent = p.root.join("usr/bin/profiler-agent");
    let mut cmd = Command::new(&agent);
    cmd.args(["check", "--output", "json", "--http-listen", "127.0.0.1:0", "--config"]).arg(&config);
    let run = run_command(cmd, TIMEOUT);
    let report: serde_json::Value =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}\n{}", run.context()));
    let finding = report["findings"].as_array().unwrap().iter().find(|f| f["check"] == "config").cloned();
    assert_eq!(finding.as_ref().map(|f| f["status"].clone()), Some("ok".into()), "{}", run.context());

    // The man page carries every subcommand's help.
    let page = ok(Command::new("gzip").arg("-dc").arg(p.root.join("usr/share/man/man8/profiler-agent.8.gz")), "gunzip");
    assert!(page.starts_with(".TH PROFILER-AGENT 8"), "{}", &page[..page.len().min(200)]);
    for section in ["PROFILER-AGENT CHECK", "PROFILER-AGENT RECORD", "PROFILER-AGENT RUN", "--off-cpu", "--output"] {
        assert!(page.contains(section), "man page lacks {section}");
    }
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let p = package();
    // The unit as shipped, but with ExecStart= naming the extracted binary
    // (verify checks it is executable); the rest is byte for byte the same.
    let text = unit_text();
    let agent = p.root.join("usr/bin/profiler-agent");
    let copy = p.root.parent().unwrap().join("profiler-agent.service");
    let rewritten = text.replace("ExecStart=/usr/bin/profiler-agent ", &format!("ExecStart={} ", agent.display()));
    assert_ne!(rewritten, text, "ExecStart= does not run /usr/bin/profiler-agent");
    std::fs::write(&copy, rewritten).unwrap();
    // --man=no: the man page is checked from the package itself, above.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian: systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {}\n{stderr}", out.status);
    for directive in [
        "User=profiler-agent",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "StateDirectory=profiler-agent",
        "SystemCallArchitectures=native",
        "Restart=on-failure",
        "EnvironmentFile=-/etc/default/profiler-agent",
        "--config /etc/profiler-agent/config.toml",
    ] {
        assert!(text.contains(directive), "the unit lacks {directive}");
    }
    let filter: Vec<&str> = text.lines().filter(|l| l.starts_with("SystemCallFilter=")).collect();
    assert!(filter.first().is_some_and(|f| f.contains("bpf") && f.contains("perf_event_open")), "{filter:?}");
    let caps = unit_capabilities(&text);
    let bounding: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect();
    assert_eq!(caps, bounding, "ambient and bounding sets differ");
}

#[test]
fn unit_security_exposure_stays_low() {
    let p = package();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(p.root.join(UNIT))
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let exposure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in {line:?}"));
    eprintln!("systemd-analyze security --offline=true: exposure {exposure} (limit {MAX_EXPOSURE})");
    for l in text.lines().filter(|l| l.starts_with('✗')) {
        eprintln!("  {}", l.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    assert!(exposure <= MAX_EXPOSURE, "exposure {exposure} is above {MAX_EXPOSURE}:\n{text}");
}

/// Busy in `busy_middle -> spin_leaf`, blocked in `sleepy_middle ->
/// block_leaf -> usleep`, built without frame pointers, so stacks need CFI
/// tables (and thus the binary's file) to be complete.
const WORK_C: &str = r#"
#include <stdint.h>
#include <unistd.h>
__attribute__((noinline)) void spin_leaf(void) { volatile uint64_t a = 0; for (uint64_t i = 0; i < 3000000UL; i++) a += i; }
__attribute__((noinline)) void busy_middle(void) { spin_leaf(); }
__attribute__((noinline)) void block_leaf(void) { usleep(20000); }
__attribute__((noinline)) void sleepy_middle(void) { block_leaf(); }
int main(void) { for (;;) { for (int k = 0; k < 4; k++) busy_middle(); sleepy_middle(); } }
"#;
const WORK_FLAGS: &[&str] = &["-O2", "-fomit-frame-pointer", "-fno-optimize-sibling-calls", "-fno-inline"];

struct Recorded {
    run: AgentRun,
    cpu: Folded,
    off_cpu: Folded,
}

/// Records `work` for 2 s as nobody with exactly `caps`; the workload runs
/// as root from a 0700 temporary directory.
fn record_as_unit(caps: &[&str], work: &Workload) -> Recorded {
    let out = shared_tempdir("profiler-deb-out-");
    let mut cmd = as_nobody_with_caps(caps, &package().root.join("usr/bin/profiler-agent"));
    cmd.args(["record", "-d", "2", "--off-cpu", "--pid"]).arg(work.pid_arg()).arg("-o").arg(out.path().join("p"));
    let run = run_command(cmd, TIMEOUT);
    let read = |name: &str| {
        std::fs::read_to_string(out.path().join("p").join(name)).map(|t| parse_folded(&t)).unwrap_or_default()
    };
    Recorded { cpu: read("cpu.folded"), off_cpu: read("off-cpu.folded"), run }
}

fn start_work() -> Workload {
    let mut work = Workload::c("pkgwork", WORK_C, WORK_FLAGS);
    work.warm_up();
    // A directory only root may search, like /root or a 0700 home: reading
    // the binary then takes CAP_DAC_READ_SEARCH.
    use std::os::unix::fs::PermissionsExt;
    let dir = work.bin().parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    work
}

fn complete_busy(f: &Folded) -> u64 {
    f.stacks.iter().filter(|s| s.has_subsequence(&["main", "busy_middle", "spin_leaf"])).map(|s| s.count).sum()
}

fn named_kernel_frames(f: &Folded) -> bool {
    f.stacks
        .iter()
        .any(|s| s.functions().iter().any(|fr| fr.ends_with("_[k]") && !fr.starts_with("[kernel.kallsyms]+")))
}

#[test]
fn runs_as_the_unit_would_with_exactly_its_capabilities() {
    let caps = unit_capabilities(&unit_text());
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let work = start_work();
    let r = record_as_unit(&caps, &work);
    assert!(r.run.status.success(), "{}", r.run.context());
    assert!(!r.run.stderr.contains("without CAP_"), "a warning with the full set:\n{}", r.run.context());
    let total = r.cpu.total();
    let busy = complete_busy(&r.cpu);
    eprintln!("as nobody with {caps:?}: {busy} of {total} on-CPU samples in main;busy_middle;spin_leaf");
    assert!(total >= 20 && busy * 10 >= total * 7, "on-CPU stacks:\n{}\n{}", dump(&r.cpu), r.run.context());
    let blocked: u64 = r
        .off_cpu
        .stacks
        .iter()
        .filter(|s| s.has_subsequence(&["main", "sleepy_middle", "block_leaf"]))
        .map(|s| s.count)
        .sum();
    let all_blocked = r.off_cpu.total();
    // About 20 ms blocked per ~100 ms loop: most of 2 s of off-CPU time is there.
    assert!(
        blocked as f64 >= 0.2e9 && blocked * 10 >= all_blocked * 8,
        "off-CPU ns in main;sleepy_middle;block_leaf: {blocked} of {all_blocked}\n{}",
        dump(&r.off_cpu)
    );
    assert!(named_kernel_frames(&r.off_cpu), "kernel frames unnamed:\n{}", dump(&r.off_cpu));
}

/// Whether /proc/kallsyms hides addresses from a reader without CAP_SYSLOG.
fn kallsyms_needs_syslog() -> bool {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|v| v.trim().parse::<i64>().ok()).unwrap_or(2);
    let (kptr, paranoid) = (read("/proc/sys/kernel/kptr_restrict"), read("/proc/sys/kernel/perf_event_paranoid"));
    kptr >= 1 || paranoid > 1
}

#[test]
fn each_unit_capability_is_needed() {
    let caps = unit_capabilities(&unit_text());
    let work = start_work();
    for dropped in &caps {
        let kept: Vec<&str> = caps.iter().filter(|c| *c != dropped).map(String::as_str).collect();
        let r = record_as_unit(&kept, &work);
        let what = format!("without {dropped}");
        eprintln!("{what}: exit {}, {} on-CPU samples", r.run.status, r.cpu.total());
        match dropped.as_str() {
            "CAP_BPF" | "CAP_PERFMON" => {
                assert!(!r.run.status.success(), "{what}: the agent ran\n{}", r.run.context());
                assert!(
                    r.run.stderr.contains(dropped) && r.run.stderr.contains("missing"),
                    "{what}:\n{}",
                    r.run.context()
                );
            }
            "CAP_SYS_PTRACE" => {
                assert!(r.run.status.success(), "{what}\n{}", r.run.context());
                assert!(r.run.stderr.contains("without CAP_SYS_PTRACE"), "{what}: no warning\n{}", r.run.context());
                assert!(r.cpu.total() > 0 && complete_busy(&r.cpu) == 0, "{what}: stacks complete\n{}", dump(&r.cpu));
            }
            "CAP_DAC_READ_SEARCH" => {
                assert!(r.run.status.success(), "{what}\n{}", r.run.context());
                assert!(
                    r.run.stderr.contains("without CAP_DAC_READ_SEARCH"),
                    "{what}: no warning\n{}",
                    r.run.context()
                );
                let named = r.cpu.stacks.iter().any(|s| s.functions().iter().any(|f| f == "spin_leaf"));
                assert!(r.cpu.total() > 0 && !named, "{what}: the 0700 binary was read\n{}", dump(&r.cpu));
            }
            "CAP_SYSLOG" if kallsyms_needs_syslog() => {
                assert!(r.run.status.success(), "{what}\n{}", r.run.context());
                assert!(r.run.stderr.contains("grant CAP_SYSLOG"), "{what}: no warning\n{}", r.run.context());
                assert!(complete_busy(&r.cpu) > 0, "{what}: user stacks broke\n{}", dump(&r.cpu));
                assert!(!named_kernel_frames(&r.off_cpu), "{what}: kernel frames named\n{}", dump(&r.off_cpu));
            }
            "CAP_SYSLOG" => {
                // kptr_restrict=0 and perf_event_paranoid<=1: kallsyms is open to all.
                assert!(named_kernel_frames(&r.off_cpu), "{what}: kernel frames unnamed\n{}", dump(&r.off_cpu));
            }
            other => panic!("the unit grants {other}, which this test does not know: add what breaks without it"),
        }
    }
}

/// Every system call the agent makes while recording (traced with strace)
/// is allowed by the unit's SystemCallFilter= lines, as systemd expands them.
#[test]
fn unit_syscall_filter_allows_every_call_the_agent_makes() {
    let text = unit_text();
    let (mut allowed, mut denied) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for line in text.lines().filter_map(|l| l.strip_prefix("SystemCallFilter=")) {
        let (deny, list) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        for item in list.split_whitespace() {
            let calls = expand_syscall_group(item);
            if deny {
                denied.extend(calls)
            } else {
                allowed.extend(calls)
            }
        }
    }
    let effective: std::collections::BTreeSet<String> = allowed.difference(&denied).cloned().collect();
    assert!(
        effective.contains("bpf") && effective.contains("perf_event_open"),
        "the filter drops bpf or perf_event_open"
    );

    let caps = unit_capabilities(&text);
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let work = start_work();
    let dir = shared_tempdir("profiler-deb-strace-");
    // The daemon as the unit runs it, exporting to files and to an OTLP
    // endpoint that refuses connections (so connect runs); then record.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let files = dir.path().join("files");
    let daemon: Vec<std::ffi::OsString> =
        ["run", "--off-cpu", "--export-interval", "1s", "--http-listen", "127.0.0.1:0"]
            .iter()
            .map(Into::into)
            .chain(["--otlp-endpoint".into(), format!("http://{closed}").into(), "-o".into(), files.clone().into()])
            .collect();
    let record: Vec<std::ffi::OsString> = ["record", "-d", "2", "--off-cpu", "--pid", &work.pid_arg(), "-o"]
        .iter()
        .map(Into::into)
        .chain([dir.path().join("p").into_os_string()])
        .collect();
    let mut used = std::collections::BTreeSet::new();
    for (i, args) in [daemon, record].into_iter().enumerate() {
        let trace = dir.path().join(format!("trace{i}"));
        let inner = as_nobody_with_caps(&caps, &package().root.join("usr/bin/profiler-agent"));
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-o"]).arg(&trace).arg(inner.get_program()).args(inner.get_args()).args(&args);
        let status = if i == 0 {
            // Steady state once the first interval is written; then SIGTERM,
            // which exports the last interval and exits 0.
            let mut child = cmd.stdin(std::process::Stdio::null()).spawn().expect("strace");
            let start = std::time::Instant::now();
            while !std::fs::read_dir(&files)
                .is_ok_and(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".pb.gz")))
            {
                assert!(start.elapsed() < TIMEOUT, "the traced daemon wrote no profile");
                assert!(child.try_wait().unwrap().is_none(), "the traced daemon exited early");
                std::thread::sleep(Duration::from_millis(200));
            }
            let children =
                std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id())).unwrap();
            let agent: i32 = children.split_whitespace().next().and_then(|p| p.parse().ok()).expect("strace's child");
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(agent, libc::SIGTERM) };
            child.wait().unwrap()
        } else {
            let run = run_command(cmd, TIMEOUT);
            assert!(run.status.success(), "traced agent {args:?} failed\n{}", run.context());
            run.status
        };
        assert!(status.success(), "traced agent {args:?}: {status}");
        used.extend(agent_calls(&std::fs::read_to_string(&trace).unwrap()));
    }
    eprintln!("the agent made {} distinct system calls: {used:?}", used.len());
    for needed in ["bpf", "perf_event_open", "connect", "bind"] {
        assert!(used.contains(needed), "no {needed} in the trace: {used:?}");
    }
    let refused: Vec<&String> = used.iter().filter(|c| !effective.contains(*c)).collect();
    assert!(refused.is_empty(), "the unit's SystemCallFilter refuses calls the agent makes: {refused:?}");
}

/// The system calls in an `strace -f` trace made by the agent and its
/// threads: from the process that exec'd profiler-agent, and every task it
/// cloned (setpriv's and timeout's own calls do not count).
fn agent_calls(trace: &str) -> std::collections::BTreeSet<String> {
    let mut pids = std::collections::BTreeSet::new();
    let mut calls = std::collections::BTreeSet::new();
    for line in trace.lines() {
        let (pid, rest) = line.split_once(' ').unwrap_or(("", line));
        let rest = rest.trim_start();
        if rest.starts_with("execve(") && rest.contains("/usr/bin/profiler-agent\"") {
            pids.insert(pid.to_owned());
        }
        if !pids.contains(pid) {
            continue;
        }
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && rest[name.len()..].starts_with('(') {
            calls.insert(name);
        }
        // New threads: clone/clone3 return the child's id (possibly on a `resumed` line).
        if rest.contains("clone") {
            if let Some(child) = rest.rsplit("= ").next().and_then(|v| v.split_whitespace().next()) {
                if child.parse::<u32>().is_ok_and(|c| c > 0) {
                    pids.insert(child.to_owned());
                }
            }
        }
    }
    assert!(!pids.is_empty(), "no execve of the agent in the trace");
    calls
}

/// The system calls in a SystemCallFilter= item: a name, or a `@group` as
/// `systemd-analyze syscall-filter` lists it (groups nest).
fn expand_syscall_group(item: &str) -> Vec<String> {
    if !item.starts_with('@') {
        return vec![item.to_owned()];
    }
    let out = Command::new("systemd-analyze").args(["syscall-filter", item]).output().expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut calls = Vec::new();
    for word in text.lines().skip(1).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        calls.extend(expand_syscall_group(word));
    }
    calls
}

fn dump(f: &Folded) -> String {
    f.stacks.iter().map(|s| s.line()).collect::<Vec<_>>().join("\n")
}
