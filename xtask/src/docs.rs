//! `cargo xtask docs`: regenerates docs/operations.md. The generator is a
//! unit test of profiler-agent (it needs the config types, the metrics
//! renderer and check's problem table); with PROFILER_UPDATE_DOCS set it
//! writes the file instead of comparing.

use anyhow::Result;

use crate::{build, setup, step};

pub fn run() -> Result<()> {
    let tools = setup::run()?;
    step("docs: regenerating docs/operations.md");
    let mut cmd = build::cargo(&tools)?;
    cmd.args(["test", "-p", "profiler-agent", "--lib", "--", "--exact", "docs::operations_md_is_up_to_date"])
        .env("PROFILER_UPDATE_DOCS", "1");
    build::run_cmd(&mut cmd, "generating docs/operations.md")?;
    step(format!("docs: wrote {}", build::workspace_root().join("docs/operations.md").display()));
    Ok(())
}
