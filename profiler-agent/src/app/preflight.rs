//! Checks run before anything is loaded or attached, so every usage error is
//! reported cleanly instead of as a failed syscall halfway through.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "profiler-agent needs root, or the capabilities CAP_BPF and CAP_PERFMON (missing: {missing}); \
         run it with sudo, or grant them (the packaged systemd unit does): \
         setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search,cap_syslog+ep <binary>; \
         `profiler-agent check` lists what this host lacks"
    )]
    Capabilities { missing: String },
    #[error(
        "this kernel has no BTF type information ({0} is missing); profiler-agent needs a kernel built \
         with CONFIG_DEBUG_INFO_BTF=y (Linux 5.8 or newer; most distribution kernels have it)"
    )]
    NoBtf(PathBuf),
    #[error("process {0} does not exist (no {1}); check the --pid value")]
    NoSuchProcess(u32, PathBuf),
    #[error("{tid} is a thread of process {tgid}; pass the process id: --pid {tgid}")]
    NotAProcess { tid: u32, tgid: u32 },
    #[error("cannot write to output directory {path}: {cause}; choose another with --output-dir")]
    OutputDir { path: PathBuf, cause: String },
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks the effective capabilities in `status` (the text of
/// `/proc/self/status`). CAP_SYS_ADMIN alone also suffices, as on kernels
/// before 5.8.
pub fn check_capabilities(status: &str) -> Result<(), PreflightError> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, n)| n)
        .collect();
    Err(PreflightError::Capabilities { missing: missing.join(", ") })
}

/// What the agent will do worse with the capabilities in `status` (the
/// text of `/proc/self/status`), given whether /proc/kallsyms shows
/// addresses: one sentence per missing capability, for warnings at start.
pub fn degraded_capabilities(status: &str, kallsyms_visible: bool) -> Vec<String> {
    use super::check::host::{effective_caps, holds, CAP_DAC_READ_SEARCH, CAP_SYSLOG, CAP_SYS_PTRACE};
    let caps = effective_caps(status);
    let mut out = Vec::new();
    if !holds(caps, CAP_SYS_PTRACE) {
        out.push(
            "without CAP_SYS_PTRACE, other users' processes cannot be inspected (/proc/PID/maps, /proc/PID/root): \
             their user stacks stop at the leaf and may be unnamed; grant CAP_SYS_PTRACE"
                .to_owned(),
        );
    }
    if !holds(caps, CAP_DAC_READ_SEARCH) {
        out.push(
            "without CAP_DAC_READ_SEARCH, binaries below directories this user cannot search (/root, 0700 home \
             directories) cannot be read: their frames are unnamed; grant CAP_DAC_READ_SEARCH"
                .to_owned(),
        );
    }
    if !kallsyms_visible {
        let syslog = if holds(caps, CAP_SYSLOG) {
            "kernel.kptr_restrict=2 hides them even with CAP_SYSLOG; set it to 1"
        } else {
            "grant CAP_SYSLOG"
        };
        out.push(format!("/proc/kallsyms shows no addresses to this user: kernel frames will be unnamed; {syslog}"));
    }
    out
}

/// Logs [`degraded_capabilities`] for this process as warnings.
pub fn warn_degraded(status: &str) {
    let visible = super::check::host::kallsyms_head()
        .map(|t| super::check::host::kallsyms_addresses_visible(&t))
        .unwrap_or(false);
    for warning in degraded_capabilities(status, visible) {
        log::warn!("{warning}");
    }
}

/// The kernel must expose BTF.
pub fn check_btf(path: &Path) -> Result<(), PreflightError> {
    if path.exists() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf(path.to_path_buf()))
    }
}

/// Every pid must be a live process (a thread group leader), because the
/// in-kernel filter matches thread group ids.
pub fn check_pids(proc_root: &Path, pids: &[u32]) -> Result<(), PreflightError> {
    for &pid in pids {
        let status_path = proc_root.join(pid.to_string()).join("status");
        let status = fs::read_to_string(&status_path)
            .map_err(|_| PreflightError::NoSuchProcess(pid, proc_root.join(pid.to_string())))?;
        let tgid = status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse::<u32>().ok());
        if let Some(tgid) = tgid.filter(|&t| t != pid) {
            return Err(PreflightError::NotAProcess { tid: pid, tgid });
        }
    }
    Ok(())
}

/// Creates the output directory and proves it writable with a probe file,
/// so a long recording never ends in a failed write.
pub fn prepare_output_dir(dir: &Path) -> Result<(), PreflightError> {
    let err = |cause: std::io::Error| PreflightError::OutputDir { path: dir.to_path_buf(), cause: cause.to_string() };
    fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(format!(".profiler-write-test-{}", std::process::id()));
    let result = fs::File::create(&probe).and_then(|mut f| f.write_all(b"ok"));
    let _ = fs::remove_file(&probe);
    result.map_err(err)
}

/// Context for a failed attach. The CFI unwinder's frame loop needs
/// `bpf_loop` (Linux 5.17); older kernels reject it in the verifier.
pub fn attach_failed_hint(cfi: bool) -> String {
    if cfi {
        "attaching the eBPF programs failed (CFI unwinding needs Linux 5.17 or later; \
         `--unwinder frame-pointer` does without)"
            .into()
    } else {
        "attaching the eBPF programs failed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(eff: u64) -> String {
        format!("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t{eff:016x}\n")
    }

    #[test]
    fn capabilities() {
        assert!(check_capabilities(&status(0x000001ffffffffff)).is_ok(), "root");
        assert!(check_capabilities(&status(1 << CAP_SYS_ADMIN)).is_ok());
        assert!(check_capabilities(&status((1 << CAP_BPF) | (1 << CAP_PERFMON))).is_ok());
        let e = check_capabilities(&status(1 << CAP_BPF)).unwrap_err();
        assert_eq!(e, PreflightError::Capabilities { missing: "CAP_PERFMON".into() });
        let msg = check_capabilities(&status(0)).unwrap_err().to_string();
        assert!(msg.contains("CAP_BPF") && msg.contains("CAP_PERFMON") && msg.contains("root"), "{msg}");
        assert!(check_capabilities("garbage").is_err());
    }

    #[test]
    fn degraded_capabilities_name_what_is_missing() {
        assert!(degraded_capabilities(&status(0x000001ffffffffff), true).is_empty(), "root");
        let bpf_only = status((1 << CAP_BPF) | (1 << CAP_PERFMON));
        let w = degraded_capabilities(&bpf_only, false).join("\n");
        assert!(w.contains("CAP_SYS_PTRACE") && w.contains("CAP_DAC_READ_SEARCH") && w.contains("CAP_SYSLOG"), "{w}");
        let w = degraded_capabilities(&status(0x000001ffffffffff), false).join("\n");
        assert!(w.contains("kptr_restrict"), "{w}");
    }

    #[test]
    fn pids() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("10")).unwrap();
        fs::write(dir.path().join("10/status"), "Name:\ta\nTgid:\t10\nPid:\t10\n").unwrap();
        fs::create_dir_all(dir.path().join("11")).unwrap();
        fs::write(dir.path().join("11/status"), "Name:\ta\nTgid:\t10\nPid:\t11\n").unwrap();
        assert!(check_pids(dir.path(), &[10]).is_ok());
        assert_eq!(check_pids(dir.path(), &[11]), Err(PreflightError::NotAProcess { tid: 11, tgid: 10 }));
        let msg = check_pids(dir.path(), &[10, 99]).unwrap_err().to_string();
        assert!(msg.contains("99"), "{msg}");
    }

    #[test]
    fn output_dir() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("a/b");
        assert!(prepare_output_dir(&ok).is_ok());
        assert_eq!(fs::read_dir(&ok).unwrap().count(), 0, "the probe file is removed");
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        let bad = file.join("sub");
        let msg = prepare_output_dir(&bad).unwrap_err().to_string();
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
    }

    #[test]
    fn btf() {
        assert!(check_btf(Path::new("/nonexistent/vmlinux")).unwrap_err().to_string().contains("BTF"));
    }
}
