//! `cargo xtask setup`: the nightly toolchain with rust-src, and a bpf-linker
//! linked against the libLLVM shipped inside that nightly (see
//! docs/ebpf-toolchain.md). Everything lands in a cache outside the clone, laid
//! out as `profiler-agent/build.rs` (`xtask_tools_dir()`) expects:
//!
//! ```text
//! <cache>/tools/bin/bpf-linker
//! <cache>/llvm-from-rustc/lib/libLLVM.so -> <nightly sysroot>/lib/libLLVM.so.*
//! ```

use std::{
    env,
    ffi::OsString,
    fs::{self, File},
    io::ErrorKind,
    os::{fd::AsRawFd, unix::fs::symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::step;

/// What `setup` produced, for the commands that build the agent.
pub struct Tools {
    /// Directory holding `bpf-linker`.
    pub bin_dir: PathBuf,
}

impl Tools {
    /// Environment for child cargo commands: `PATH` with the tools directory first.
    pub fn env(&self) -> Result<Vec<(OsString, OsString)>> {
        let old = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.bin_dir.clone()).chain(env::split_paths(&old));
        let path = env::join_paths(dirs).context("cannot build PATH: a directory name contains ':'")?;
        Ok(vec![("PATH".into(), path)])
    }

    /// Applies [`Tools::env`] to `cmd`.
    pub fn apply(&self, cmd: &mut Command) -> Result<()> {
        cmd.envs(self.env()?);
        Ok(())
    }
}

/// The cache: `$PROFILER_CACHE_DIR`, else `$XDG_CACHE_HOME/profiler-xtask`,
/// else `$HOME/.cache/profiler-xtask`. Keep in sync with profiler-agent/build.rs.
pub fn cache_dir() -> Result<PathBuf> {
    let nonempty = |k: &str| env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = nonempty("PROFILER_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = nonempty("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("profiler-xtask"));
    }
    let home = nonempty("HOME").context("cannot pick a cache directory: set PROFILER_CACHE_DIR (or HOME)")?;
    Ok(PathBuf::from(home).join(".cache/profiler-xtask"))
}

/// Makes sure nightly, rust-src and bpf-linker are there; installs what is missing.
pub fn run() -> Result<Tools> {
    let cache = cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| {
        format!("cannot create the cache directory {}; set PROFILER_CACHE_DIR to a writable directory", cache.display())
    })?;
    let _lock = lock(&cache)?;

    ensure_nightly()?;
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    let llvm_major = nightly_llvm_major()?;
    let tools = ensure_bpf_linker(&cache, &sysroot, &llvm_major)?;
    Ok(tools)
}

/// Holds an exclusive lock on `<cache>/.lock`, so concurrent setups do not
/// install bpf-linker twice at once. Released when the file is closed.
fn lock(cache: &Path) -> Result<File> {
    let path = cache.join(".lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        step(format!("setup: waiting for another `cargo xtask setup` (lock {})", path.display()));
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    Ok(file)
}

/// Runs a command, returns its trimmed stdout; the error names the command.
fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("cannot run {shown}; is it installed and on PATH?"))?;
    ensure!(out.status.success(), "{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs a command with inherited stdio; the error says `what` failed and `fix`.
fn status(cmd: &mut Command, what: &str, fix: &str) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("cannot run {shown}: {what} failed; {fix}"))?;
    ensure!(st.success(), "{shown} exited with {st}: {what} failed; {fix}");
    Ok(())
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn nightly_rustc() -> Command {
    let mut cmd = rustup();
    cmd.args(["run", "nightly", "rustc"]);
    cmd
}

fn ensure_nightly() -> Result<()> {
    let list = output(rustup().args(["toolchain", "list"]))
        .context("rustup is required to get the nightly toolchain; install it from https://rustup.rs")?;
    // `nightly-x86_64-unknown-linux-gnu`, not a dated `nightly-2026-05-19-...`.
    let has_nightly = list.lines().filter_map(|l| l.split_whitespace().next()).any(|name| {
        name == "nightly"
            || name.strip_prefix("nightly-").is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if !has_nightly {
        step("setup: installing the nightly toolchain (needed to build the eBPF programs)");
        status(
            rustup().args(["toolchain", "install", "nightly", "--profile", "minimal", "--component", "rust-src"]),
            "installing the nightly toolchain",
            "check network access to static.rust-lang.org, or install it by hand: \
             `rustup toolchain install nightly --profile minimal --component rust-src`",
        )?;
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(nightly_rustc().args(["--print", "sysroot"]))
        .context("cannot ask the nightly rustc for its sysroot; try `rustup toolchain install nightly --force`")?;
    Ok(PathBuf::from(sysroot))
}

fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    let core = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core.is_dir() {
        step("setup: adding rust-src to nightly (needed for -Z build-std=core)");
        status(
            rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "adding rust-src to the nightly toolchain",
            "check network access, or run `rustup component add rust-src --toolchain nightly` by hand",
        )?;
        ensure!(core.is_dir(), "rust-src was added but {} is still missing; reinstall nightly", core.display());
    }
    Ok(())
}

/// `22` from the `LLVM version: 22.1.4` line of `rustc +nightly -vV`.
fn nightly_llvm_major() -> Result<String> {
    let vv = output(nightly_rustc().arg("-vV"))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .map(str::trim)
        .with_context(|| format!("`rustc +nightly -vV` printed no `LLVM version:` line:\n{vv}"))?;
    let major = version.split('.').next().unwrap_or_default();
    ensure!(!major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()), "cannot parse LLVM version {version:?}");
    step(format!("setup: nightly toolchain with rust-src, LLVM {version}"));
    Ok(major.to_owned())
}

/// The real `libLLVM.so.<ver>-rust-<ver>` inside the nightly sysroot.
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found: Vec<PathBuf> = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .collect();
    found.sort();
    found.into_iter().next().with_context(|| {
        format!(
            "the nightly toolchain has no {}/libLLVM.so.*, which bpf-linker links against; \
             reinstall it with `rustup toolchain install nightly --force --profile minimal --component rust-src`",
            lib.display()
        )
    })
}

/// Points `link` at `target`, replacing whatever was there (atomically).
fn force_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).ok().as_deref() == Some(target) {
        return Ok(());
    }
    let tmp = link.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp).with_context(|| format!("cannot create symlink {}", tmp.display()))?;
    fs::rename(&tmp, link).with_context(|| format!("cannot replace {}", link.display()))
}

/// `bpf-linker 0.13.0` if the binary runs, else why not.
fn linker_version(linker: &Path) -> Result<String> {
    match Command::new(linker).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        Ok(out) => bail!("{} --version failed: {}", linker.display(), String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) if e.kind() == ErrorKind::NotFound => bail!("{} is not installed", linker.display()),
        Err(e) => Err(e).with_context(|| format!("cannot run {}", linker.display())),
    }
}

fn ensure_bpf_linker(cache: &Path, sysroot: &Path, llvm_major: &str) -> Result<Tools> {
    let llvm_so = nightly_libllvm(sysroot)?;
    let prefix = cache.join("llvm-from-rustc");
    let lib = prefix.join("lib");
    let link = lib.join("libLLVM.so");
    // bpf-linker's RUNPATH is `lib`, and it needs the library by its soname
    // (`libLLVM.so.22.1-rust-...`), so put that name next to libLLVM.so too.
    let soname_link = lib.join(llvm_so.file_name().context("libLLVM path has no file name")?);
    let tools_root = cache.join("tools");
    let bin_dir = tools_root.join("bin");
    let linker = bin_dir.join("bpf-linker");

    // Reuse the cached linker if it was built against this nightly's libLLVM.
    if fs::read_link(&link).ok().as_deref() == Some(llvm_so.as_path()) {
        force_symlink(&llvm_so, &soname_link)?;
        if let Ok(version) = linker_version(&linker) {
            step(format!("setup: {version} cached at {}", linker.display()));
            return Ok(Tools { bin_dir });
        }
    }

    step(format!(
        "setup: building bpf-linker against the nightly's LLVM {llvm_major} into {} (1-2 minutes on 2 cores)",
        tools_root.display()
    ));
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    force_symlink(&llvm_so, &link)?;
    force_symlink(&llvm_so, &soname_link)?;
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    status(
        Command::new(cargo)
            .args(["install", "bpf-linker", "--locked", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .arg("--root")
            .arg(&tools_root)
            .env("LLVM_PREFIX", &prefix),
        "building bpf-linker",
        &format!(
            "it needs crates.io access and a C compiler (apt-get install gcc libc6-dev); \
             if the nightly's LLVM {llvm_major} is newer than bpf-linker supports, pin an older nightly"
        ),
    )?;
    let version = linker_version(&linker).context("bpf-linker was installed but does not run")?;
    step(format!("setup: {version} installed at {}", linker.display()));
    Ok(Tools { bin_dir })
}
