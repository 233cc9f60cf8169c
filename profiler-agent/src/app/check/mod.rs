//! `profiler-agent check`: a preflight that tells an operator, in one
//! screen, whether this host can run the agent and what to do when it
//! cannot. It reads the kernel's facts, probes the BPF features by loading
//! tiny programs, and tries the configured destinations, each with a
//! timeout. Exit status 0 when the agent can run, 1 when it cannot.

pub(crate) mod host;
pub mod problems;
mod reach;
mod report;

use std::{path::Path, time::Duration};

use anyhow::bail;

use crate::{
    bpf::probe::{probe_features, Feature},
    cli::RunArgs,
    config::Config,
    options::Unwinder,
};
use host::{CAP_BPF, CAP_DAC_READ_SEARCH, CAP_PERFMON, CAP_SYSLOG, CAP_SYS_ADMIN, CAP_SYS_PTRACE};
use problems::Problem;
pub use report::{Finding, Report, Status};

/// Longest wait for one exporter's DNS lookup and TCP connect.
const MAX_CONNECT_WAIT: Duration = Duration::from_secs(5);
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Arguments of `check`: the same as `run`, so the check covers exactly the
/// configuration the daemon would use.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Report format: `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "text", value_name = "FORMAT")]
    pub output: OutputFormat,
}

/// How the report is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Runs every check, prints the report, and fails when the agent cannot run.
pub async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let report = gather(&args.run).await;
    match args.output {
        OutputFormat::Text => print!("{}", report.to_text()),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    if !report.ok {
        bail!("{} check(s) failed: this host cannot run profiler-agent as configured", report.count(Status::Fail));
    }
    Ok(())
}

/// Every check, in the order of the report.
pub async fn gather(args: &RunArgs) -> Report {
    let mut findings = Vec::new();
    let release = host::kernel_release();
    let version = host::parse_kernel_version(&release);
    findings.push(kernel_finding(&release, version));
    let btf_present = Path::new(BTF_PATH).exists();
    findings.push(if btf_present {
        let size = std::fs::metadata(BTF_PATH).map(|m| m.len()).unwrap_or(0);
        Finding::ok("kernel.btf", format!("{BTF_PATH} ({} KiB)", size / 1024))
    } else {
        Finding::problem("kernel.btf", Problem::NoBtf, format!("{BTF_PATH} does not exist"))
    });

    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = host::effective_caps(&status);
    let admin = host::holds(caps, CAP_SYS_ADMIN);
    for (cap, problem, why) in [
        (CAP_BPF, Problem::MissingCapBpf, "maps and programs"),
        (CAP_PERFMON, Problem::MissingCapPerfmon, "perf events and tracing programs"),
    ] {
        let check = format!("capability.{}", cap.name);
        findings.push(if host::holds(caps, cap) {
            Finding::ok(check, format!("held ({why})"))
        } else if admin {
            Finding::ok(check, "not held; CAP_SYS_ADMIN covers it")
        } else {
            Finding::problem(check, problem, format!("not held: needed for {why}"))
        });
    }
    findings.push(if host::holds(caps, CAP_SYS_PTRACE) {
        Finding::ok("capability.CAP_SYS_PTRACE", "held (other users' processes: mappings and binaries)")
    } else {
        Finding::problem(
            "capability.CAP_SYS_PTRACE",
            Problem::MissingCapSysPtrace,
            "not held: only processes of this user are symbolized",
        )
    });
    findings.push(if host::holds(caps, CAP_DAC_READ_SEARCH) {
        Finding::ok("capability.CAP_DAC_READ_SEARCH", "held (binaries in directories this user cannot search)")
    } else {
        Finding::problem(
            "capability.CAP_DAC_READ_SEARCH",
            Problem::MissingCapDacReadSearch,
            "not held: binaries below unsearchable directories are not symbolized",
        )
    });
    let kallsyms_visible = host::kallsyms_head().map(|t| host::kallsyms_addresses_visible(&t)).unwrap_or(false);
    let kptr_restrict = host::sysctl("/proc/sys/kernel/kptr_restrict");
    let paranoid = host::sysctl("/proc/sys/kernel/perf_event_paranoid");
    let show = |v: Option<i64>| v.map_or("unreadable".to_owned(), |v| v.to_string());
    findings.push(match (host::holds(caps, CAP_SYSLOG), kallsyms_visible) {
        (true, _) => Finding::ok("capability.CAP_SYSLOG", "held (kernel symbol addresses)"),
        (false, true) => Finding::ok("capability.CAP_SYSLOG", "not held; not needed: /proc/kallsyms shows addresses"),
        (false, false) => Finding::problem(
            "capability.CAP_SYSLOG",
            Problem::KallsymsHidden,
            "not held: needed here for kernel frame names",
        ),
    });
    findings.push(if kallsyms_visible {
        Finding::ok("kernel.kallsyms", "addresses visible: kernel frames are named")
    } else {
        Finding::problem(
            "kernel.kallsyms",
            Problem::KallsymsHidden,
            format!(
                "every address reads 0 (kptr_restrict={}, perf_event_paranoid={})",
                show(kptr_restrict),
                show(paranoid)
            ),
        )
    });
    findings.push(Finding::ok("kernel.perf_event_paranoid", format!("{} (CAP_PERFMON overrides it)", show(paranoid))));
    findings.push(Finding::ok("kernel.kptr_restrict", show(kptr_restrict)));
    findings.push(memlock_finding(version, host::memlock_limit()));
    let layout = host::cgroup_layout();
    findings.push(if layout == host::CgroupLayout::Unknown {
        Finding::problem("cgroup.layout", Problem::CgroupUnknown, layout.describe())
    } else {
        Finding::ok("cgroup.layout", layout.describe())
    });

    let config = crate::app::run::settings::resolve(args, |k| std::env::var(k).ok());
    let unwinder = config.as_ref().map_or(Unwinder::Cfi, |c| c.sampling.unwinder);
    let can_load = admin || (host::holds(caps, CAP_BPF) && host::holds(caps, CAP_PERFMON));
    if can_load {
        let btf = if btf_present { aya::Btf::from_sys_fs().ok() } else { None };
        findings.extend(probe_findings(&probe_features(btf.as_ref()), unwinder));
    } else {
        findings.push(Finding::skip("bpf", "not probed: loading programs needs CAP_BPF and CAP_PERFMON"));
    }

    match config {
        Ok(config) => findings.extend(destination_findings(&config, args).await),
        Err(e) => findings.push(Finding::problem("config", Problem::ConfigInvalid, e.to_string())),
    }
    Report::new(findings)
}

fn kernel_finding(release: &str, version: Option<(u32, u32)>) -> Finding {
    match version {
        Some(v) if v < (5, 8) => {
            Finding::problem("kernel.version", Problem::KernelTooOld, format!("Linux {release}: 5.8 or later needed"))
        }
        Some(_) => Finding::ok("kernel.version", format!("Linux {release} (5.8+ needed; 5.17+ for CFI unwinding)")),
        None => Finding::ok("kernel.version", format!("Linux {release:?}: version not recognized; the probes decide")),
    }
}

fn memlock_finding(version: Option<(u32, u32)>, limit: Option<u64>) -> Finding {
    let shown = limit.map_or("unlimited".to_owned(), |l| format!("{} KiB", l / 1024));
    match version {
        Some(v) if v < (5, 11) && limit.is_some_and(|l| l < 256 << 20) => Finding::problem(
            "limits.memlock",
            Problem::MemlockTooLow,
            format!("{shown}: before Linux 5.11 BPF maps count against it"),
        ),
        Some(v) if v < (5, 11) => Finding::ok("limits.memlock", shown),
        _ => Finding::ok("limits.memlock", format!("{shown} (not used for BPF memory since Linux 5.11)")),
    }
}

/// Turns probe outcomes into findings; CFI-only features only fail when
/// the configuration uses the CFI unwinder.
fn probe_findings(results: &[(Feature, Result<(), String>)], unwinder: Unwinder) -> Vec<Finding> {
    let ok = |f: Feature| results.iter().any(|(g, r)| *g == f && r.is_ok());
    let mut out = Vec::new();
    for (feature, result) in results {
        let check = format!("bpf.{}", feature.name());
        let Err(e) = result else {
            out.push(Finding::ok(check, feature_works(*feature)));
            continue;
        };
        out.push(match feature {
            Feature::Maps => Finding::problem(check, Problem::MapsRejected, e.clone()),
            Feature::PerfEventAttach => Finding::problem(check, Problem::PerfEventDenied, e.clone()),
            Feature::TpBtf if ok(Feature::RawTracepoint) => {
                Finding::problem(check, Problem::TpBtfUnavailable, e.clone())
            }
            Feature::TpBtf => Finding::problem(check, Problem::NoTracepoints, e.clone()),
            Feature::RawTracepoint if ok(Feature::TpBtf) => {
                Finding::ok(check, format!("rejected, but not needed while tp_btf works: {e}"))
            }
            Feature::RawTracepoint => Finding::problem(check, Problem::NoTracepoints, e.clone()),
            Feature::BpfLoop | Feature::MmapableArray | Feature::Sampler if unwinder == Unwinder::FramePointer => {
                Finding::ok(check, format!("rejected, but not needed with unwinder = frame-pointer: {e}"))
            }
            Feature::BpfLoop | Feature::MmapableArray => Finding::problem(check, Problem::NoCfiUnwinding, e.clone()),
            Feature::Sampler if !ok(Feature::BpfLoop) => Finding::problem(check, Problem::NoCfiUnwinding, e.clone()),
            Feature::PerfEventProgram | Feature::RingBuffer | Feature::Sampler => {
                Finding::problem(check, Problem::ProgramRejected, e.clone())
            }
        });
    }
    out
}

fn feature_works(feature: Feature) -> &'static str {
    match feature {
        Feature::Maps => "the agent's maps are created",
        Feature::PerfEventProgram => "perf_event programs load",
        Feature::PerfEventAttach => "the software cpu-clock event opens and the program attaches",
        Feature::TpBtf => "tp_btf programs load and attach (sched_switch)",
        Feature::RawTracepoint => "raw tracepoints load and attach (the tp_btf fallback)",
        Feature::RingBuffer => "ring buffer reserve/submit",
        Feature::BpfLoop => "bpf_loop (CFI unwinding)",
        Feature::MmapableArray => "mmapable arrays, written through mmap (CFI tables)",
        Feature::Sampler => "the on-CPU sampler with CFI unwinding passes the verifier",
    }
}

/// The exporters, the file directory and the HTTP address of `config`.
async fn destination_findings(config: &Config, args: &RunArgs) -> Vec<Finding> {
    let source = match &args.config {
        Some(p) => p.display().to_string(),
        None if Path::new(crate::config::DEFAULT_CONFIG_PATH).exists() => crate::config::DEFAULT_CONFIG_PATH.into(),
        None => "defaults (no config file)".into(),
    };
    let mut out = vec![Finding::ok("config", format!("{source}: valid"))];
    let network = [
        ("export.otlp", config.export.otlp.as_ref().map(|o| (o.endpoint.clone(), o.connect_timeout.0))),
        ("export.pyroscope", config.export.pyroscope.as_ref().map(|p| (p.url.clone(), p.connect_timeout.0))),
    ];
    for (check, target) in network {
        let Some((url, timeout)) = target else { continue };
        out.push(match reach::tcp_reachable(&url, timeout.min(MAX_CONNECT_WAIT)).await {
            Ok(detail) => Finding::ok(check, detail),
            Err(detail) => Finding::problem(check, Problem::ExporterUnreachable, detail),
        });
    }
    if let Some(files) = &config.export.files {
        out.push(match reach::dir_writable(&files.dir) {
            Ok(detail) => Finding::ok("export.files", detail),
            Err(detail) => Finding::problem("export.files", Problem::OutputDirNotWritable, detail),
        });
    }
    let listen = config.http.listen;
    out.push(match reach::try_bind(listen) {
        reach::Bind::Ok => Finding::ok("http.listen", format!("{listen} can be bound")),
        reach::Bind::InUse(e) => Finding::problem("http.listen", Problem::HttpListenInUse, format!("{listen}: {e}")),
        reach::Bind::Failed(e) => Finding::problem("http.listen", Problem::HttpListenFailed, format!("{listen}: {e}")),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_gate() {
        assert_eq!(kernel_finding("4.19.0", Some((4, 19))).status, Status::Fail);
        assert_eq!(kernel_finding("6.18.0", Some((6, 18))).status, Status::Ok);
        assert_eq!(memlock_finding(Some((5, 10)), Some(64 << 10)).status, Status::Fail);
        assert_eq!(memlock_finding(Some((5, 10)), None).status, Status::Ok);
        assert_eq!(memlock_finding(Some((6, 1)), Some(64 << 10)).status, Status::Ok);
    }

    #[test]
    fn probe_outcomes_map_to_problems() {
        let all_ok: Vec<_> = [
            Feature::Maps,
            Feature::PerfEventProgram,
            Feature::PerfEventAttach,
            Feature::TpBtf,
            Feature::RawTracepoint,
            Feature::RingBuffer,
            Feature::BpfLoop,
            Feature::MmapableArray,
            Feature::Sampler,
        ]
        .into_iter()
        .map(|f| (f, Ok(())))
        .collect();
        assert!(probe_findings(&all_ok, Unwinder::Cfi).iter().all(|f| f.status == Status::Ok));

        let mut no_loop = all_ok.clone();
        for (f, r) in &mut no_loop {
            if matches!(f, Feature::BpfLoop | Feature::Sampler) {
                *r = Err("unknown func bpf_loop#181".into());
            }
        }
        let cfi = probe_findings(&no_loop, Unwinder::Cfi);
        assert!(cfi.iter().any(|f| f.problem == Some("no-cfi-unwinding") && f.status == Status::Fail));
        assert!(probe_findings(&no_loop, Unwinder::FramePointer).iter().all(|f| f.status == Status::Ok));

        let mut no_btf_tp = all_ok.clone();
        no_btf_tp[3].1 = Err("ENOENT".into());
        let found = probe_findings(&no_btf_tp, Unwinder::Cfi);
        assert_eq!(found[3].status, Status::Warn, "raw tracepoints cover it");
        no_btf_tp[4].1 = Err("EPERM".into());
        let found = probe_findings(&no_btf_tp, Unwinder::Cfi);
        assert_eq!(found[3].status, Status::Fail);
    }
}
