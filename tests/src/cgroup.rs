//! Real cgroups for the tests: created under the host's cgroup v2
//! hierarchy (and, where asked, a v1 controller hierarchy), with processes
//! moved into them, removed again on drop.

use std::path::{Path, PathBuf};

/// Where cgroup v2 is mounted: `/sys/fs/cgroup/unified` on hybrid hosts,
/// `/sys/fs/cgroup` on unified ones.
pub fn v2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(left.split(' ').nth(4).unwrap()))
        })
        .expect("a cgroup2 hierarchy is mounted")
}

/// A cgroup directory path (and every missing parent) created by a test.
pub struct TestCgroup {
    /// The directories this test created, deepest last.
    created: Vec<PathBuf>,
    dir: PathBuf,
    /// The path relative to the hierarchy's root, as `/proc/PID/cgroup` shows it.
    pub path: String,
}

impl TestCgroup {
    /// Creates `path` (`/kubepods.slice/...`) under the hierarchy at `root`.
    pub fn create(root: &Path, path: &str) -> TestCgroup {
        let mut created = Vec::new();
        let mut dir = root.to_path_buf();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        TestCgroup { created, dir, path: path.to_owned() }
    }

    /// Moves every thread of `pid` into this cgroup.
    pub fn add(&self, pid: u32) {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).unwrap_or_else(|e| panic!("write {}: {e}", procs.display()));
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes still inside (a workload being killed) keep the
        // directory busy for a moment.
        for dir in self.created.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// A fresh 64-hex container id and 8-4-4-4-12 pod uid for one test.
pub fn fresh_ids(seed: &str) -> (String, String) {
    use std::hash::{Hash, Hasher};
    let mut words = Vec::new();
    for i in 0..5u32 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (seed, std::process::id(), std::time::SystemTime::now(), i).hash(&mut h);
        words.push(format!("{:016x}", h.finish()));
    }
    let id = words[..4].concat();
    let u = &words[4];
    let v = &words[0];
    let uid = format!("{}-{}-{}-{}-{}", &u[..8], &u[8..12], &u[12..16], &v[..4], &v[4..16]);
    (id, uid)
}
