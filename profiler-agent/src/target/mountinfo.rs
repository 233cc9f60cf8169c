//! Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`:
//! `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
//! ones (v1 controllers beside it).

/// The mount point of the first `cgroup2` file system in `mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split(' ').nth(4)?;
        Some(unescape(mount_point))
    })
}

/// The kernel writes space, tab, newline and backslash as `\040` style
/// octal escapes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = (u32::from(d[0] - b'0') << 6) | (u32::from(d[1] - b'0') << 3) | u32::from(d[2] - b'0');
                out.push(v as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn unified_and_hybrid_hosts() {
        let unified = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 24 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert_eq!(cgroup2_mount(unified).as_deref(), Some("/sys/fs/cgroup"));
        let hybrid = "\
25 24 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
30 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,cpu,cpuacct
";
        assert_eq!(cgroup2_mount(hybrid).as_deref(), Some("/sys/fs/cgroup/unified"));
        let v1_only = "27 25 0:25 / /sys/fs/cgroup/memory rw shared:10 - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount(v1_only), None);
        // Optional fields vary in number; escapes are decoded.
        let odd = "99 1 0:50 / /mnt/my\\040cgroups rw master:3 shared:4 - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(odd).as_deref(), Some("/mnt/my cgroups"));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = cgroup2_mount(&s);
        }

        #[test]
        fn never_panics_on_mountinfo_shaped_lines(
            fields in prop::collection::vec("[a-z0-9/:,\\\\]{0,12}", 0..8),
            fstype in "(cgroup2|cgroup|tmpfs)",
        ) {
            let line = format!("{} - {fstype} x rw\n", fields.join(" "));
            let _ = cgroup2_mount(&line);
        }
    }
}
