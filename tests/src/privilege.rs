//! Running a command the way the systemd unit runs the agent: as a
//! non-root user holding exactly a given set of capabilities (inheritable,
//! ambient and bounding), with no_new_privs, through util-linux's setpriv.

use std::{path::Path, process::Command};

/// The unprivileged user the tests run as (Debian's `nobody`/`nogroup`).
pub const NOBODY: u32 = 65534;

/// `program` as uid/gid [`NOBODY`] with exactly `caps` (names such as
/// `CAP_BPF`; empty for none).
pub fn as_nobody_with_caps(caps: &[&str], program: &Path) -> Command {
    let list: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(format!("--inh-caps={list}"))
        .arg(format!("--ambient-caps={list}"))
        .arg(format!("--bounding-set={list}"))
        .arg("--no-new-privs")
        .arg("--")
        .arg(program);
    cmd
}

/// A temporary directory [`NOBODY`] can write (mode 0777 inside a 0755 parent).
pub fn shared_tempdir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod tempdir");
    dir
}

/// The capabilities a unit file grants, from its `AmbientCapabilities=` lines.
pub fn unit_capabilities(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}
