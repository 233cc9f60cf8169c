//! Workloads the benches profile: compiled from source with the system's C
//! or C++ compiler, started, and killed and reaped on drop.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};

/// Compiles `source` with `$<env>` (default `default`) and `flags` into `dir/name`.
pub fn build(
    dir: &Path,
    name: &str,
    ext: &str,
    source: &str,
    (env_var, default): (&str, &str),
    flags: &[&str],
) -> Result<PathBuf> {
    let src = dir.join(format!("{name}.{ext}"));
    fs::write(&src, source).with_context(|| format!("cannot write {}", src.display()))?;
    let bin = dir.join(name);
    let cc = env::var(env_var).unwrap_or_else(|_| default.into());
    let out = Command::new(&cc)
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .with_context(|| format!("cannot run {cc} to build the {name} workload (apt-get install {default})"))?;
    ensure!(
        out.status.success(),
        "{cc} {} failed to build the {name} workload ({}):\n{}",
        flags.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(bin)
}

/// A running workload, killed and reaped on drop.
pub struct Workload {
    child: Child,
    pub name: &'static str,
}

impl Workload {
    pub fn start(bin: &Path, name: &'static str, args: &[String]) -> Result<Workload> {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start the {name} workload ({})", bin.display()))?;
        let mut w = Workload { child, name };
        thread::sleep(Duration::from_millis(500)); // hot, with its mappings in place
        w.check()?;
        Ok(w)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the workload has exited.
    pub fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("waiting for a workload")? {
            bail!("the {} workload exited early: {status}", self.name);
        }
        Ok(())
    }

    /// The files mapped executable into the workload, in /proc/PID/maps order.
    pub fn code_files(&self) -> Result<Vec<PathBuf>> {
        let path = format!("/proc/{}/maps", self.pid());
        let maps = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let perms = f.nth(1).unwrap_or_default();
            let Some(file) = f.nth(3).filter(|p| p.starts_with('/')) else { continue };
            let file = PathBuf::from(file);
            if perms.contains('x') && !files.contains(&file) {
                files.push(file);
            }
        }
        Ok(files)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
