//! `cargo xtask build`, and the helpers other commands use to run cargo and
//! find the agent binary.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _, Result};

use crate::{setup, step};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// A cargo command run from the workspace root, with the tools from `setup` on PATH.
pub fn cargo(tools: &setup::Tools) -> Result<Command> {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root());
    tools.apply(&mut cmd)?;
    Ok(cmd)
}

/// Runs `cmd` with inherited stdio; fails with `what` and a hint if it does not succeed.
pub fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("{what}: cannot start {shown}"))?;
    ensure!(st.success(), "{what} failed ({st}); the output above says why. Command: {shown}");
    Ok(())
}

/// The cargo target directory: `$CARGO_TARGET_DIR`, else what `cargo metadata` says.
pub fn target_dir() -> Result<PathBuf> {
    let root = workspace_root();
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return Ok(root.join(dir)); // join keeps an absolute path as it is
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(&root)
        .output()
        .context("cannot run `cargo metadata` to find the target directory")?;
    ensure!(
        out.status.success(),
        "`cargo metadata` failed; fix Cargo.toml or set CARGO_TARGET_DIR: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let json = String::from_utf8(out.stdout).context("`cargo metadata` printed non-UTF-8 output")?;
    json_string_field(&json, "target_directory")
        .map(PathBuf::from)
        .context("`cargo metadata` output has no target_directory; set CARGO_TARGET_DIR")
}

/// The value of the first `"key":"..."` string in `json` (enough for cargo metadata,
/// without a JSON dependency).
fn json_string_field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = json[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                c => value.push(c), // \" \\ \/
            },
            c => value.push(c),
        }
    }
}

/// Sets up, builds profiler-agent, and returns the path of the binary.
pub fn build_agent(tools: &setup::Tools, release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    step(format!("build: profiler-agent ({profile})"));
    let mut cmd = cargo(tools)?;
    cmd.args(["build", "-p", "profiler-agent"]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd, "building profiler-agent")?;
    let bin = target_dir()?.join(profile).join("profiler-agent");
    ensure!(bin.is_file(), "cargo built profiler-agent but {} does not exist", bin.display());
    Ok(bin)
}

/// `cargo xtask build [--release]`.
pub fn run(release: bool) -> Result<PathBuf> {
    let tools = setup::run()?;
    let bin = build_agent(&tools, release)?;
    step(format!("build: {}", bin.display()));
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::json_string_field;

    #[test]
    fn finds_escaped_target_dir() {
        let json = r#"{"packages":[],"target_directory":"/a/b \"c\"\\d\u00e9","version":1}"#;
        assert_eq!(json_string_field(json, "target_directory").as_deref(), Some("/a/b \"c\"\\d\u{e9}"));
        assert_eq!(json_string_field(json, "missing"), None);
    }
}
