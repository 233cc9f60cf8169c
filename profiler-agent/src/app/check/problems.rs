//! Every problem `check` can report, with what to do about it. The
//! troubleshooting section of docs/operations.md is generated from this
//! table, so the two cannot disagree.

use super::report::Status;

/// A problem `check` can find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    KernelTooOld,
    NoBtf,
    MissingCapBpf,
    MissingCapPerfmon,
    MissingCapSysPtrace,
    MissingCapDacReadSearch,
    KallsymsHidden,
    MemlockTooLow,
    MapsRejected,
    ProgramRejected,
    PerfEventDenied,
    NoTracepoints,
    TpBtfUnavailable,
    NoCfiUnwinding,
    CgroupUnknown,
    ConfigInvalid,
    OutputDirNotWritable,
    HttpListenFailed,
    HttpListenInUse,
    ExporterUnreachable,
}

impl Problem {
    /// Every problem, in the order the docs list them.
    pub const ALL: [Problem; 20] = [
        Self::KernelTooOld,
        Self::NoBtf,
        Self::MissingCapBpf,
        Self::MissingCapPerfmon,
        Self::MissingCapSysPtrace,
        Self::MissingCapDacReadSearch,
        Self::KallsymsHidden,
        Self::MemlockTooLow,
        Self::MapsRejected,
        Self::ProgramRejected,
        Self::PerfEventDenied,
        Self::NoTracepoints,
        Self::TpBtfUnavailable,
        Self::NoCfiUnwinding,
        Self::CgroupUnknown,
        Self::ConfigInvalid,
        Self::OutputDirNotWritable,
        Self::HttpListenFailed,
        Self::HttpListenInUse,
        Self::ExporterUnreachable,
    ];

    /// Stable identifier, printed in `--output json` and used as the docs' anchor.
    pub fn id(self) -> &'static str {
        match self {
            Self::KernelTooOld => "kernel-too-old",
            Self::NoBtf => "no-btf",
            Self::MissingCapBpf => "missing-cap-bpf",
            Self::MissingCapPerfmon => "missing-cap-perfmon",
            Self::MissingCapSysPtrace => "missing-cap-sys-ptrace",
            Self::MissingCapDacReadSearch => "missing-cap-dac-read-search",
            Self::KallsymsHidden => "kallsyms-hidden",
            Self::MemlockTooLow => "memlock-too-low",
            Self::MapsRejected => "maps-rejected",
            Self::ProgramRejected => "program-rejected",
            Self::PerfEventDenied => "perf-event-denied",
            Self::NoTracepoints => "no-tracepoints",
            Self::TpBtfUnavailable => "tp-btf-unavailable",
            Self::NoCfiUnwinding => "no-cfi-unwinding",
            Self::CgroupUnknown => "cgroup-unknown",
            Self::ConfigInvalid => "config-invalid",
            Self::OutputDirNotWritable => "output-dir-not-writable",
            Self::HttpListenFailed => "http-listen-failed",
            Self::HttpListenInUse => "http-listen-in-use",
            Self::ExporterUnreachable => "exporter-unreachable",
        }
    }

    /// Fail when the agent cannot start (or would exit); warn when it runs degraded.
    pub fn status(self) -> Status {
        match self {
            Self::MissingCapSysPtrace
            | Self::MissingCapDacReadSearch
            | Self::KallsymsHidden
            | Self::TpBtfUnavailable
            | Self::CgroupUnknown
            | Self::HttpListenInUse
            | Self::ExporterUnreachable => Status::Warn,
            _ => Status::Fail,
        }
    }

    /// What the operator sees, in one sentence: the symptom in the agent.
    pub fn symptom(self) -> &'static str {
        match self {
            Self::KernelTooOld => "The kernel is older than 5.8: it has no BPF ring buffer, CAP_BPF or CAP_PERFMON.",
            Self::NoBtf => "/sys/kernel/btf/vmlinux is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF.",
            Self::MissingCapBpf => "The agent lacks CAP_BPF: it cannot create maps or load programs (EPERM).",
            Self::MissingCapPerfmon => {
                "The agent lacks CAP_PERFMON: it cannot open the cpu-clock perf events or attach tracing programs."
            }
            Self::MissingCapSysPtrace => {
                "The agent lacks CAP_SYS_PTRACE: other users' processes show as `[unknown]` frames, since their \
                 /proc/PID/maps and binaries cannot be read, and their stacks are unwound by frame pointer only."
            }
            Self::MissingCapDacReadSearch => {
                "The agent lacks CAP_DAC_READ_SEARCH: binaries below directories its user cannot search (/root, \
                 0700 home directories, private temp directories) cannot be opened, so their frames read \
                 `file+0xOFFSET` and their stacks are unwound by frame pointer only."
            }
            Self::KallsymsHidden => {
                "/proc/kallsyms shows every address as 0 to the agent: kernel frames are not named."
            }
            Self::MemlockTooLow => {
                "Before Linux 5.11 BPF memory counts against RLIMIT_MEMLOCK, and the limit is below what the maps need."
            }
            Self::MapsRejected => "The kernel refused to create the agent's maps.",
            Self::ProgramRejected => {
                "The kernel refused to load one of the agent's programs (the verifier or a missing program type)."
            }
            Self::PerfEventDenied => "perf_event_open of the software cpu-clock event failed.",
            Self::NoTracepoints => {
                "Neither tp_btf nor raw tracepoints attach: off-CPU profiling and exec tracking cannot work."
            }
            Self::TpBtfUnavailable => {
                "tp_btf programs do not attach; the agent falls back to raw tracepoints (slightly slower)."
            }
            Self::NoCfiUnwinding => {
                "bpf_loop or mmapable arrays are missing (before Linux 5.17): CFI unwinding, the default unwinder, \
                 cannot be attached, so the agent exits."
            }
            Self::CgroupUnknown => "/sys/fs/cgroup is neither cgroup v1 nor v2: container ids will be missing.",
            Self::ConfigInvalid => "The configuration file or the OTEL_* environment is invalid: the agent exits.",
            Self::OutputDirNotWritable => "The local profile directory cannot be created or written: the agent exits.",
            Self::HttpListenFailed => "The /metrics, /healthz and /readyz address cannot be bound: the agent exits.",
            Self::HttpListenInUse => "Something already listens on the HTTP address (maybe a running agent).",
            Self::ExporterUnreachable => {
                "An exporter's endpoint does not resolve or accept a TCP connection: data is buffered, then dropped."
            }
        }
    }

    /// What to do about it.
    pub fn remedy(self) -> &'static str {
        match self {
            Self::KernelTooOld => "upgrade to Linux 5.8 or later (5.17 or later for CFI unwinding)",
            Self::NoBtf => "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's is)",
            Self::MissingCapBpf | Self::MissingCapPerfmon => {
                "run as root, or keep the packaged unit's AmbientCapabilities= (CAP_BPF CAP_PERFMON CAP_SYS_PTRACE \
                 CAP_DAC_READ_SEARCH CAP_SYSLOG); in Kubernetes add them to securityContext.capabilities.add"
            }
            Self::MissingCapSysPtrace => "grant CAP_SYS_PTRACE, or profile only processes of the agent's own user",
            Self::MissingCapDacReadSearch => {
                "grant CAP_DAC_READ_SEARCH, or keep profiled binaries in world-searchable directories"
            }
            Self::KallsymsHidden => {
                "grant CAP_SYSLOG (needed when kernel.kptr_restrict=1, or =0 with kernel.perf_event_paranoid>1); \
                 with kptr_restrict=2 set it to 1: sysctl kernel.kptr_restrict=1"
            }
            Self::MemlockTooLow => {
                "set LimitMEMLOCK=infinity in the unit (or ulimit -l unlimited), or upgrade to 5.11+"
            }
            Self::MapsRejected | Self::ProgramRejected => {
                "run `profiler-agent check --log-level debug` and report the kernel's message with `uname -r`"
            }
            Self::PerfEventDenied => {
                "grant CAP_PERFMON; in a container, allow perf_event_open in the seccomp profile; on a VM without \
                 a PMU the software cpu-clock event still works"
            }
            Self::NoTracepoints => "allow bpf and perf_event_open in seccomp/AppArmor, or run without --off-cpu",
            Self::TpBtfUnavailable => "nothing needed; a kernel with complete BTF avoids the fallback",
            Self::NoCfiUnwinding => {
                "upgrade to Linux 5.17+, or set sampling.unwinder = \"frame-pointer\" (--unwinder frame-pointer)"
            }
            Self::CgroupUnknown => "mount cgroup2 at /sys/fs/cgroup (or cgroup v1 controllers below it)",
            Self::ConfigInvalid => "fix the key the message names; every key is in docs/operations.md",
            Self::OutputDirNotWritable => {
                "set export.files.dir (or --output-dir) to a directory the agent's user can write; the unit's \
                 StateDirectory= provides /var/lib/profiler-agent"
            }
            Self::HttpListenFailed => "choose another http.listen address (ports below 1024 need CAP_NET_BIND_SERVICE)",
            Self::HttpListenInUse => "stop the other listener, or choose another http.listen address (--http-listen)",
            Self::ExporterUnreachable => {
                "check the URL, DNS and firewalls between this host and the backend; `curl -v URL` shows the same"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_every_problem_is_listed() {
        let mut ids: Vec<&str> = Problem::ALL.iter().map(|p| p.id()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), Problem::ALL.len());
        for p in Problem::ALL {
            assert!(!p.symptom().is_empty() && !p.remedy().is_empty());
        }
    }
}
