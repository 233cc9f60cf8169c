//! The deb's maintainer scripts, run the way dpkg runs them (executed from
//! /, with its DPKG_* variables and arguments) but in a scratch system: a
//! private mount namespace with a copy of /etc bind-mounted over /etc (so
//! the account tools' atomic renames work, and the host's users are
//! untouched), tmpfs over /run (no /run/systemd/system, as in a container
//! or a chroot), /var/lib, /var/log and /var/mail, and the package's
//! sysusers.d file in /usr/lib/sysusers.d. PATH is a farm of links to the
//! host's programs, without the ones a run hides so that postinst falls
//! through to systemd-sysusers, adduser or useradd in turn, and with a fake
//! systemctl that logs its arguments.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use profiler_integration_tests::agent::run_command;

use super::{ok, package};

const USER: &str = "profiler-agent";
const HOME: &str = "/var/lib/profiler-agent";
/// The account databases: the host's must stay byte for byte the same.
const ACCOUNT_FILES: [&str; 4] = ["passwd", "group", "shadow", "gshadow"];
/// Where the copy of /etc is marked, so nothing runs on the host's /etc.
const MARKER: &str = ".profiler-agent-scripts-test";

/// Runs inside `unshare -m --propagation private`: mounts the scratch
/// system, then each line `name<TAB>command` of $S/steps, recording its exit
/// status, the account files, the state directory and systemctl's calls.
const DRIVER: &str = r#"
set -eu
S=$1
mount --bind "$S/etc" /etc
mount -t tmpfs scratch-run /run
mount -t tmpfs scratch-var-lib /var/lib
mount -t tmpfs scratch-var-log /var/log
if [ -d /var/mail ]; then mount -t tmpfs scratch-var-mail /var/mail; fi
if [ -d "$S/sysusers.d" ]; then mount --bind "$S/sysusers.d" /usr/lib/sysusers.d; fi
# Never run a step on the host's /etc, or where systemd runs.
[ -e "/etc/@MARKER@" ] || exit 97
[ ! -d /run/systemd/system ] || exit 98
cd /
export PATH="$S/bin" DPKG_ROOT= DPKG_MAINTSCRIPT_PACKAGE=profiler-agent DPKG_MAINTSCRIPT_ARCH=@ARCH@ SYSTEMCTL_LOG="$S/systemctl.log"
tab=$(printf '\t')
while IFS="$tab" read -r name command; do
    : > "$S/systemctl.log"
    set +e
    (eval "$command") > "$S/out.$name" 2>&1
    rc=$?
    set -e
    echo "$name $rc" >> "$S/results"
    mkdir "$S/snap.$name"
    for f in passwd group shadow gshadow; do cp "/etc/$f" "$S/snap.$name/$f" 2>/dev/null || :; done
    cp "$S/systemctl.log" "$S/snap.$name/systemctl"
    if [ -e @HOME@ ]; then find @HOME@ | sort > "$S/snap.$name/state"; fi
done < "$S/steps"
"#;

/// systemctl as the scripts see it: logs its arguments, exits with
/// $SYSTEMCTL_EXIT (a failing systemctl must not fail the install).
const FAKE_SYSTEMCTL: &str = "#!/bin/sh\necho \"$*\" >> \"$SYSTEMCTL_LOG\"\nexit \"${SYSTEMCTL_EXIT:-0}\"\n";

/// The tool postinst creates the user with: the first of systemd-sysusers,
/// adduser, useradd on PATH.
#[derive(Clone, Copy, Debug)]
enum Creator {
    Sysusers,
    Adduser,
    Useradd,
}

impl Creator {
    fn tool(self) -> &'static str {
        match self {
            Creator::Sysusers => "systemd-sysusers",
            Creator::Adduser => "adduser",
            Creator::Useradd => "useradd",
        }
    }

    /// What PATH leaves out so that postinst gets to this tool.
    fn hidden(self) -> &'static [&'static str] {
        match self {
            Creator::Sysusers => &[],
            Creator::Adduser => &["systemd-sysusers"],
            Creator::Useradd => &["systemd-sysusers", "adduser"],
        }
    }
}

const BIN_DIRS: [&str; 6] = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

fn on_host(tool: &str) -> bool {
    BIN_DIRS.iter().any(|d| Path::new(d).join(tool).exists())
}

/// What one step left behind.
struct Snapshot {
    status: i32,
    output: String,
    accounts: BTreeMap<&'static str, String>,
    /// `find` of the state directory; None when it does not exist.
    state: Option<String>,
    systemctl: Vec<String>,
}

impl Snapshot {
    fn line(&self, file: &str) -> Vec<&str> {
        self.accounts[file].lines().filter(|l| l.split(':').next() == Some(USER)).collect()
    }
}

/// Runs `steps` (name, shell command; `$C` is the scripts' directory) in a
/// fresh scratch system where postinst reaches `creator`.
fn run_steps(creator: Creator, steps: &[(&str, String)]) -> BTreeMap<String, Snapshot> {
    let p = package();
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path();
    let control = s.join("control");
    ok(Command::new("dpkg-deb").arg("-e").arg(&p.deb).arg(&control), "dpkg-deb -e");
    ok(Command::new("cp").arg("-a").arg("/etc").arg(s.join("etc")), "cp -a /etc");
    std::fs::write(s.join("etc").join(MARKER), "").unwrap();
    let sysusers = std::fs::read(p.root.join("usr/lib/sysusers.d/profiler-agent.conf")).unwrap();
    if Path::new("/usr/lib/sysusers.d").is_dir() {
        ok(Command::new("cp").arg("-a").arg("/usr/lib/sysusers.d").arg(s.join("sysusers.d")), "cp sysusers.d");
        std::fs::write(s.join("sysusers.d/profiler-agent.conf"), &sysusers).unwrap();
    } else {
        // No /usr/lib/sysusers.d to mount over: systemd-sysusers reads /etc/sysusers.d too.
        std::fs::create_dir_all(s.join("etc/sysusers.d")).unwrap();
        std::fs::write(s.join("etc/sysusers.d/profiler-agent.conf"), &sysusers).unwrap();
    }
    let bin = s.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for d in BIN_DIRS {
        let Ok(entries) = std::fs::read_dir(d) else { continue };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if n == "systemctl" || creator.hidden().contains(&n.as_ref()) || bin.join(&name).exists() {
                continue;
            }
            std::os::unix::fs::symlink(e.path(), bin.join(&name)).unwrap();
        }
    }
    let systemctl = bin.join("systemctl");
    std::fs::write(&systemctl, FAKE_SYSTEMCTL).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plan: String = steps
        .iter()
        .map(|(name, command)| format!("{name}\t{}\n", command.replace("$C", &control.display().to_string())))
        .collect();
    std::fs::write(s.join("steps"), plan).unwrap();
    let arch = ok(Command::new("dpkg").arg("--print-architecture"), "dpkg --print-architecture");
    let driver = DRIVER.replace("@MARKER@", MARKER).replace("@HOME@", HOME).replace("@ARCH@", arch.trim());
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &driver, "sh"]).arg(s);
    let run = run_command(cmd, Duration::from_secs(120));
    assert!(run.status.success(), "the scratch system could not be set up ({creator:?})\n{}", run.context());

    let results = std::fs::read_to_string(s.join("results")).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in results.lines() {
        let (name, status) = line.split_once(' ').unwrap();
        let snap = s.join(format!("snap.{name}"));
        let read = |f: &str| std::fs::read_to_string(snap.join(f)).unwrap_or_default();
        out.insert(
            name.to_owned(),
            Snapshot {
                status: status.parse().unwrap(),
                output: std::fs::read_to_string(s.join(format!("out.{name}"))).unwrap_or_default(),
                accounts: ACCOUNT_FILES.iter().map(|f| (*f, read(f))).collect(),
                state: snap.join("state").exists().then(|| read("state")),
                systemctl: read("systemctl").lines().map(str::to_owned).collect(),
            },
        );
    }
    assert_eq!(out.len(), steps.len(), "not every step ran ({creator:?}): {results}\n{}", run.context());
    out
}

/// A maintainer script run as dpkg runs it: `DPKG_MAINTSCRIPT_NAME=script $C/script ARGS`.
fn script(name: &str, args: &str) -> String {
    format!("DPKG_MAINTSCRIPT_NAME={name} $C/{name} {args}")
}

fn host_accounts() -> Vec<(PathBuf, Option<Vec<u8>>)> {
    ACCOUNT_FILES.iter().map(|f| Path::new("/etc").join(f)).map(|p| (p.clone(), std::fs::read(&p).ok())).collect()
}

/// The value of `key` in a login.defs text.
fn login_def(text: &str, key: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() == Some(key) {
            words.next()?.parse().ok()
        } else {
            None
        }
    })
}

/// What the host's name service says of the user (nothing when absent).
fn host_user() -> Vec<u8> {
    Command::new("getent").args(["passwd", USER]).output().map(|o| o.stdout).unwrap_or_default()
}

#[test]
fn maintainer_scripts_create_the_user_and_run_without_systemd() {
    let (host_before, host_user_before) = (host_accounts(), host_user());
    let steps: Vec<(&str, String)> = vec![
        ("install", script("postinst", "configure")),
        ("configure-again", script("postinst", "configure")),
        ("upgrade", script("postinst", "configure 0.0.1")),
        ("profiles", format!("mkdir -p {HOME}/profiles && touch {HOME}/profiles/cpu-1.pb.gz")),
        ("prerm-remove", script("prerm", "remove")),
        ("postrm-remove", script("postrm", "remove")),
        ("postrm-purge", script("postrm", "purge")),
        // Now with systemd running, and a systemctl that fails.
        ("systemd", "mkdir -p /run/systemd/system".to_owned()),
        ("systemd-install", format!("SYSTEMCTL_EXIT=1 {}", script("postinst", "configure"))),
        ("systemd-upgrade", format!("SYSTEMCTL_EXIT=1 {}", script("postinst", "configure 0.0.1"))),
        ("systemd-prerm-upgrade", format!("SYSTEMCTL_EXIT=1 {}", script("prerm", "upgrade 0.2.0"))),
        ("systemd-prerm-remove", format!("SYSTEMCTL_EXIT=1 {}", script("prerm", "remove"))),
        ("systemd-postrm-remove", format!("SYSTEMCTL_EXIT=1 {}", script("postrm", "remove"))),
    ];
    let mut ran = Vec::new();
    for creator in [Creator::Sysusers, Creator::Adduser, Creator::Useradd] {
        if !on_host(creator.tool()) {
            eprintln!("{} is not installed here: postinst's {creator:?} branch is not run", creator.tool());
            continue;
        }
        let snaps = run_steps(creator, &steps);
        let what = |step: &str| format!("{creator:?}, step {step}:\n{}", snaps[step].output);
        for (step, snap) in &snaps {
            assert_eq!(snap.status, 0, "{} exited {}", what(step), snap.status);
        }

        // The system user: a system uid, no login, home /var/lib/profiler-agent, its own group.
        let install = &snaps["install"];
        let passwd = install.line("passwd");
        assert_eq!(passwd.len(), 1, "{}\n{:?}", what("install"), install.accounts["passwd"]);
        let f: Vec<&str> = passwd[0].split(':').collect();
        let (uid, gid): (u32, u32) = (f[2].parse().unwrap(), f[3].parse().unwrap());
        let defs = std::fs::read_to_string("/etc/login.defs").unwrap_or_default();
        let uid_min = login_def(&defs, "UID_MIN").unwrap_or(1000);
        assert!(uid > 0 && uid < uid_min, "{creator:?}: uid {uid} is not a system uid (below {uid_min}): {passwd:?}");
        assert_eq!(f[5], HOME, "{creator:?}: home of {passwd:?}");
        assert!(f[6].ends_with("/nologin"), "{creator:?}: the user can log in: {passwd:?}");
        let group = install.line("group");
        assert!(
            group.len() == 1 && group[0].split(':').nth(2) == Some(&gid.to_string()),
            "{creator:?}: no group {USER} with gid {gid}: {group:?}"
        );
        let shadow = install.line("shadow");
        assert!(
            shadow.len() == 1 && shadow[0].split(':').nth(1).is_some_and(|p| p.starts_with(['!', '*'])),
            "{creator:?}: the user has a usable password: {shadow:?}"
        );
        assert_eq!(install.state, None, "{creator:?}: postinst created {HOME} (the unit's StateDirectory= does)");

        // Idempotent: configuring again, or after an upgrade, changes nothing.
        for step in ["configure-again", "upgrade"] {
            assert!(snaps[step].accounts == install.accounts, "{}: the account files changed", what(step));
        }
        // Without systemd, no script calls systemctl.
        for step in ["install", "configure-again", "upgrade", "prerm-remove", "postrm-remove", "postrm-purge"] {
            assert!(snaps[step].systemctl.is_empty(), "{}: systemctl {:?}", what(step), snaps[step].systemctl);
        }
        // remove keeps the state and the user, purge deletes the state; the user stays (Debian policy).
        let kept = snaps["postrm-remove"].state.as_deref().unwrap_or_default();
        assert!(kept.contains("cpu-1.pb.gz"), "{}: the profiles went on remove: {kept:?}", what("postrm-remove"));
        assert_eq!(snaps["postrm-purge"].state, None, "{}: {HOME} survived purge", what("postrm-purge"));
        assert!(snaps["postrm-purge"].accounts == install.accounts, "{}: the accounts changed", what("postrm-purge"));

        // With systemd: reload on configure and on removal, restart on upgrade, stop on remove only.
        let calls = |step: &str| snaps[step].systemctl.clone();
        assert_eq!(calls("systemd-install"), ["daemon-reload"], "{}", what("systemd-install"));
        assert_eq!(
            calls("systemd-upgrade"),
            ["daemon-reload", "try-restart profiler-agent.service"],
            "{}",
            what("systemd-upgrade")
        );
        assert!(calls("systemd-prerm-upgrade").is_empty(), "{}", what("systemd-prerm-upgrade"));
        assert_eq!(calls("systemd-prerm-remove"), ["stop profiler-agent.service"], "{}", what("systemd-prerm-remove"));
        assert_eq!(calls("systemd-postrm-remove"), ["daemon-reload"], "{}", what("systemd-postrm-remove"));
        eprintln!("{creator:?}: {}", passwd[0]);
        ran.push(creator);
    }
    assert!(!ran.is_empty(), "none of systemd-sysusers, adduser, useradd is installed");
    assert!(host_accounts() == host_before, "the host's account files changed");
    assert_eq!(host_user(), host_user_before, "the host's {USER} user changed");
}
