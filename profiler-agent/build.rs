//! Builds the eBPF programs (`profiler-ebpf`) with the nightly toolchain and
//! `bpf-linker`, so the agent can embed the object. `cargo xtask setup`
//! installs both; `AYA_BUILD_SKIP=1` skips this step for `cargo check`/clippy.

use std::{env, path::PathBuf};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.parent().context("agent crate has no parent directory")?;
    let ebpf_dir = workspace.join("profiler-ebpf");
    let common_dir = workspace.join("profiler-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-env-changed=PATH");

    // Let a plain `cargo build` find the bpf-linker that `cargo xtask setup`
    // installed into its cache, so only the first build needs xtask.
    if let Some(tools) = xtask_tools_dir() {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![tools];
        dirs.extend(env::split_paths(&path));
        env::set_var("PATH", env::join_paths(dirs)?);
    }

    let root_dir = ebpf_dir.to_str().context("profiler-ebpf path is not UTF-8")?;
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // `cargo check`/clippy without the eBPF toolchain: embed an empty
        // object so `include_bytes_aligned!` compiles; the loader refuses it
        // with a message naming this variable.
        let out = PathBuf::from(env::var("OUT_DIR")?).join("profiler");
        if !out.exists() {
            std::fs::write(&out, b"")?;
        }
    }
    aya_build::build_ebpf(
        [Package { name: "profiler-ebpf", root_dir, ..Default::default() }],
        Toolchain::Nightly,
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install the nightly rust-src and bpf-linker they need")
}

/// Mirrors `xtask::setup::cache_dir()`: `$PROFILER_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/profiler-xtask`, else `~/.cache/profiler-xtask`.
fn xtask_tools_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=PROFILER_CACHE_DIR");
    let base = env::var_os("PROFILER_CACHE_DIR").map(PathBuf::from).or_else(|| {
        env::var_os("XDG_CACHE_HOME")
            .map(|x| PathBuf::from(x).join("profiler-xtask"))
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/profiler-xtask")))
    })?;
    let bin = base.join("tools/bin");
    bin.join("bpf-linker").exists().then_some(bin)
}
