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
/// on the official Python packages (tests/receivers/requirements.txt).
/// Installs them when they are missing; a no-op afterwards.
fn python_receivers() -> Result<()> {
    let root = build::workspace_root();
    let check = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, opentelemetry.proto.collector.profiles.v1development"])
        .stderr(std::process::Stdio::null())
        .status()
        .context("python3 is needed by the exporter tests; install it (Debian: apt-get install python3 python3-pip)")?;
    if check.success() {
        return Ok(());
    }
    step("test: installing the Python receivers' packages (tests/receivers/requirements.txt)");
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(root.join("tests/receivers/requirements.txt"))
        .status()
        .context("running pip failed")?;
    if !status.success() {
        bail!(
            "pip could not install tests/receivers/requirements.txt; \
             install them by hand with `python3 -m pip install -r tests/receivers/requirements.txt`"
        );
    }
    Ok(())
}
