//! Stages the package tree and runs `dpkg-deb --build`.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use flate2::{write::GzEncoder, Compression};

use crate::{build::workspace_root, step};

/// Where systemd looks for packaged units on merged-/usr systems (every
/// Debian since 12, and Ubuntu since 20.04).
pub const UNIT_DIR: &str = "usr/lib/systemd/system";

/// Builds the package from the agent at `binary` into `out_dir`; returns
/// the .deb's path.
pub fn build(binary: &Path, out_dir: &Path) -> Result<PathBuf> {
    ensure!(binary.is_file(), "no agent binary at {}; build it with `cargo xtask build --release`", binary.display());
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"), "dpkg --print-architecture")?;
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let stage = out_dir.join(format!("profiler-agent_{version}_{arch}.stage"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("cannot clear {}", stage.display()))?;
    }
    step(format!("package: staging {}", stage.display()));

    install(&stage, "usr/bin/profiler-agent", &fs::read(binary)?, 0o755)?;
    strip_debug(&stage.join("usr/bin/profiler-agent"))?;
    install(
        &stage,
        &format!("{UNIT_DIR}/profiler-agent.service"),
        &read(&root, "packaging/systemd/profiler-agent.service")?,
        0o644,
    )?;
    install(&stage, "usr/lib/sysusers.d/profiler-agent.conf", &read(&root, "packaging/deb/sysusers.conf")?, 0o644)?;
    let example = String::from_utf8(read(&root, "packaging/config.example.toml")?)?;
    install(&stage, "etc/profiler-agent/config.toml", commented_config(&example).as_bytes(), 0o644)?;
    install(&stage, "etc/default/profiler-agent", &read(&root, "packaging/deb/default")?, 0o644)?;
    let page = super::man::page(binary, version)?;
    install(&stage, "usr/share/man/man8/profiler-agent.8.gz", &gzip(page.as_bytes())?, 0o644)?;
    let doc = "usr/share/doc/profiler-agent";
    install(&stage, &format!("{doc}/README.md"), &read(&root, "README.md")?, 0o644)?;
    if root.join("docs/operations.md").exists() {
        install(&stage, &format!("{doc}/operations.md"), &read(&root, "docs/operations.md")?, 0o644)?;
    }
    install(&stage, &format!("{doc}/copyright"), copyright().as_bytes(), 0o644)?;

    let installed_kib = tree_size(&stage)?.div_ceil(1024);
    let control = control(version, &arch, &glibc_requirement(binary)?, installed_kib);
    install(&stage, "DEBIAN/control", control.as_bytes(), 0o644)?;
    install(&stage, "DEBIAN/conffiles", b"/etc/profiler-agent/config.toml\n/etc/default/profiler-agent\n", 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(&stage, &format!("DEBIAN/{script}"), &read(&root, &format!("packaging/deb/{script}"))?, 0o755)?;
    }
    install(&stage, "DEBIAN/md5sums", md5sums(&stage)?.as_bytes(), 0o644)?;

    let deb = out_dir.join(format!("profiler-agent_{version}_{arch}.deb"));
    let status = Command::new("dpkg-deb")
        // gzip -6: several times faster than xz on a small builder, for ~20% more bytes.
        .args(["--build", "--root-owner-group", "-Zgzip", "-z6"])
        .arg(&stage)
        .arg(&deb)
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run dpkg-deb (Debian: apt-get install dpkg)")?;
    ensure!(status.success(), "dpkg-deb --build {} failed ({status})", stage.display());
    fs::remove_dir_all(&stage).ok();
    Ok(deb)
}

/// The shipped conffile: the example with every line commented, so an
/// installed agent runs on defaults until the operator uncomments a key
/// (an uncommented `[export.otlp]` alone would enable that exporter).
pub fn commented_config(example: &str) -> String {
    let mut out = String::from(
        "# Every line below is commented: the agent runs on the defaults shown.\n\
         # Uncomment a section header and the keys to change. Check the result\n\
         # with `profiler-agent check`.\n#\n",
    );
    for line in example.lines() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            out.push_str(line);
        } else {
            out.push_str("# ");
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

fn control(version: &str, arch: &str, glibc: &str, installed_kib: u64) -> String {
    format!(
        "Package: profiler-agent\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: profiler developers <profiler@example.invalid>\n\
         Installed-Size: {installed_kib}\n\
         Depends: libc6 (>= {glibc})\n\
         Recommends: systemd\n\
         Section: admin\n\
         Priority: optional\n\
         Homepage: https://example.invalid/profiler\n\
         Description: continuous eBPF profiler for Linux\n \
         Samples on-CPU and off-CPU stacks of every process with eBPF, symbolizes\n \
         them on the host and exports OTLP profiles, Pyroscope pushes or local\n \
         pprof files. Runs as a systemd service under an unprivileged user with\n \
         CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_SYSLOG.\n"
    )
}

fn copyright() -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: profiler\n\n\
         Files: *\n\
         License: {}\n \
         On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n",
        env!("CARGO_PKG_LICENSE")
    )
}

/// Drops debug sections, as Debian's dh_strip does (symbols stay: the
/// agent profiles itself too, and names need them).
fn strip_debug(binary: &Path) -> Result<()> {
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .status()
        .context("cannot run objcopy (Debian: apt-get install binutils)")?;
    ensure!(status.success(), "objcopy --strip-debug {} failed ({status})", binary.display());
    Ok(())
}

/// The newest `GLIBC_x.y` symbol version the binary needs, from `objdump -T`.
fn glibc_requirement(binary: &Path) -> Result<String> {
    let dynsyms = command_output(Command::new("objdump").arg("-T").arg(binary), "objdump -T (Debian: binutils)")?;
    let mut newest: Option<Vec<u32>> = None;
    for word in dynsyms.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        if let Some(v) = word.strip_prefix("GLIBC_") {
            let Ok(parts) = v.split('.').map(str::parse).collect::<Result<Vec<u32>, _>>() else { continue };
            if newest.as_ref().is_none_or(|n| parts > *n) {
                newest = Some(parts);
            }
        }
    }
    let Some(newest) = newest else { bail!("{} links no glibc symbol; is it a static binary?", binary.display()) };
    Ok(newest.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
}

fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    collect_files(stage, &mut files)?;
    let mut out = String::new();
    for f in files {
        let rel = f.strip_prefix(stage)?;
        if rel.starts_with("DEBIAN") || rel.starts_with("etc") {
            continue; // conffiles have their own sums in dpkg's database
        }
        let line = command_output(Command::new("md5sum").arg(&f), "md5sum")?;
        let sum = line.split_whitespace().next().context("md5sum printed nothing")?;
        out.push_str(&format!("{sum}  {}\n", rel.display()));
    }
    Ok(out)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        if e.file_type()?.is_dir() {
            collect_files(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

fn tree_size(dir: &Path) -> Result<u64> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.iter().map(|f| Ok(fs::metadata(f)?.len())).sum()
}

fn install(stage: &Path, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    let path = stage.join(rel);
    let parent = path.parent().context("staged path has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn read(root: &Path, rel: &str) -> Result<Vec<u8>> {
    fs::read(root.join(rel)).with_context(|| format!("cannot read {rel} from the workspace"))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

fn command_output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    ensure!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::commented_config;

    #[test]
    fn shipped_config_is_all_comments() {
        let example = std::fs::read_to_string(crate::build::workspace_root().join("packaging/config.example.toml"))
            .expect("packaging/config.example.toml");
        let shipped = commented_config(&example);
        for line in shipped.lines() {
            assert!(line.trim().is_empty() || line.trim_start().starts_with('#'), "uncommented line: {line}");
        }
        assert!(shipped.contains("# [export.otlp]"), "section headers are commented too");
        assert!(shipped.contains("# frequency = 19"));
    }
}
