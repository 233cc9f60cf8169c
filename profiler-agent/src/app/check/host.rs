//! Facts about the host, read from the kernel's files: version, BTF,
//! sysctls, limits, capabilities, cgroup layout. Parsers are pure and take
//! the text, so they are tested without the files.

use std::{ffi::CStr, fs, io::Read, path::Path};

/// `(major, minor)` from a release string such as `6.18.0-1-amd64`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: uname fills the struct; the fields are NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        CStr::from_ptr(u.release.as_ptr()).to_string_lossy().into_owned()
    }
}

/// A capability the agent may use, by number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
}

pub const CAP_DAC_READ_SEARCH: Capability = Capability { name: "CAP_DAC_READ_SEARCH", bit: 2 };
pub const CAP_SYS_PTRACE: Capability = Capability { name: "CAP_SYS_PTRACE", bit: 19 };
pub const CAP_SYS_ADMIN: Capability = Capability { name: "CAP_SYS_ADMIN", bit: 21 };
pub const CAP_SYSLOG: Capability = Capability { name: "CAP_SYSLOG", bit: 34 };
pub const CAP_PERFMON: Capability = Capability { name: "CAP_PERFMON", bit: 38 };
pub const CAP_BPF: Capability = Capability { name: "CAP_BPF", bit: 39 };

/// The effective set from the text of `/proc/self/status` (empty when unreadable).
pub fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

pub fn holds(caps: u64, cap: Capability) -> bool {
    cap.bit < 64 && caps & (1u64 << cap.bit) != 0
}

/// Whether any address in the `/proc/kallsyms` text is non-zero: the kernel
/// prints zeros to readers it does not trust (kptr_restrict, CAP_SYSLOG).
pub fn kallsyms_addresses_visible(text: &str) -> bool {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|addr| u64::from_str_radix(addr, 16).is_ok_and(|a| a != 0))
}

/// The first 64 KiB of /proc/kallsyms, enough to see whether addresses show.
pub fn kallsyms_head() -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(64 << 10);
    fs::File::open("/proc/kallsyms")?.take(64 << 10).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// An integer sysctl (`/proc/sys/kernel/kptr_restrict`).
pub fn sysctl(path: &str) -> Option<i64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// RLIMIT_MEMLOCK's soft limit in bytes; `None` means unlimited.
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(r.rlim_cur)
}

/// How cgroups are mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup2 at /sys/fs/cgroup.
    V2,
    /// v1 controllers, and cgroup2 at /sys/fs/cgroup/unified (systemd's hybrid mode).
    Hybrid,
    /// v1 controllers only.
    V1,
    Unknown,
}

impl CgroupLayout {
    pub fn describe(self) -> &'static str {
        match self {
            Self::V2 => "cgroup v2 (unified) at /sys/fs/cgroup",
            Self::Hybrid => "hybrid: cgroup v1 controllers, v2 at /sys/fs/cgroup/unified",
            Self::V1 => "cgroup v1 controllers only",
            Self::Unknown => "no cgroup file system at /sys/fs/cgroup",
        }
    }
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const TMPFS_MAGIC: i64 = 0x0102_1994;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;

/// Classifies the layout from the file system types (statfs magics) of
/// `/sys/fs/cgroup`, `/sys/fs/cgroup/unified` and one controller directory.
pub fn classify_cgroups(root: Option<i64>, unified: Option<i64>, controller: Option<i64>) -> CgroupLayout {
    match root {
        Some(CGROUP2_SUPER_MAGIC) => CgroupLayout::V2,
        Some(TMPFS_MAGIC) if unified == Some(CGROUP2_SUPER_MAGIC) => CgroupLayout::Hybrid,
        Some(TMPFS_MAGIC) if controller == Some(CGROUP_SUPER_MAGIC) => CgroupLayout::V1,
        _ => CgroupLayout::Unknown,
    }
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes the struct; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut s) == 0).then_some(s.f_type as i64)
    }
}

/// The layout of this host's /sys/fs/cgroup.
pub fn cgroup_layout() -> CgroupLayout {
    let base = Path::new("/sys/fs/cgroup");
    let controller = ["cpu", "memory", "pids", "cpu,cpuacct"].iter().find_map(|c| fs_magic(&base.join(c)));
    classify_cgroups(fs_magic(base), fs_magic(&base.join("unified")), controller)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.8.0"), Some((5, 8)));
        assert_eq!(parse_kernel_version("4.19"), Some((4, 19)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert_eq!(parse_kernel_version(""), None);
    }

    #[test]
    fn capabilities_from_status() {
        let caps = effective_caps("Name:\tx\nCapEff:\t000000c000080000\n");
        assert!(holds(caps, CAP_BPF) && holds(caps, CAP_PERFMON) && holds(caps, CAP_SYS_PTRACE));
        assert!(!holds(caps, CAP_SYSLOG) && !holds(caps, CAP_SYS_ADMIN));
        assert_eq!(effective_caps("no caps here"), 0);
    }

    #[test]
    fn kallsyms_visibility() {
        assert!(!kallsyms_addresses_visible("0000000000000000 T _stext\n0000000000000000 t foo\n"));
        assert!(kallsyms_addresses_visible("0000000000000000 A fixed\nffffffff81000000 T _stext\n"));
        assert!(!kallsyms_addresses_visible(""));
    }

    #[test]
    fn cgroup_layouts() {
        assert_eq!(classify_cgroups(Some(CGROUP2_SUPER_MAGIC), None, None), CgroupLayout::V2);
        assert_eq!(
            classify_cgroups(Some(TMPFS_MAGIC), Some(CGROUP2_SUPER_MAGIC), Some(CGROUP_SUPER_MAGIC)),
            CgroupLayout::Hybrid
        );
        assert_eq!(classify_cgroups(Some(TMPFS_MAGIC), None, Some(CGROUP_SUPER_MAGIC)), CgroupLayout::V1);
        assert_eq!(classify_cgroups(None, None, None), CgroupLayout::Unknown);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,200}") {
            let _ = parse_kernel_version(&s);
            let _ = effective_caps(&s);
            let _ = kallsyms_addresses_visible(&s);
        }
    }
}
