//! The daemon's local-file exporter: one pprof and one folded file per
//! profile and interval in a directory, with size and age limits.
//!
//! Files are named `<kind>-<UTC start>.pb.gz` / `.folded`
//! (`cpu-20261127T101500Z.pb.gz`), so a directory listing sorts by time and
//! retention only ever touches files that match this pattern.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{files::write_atomic, folded, pprof, ExportError};
use crate::profile::Profile;

/// Counters for the agent's own metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollingStats {
    pub files_written: u64,
    pub bytes_written: u64,
    pub files_deleted: u64,
    pub bytes_deleted: u64,
}

/// A directory of rolling profile files.
pub struct RollingDir {
    dir: PathBuf,
    max_bytes: u64,
    max_age: Duration,
    stats: RollingStats,
}

/// Kinds of profile this exporter names files after.
const KINDS: [&str; 2] = ["cpu", "off-cpu"];
const SUFFIXES: [&str; 2] = [".pb.gz", ".folded"];

impl RollingDir {
    /// Creates the directory if needed.
    pub fn new(dir: &Path, max_bytes: u64, max_age: Duration) -> Result<Self, ExportError> {
        fs::create_dir_all(dir).map_err(|source| ExportError::CreateTemp { path: dir.to_path_buf(), source })?;
        Ok(Self { dir: dir.to_path_buf(), max_bytes, max_age, stats: RollingStats::default() })
    }

    pub fn stats(&self) -> RollingStats {
        self.stats
    }

    /// Writes `profile` of `kind` (`cpu` or `off-cpu`) as pprof and folded
    /// files, then applies retention. Returns the written paths.
    pub fn write(&mut self, kind: &str, profile: &Profile) -> Result<Vec<PathBuf>, ExportError> {
        let stamp = utc_stamp(profile.start);
        let files = [
            (format!("{kind}-{stamp}.pb.gz"), pprof::to_gzip(profile)?),
            (format!("{kind}-{stamp}.folded"), folded::encode(profile).into_bytes()),
        ];
        let mut written = Vec::new();
        for (name, bytes) in files {
            let path = self.dir.join(name);
            write_atomic(&path, &bytes)?;
            self.stats.files_written += 1;
            self.stats.bytes_written += bytes.len() as u64;
            written.push(path);
        }
        self.enforce(SystemTime::now());
        Ok(written)
    }

    /// Deletes our files older than the age limit, then the oldest ones
    /// until the directory is within the size limit. Errors deleting one
    /// file do not stop the rest (it is retried next interval).
    pub fn enforce(&mut self, now: SystemTime) {
        let mut files: Vec<(PathBuf, SystemTime, u64)> = match fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .filter(|e| is_ours(&e.file_name().to_string_lossy()))
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((e.path(), m.modified().ok()?, m.len()))
                })
                .collect(),
            Err(e) => {
                log::warn!("cannot list {} for retention: {e}", self.dir.display());
                return;
            }
        };
        // Oldest first; names embed the start time, so ties sort stably.
        files.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        let mut total: u64 = files.iter().map(|f| f.2).sum();
        for (path, modified, len) in files {
            let too_old = now.duration_since(modified).is_ok_and(|age| age > self.max_age);
            if !too_old && total <= self.max_bytes {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    total -= len;
                    self.stats.files_deleted += 1;
                    self.stats.bytes_deleted += len;
                }
                Err(e) => log::warn!("cannot delete {} for retention: {e}", path.display()),
            }
        }
    }
}

fn is_ours(name: &str) -> bool {
    KINDS.iter().any(|k| name.strip_prefix(k).is_some_and(|rest| rest.starts_with('-') && rest.len() > 17))
        && SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// `YYYYMMDDTHHMMSSZ` in UTC, computed without a date library (civil-from-days).
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ValueType;

    fn profile(start_secs: u64) -> Profile {
        Profile::new(ValueType::new("samples", "count"), None, 0, UNIX_EPOCH + Duration::from_secs(start_secs))
    }

    #[test]
    fn stamps_are_utc_calendar_times() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(1_795_782_896)), "20261127T123456Z");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "20000229T000000Z");
    }

    #[test]
    fn writes_pprof_and_folded_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = RollingDir::new(dir.path(), u64::MAX, Duration::from_secs(3600)).unwrap();
        let files = r.write("cpu", &profile(1_795_782_896)).unwrap();
        let names: Vec<_> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["cpu-20261127T123456Z.pb.gz", "cpu-20261127T123456Z.folded"]);
        assert_eq!(r.stats().files_written, 2);
    }

    #[test]
    fn size_limit_deletes_the_oldest_of_our_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = RollingDir::new(dir.path(), u64::MAX, Duration::from_secs(3600)).unwrap();
        fs::write(dir.path().join("notes.txt"), vec![b'x'; 10_000]).unwrap();
        for (i, secs) in [1_000_000_000u64, 1_000_000_010, 1_000_000_020].into_iter().enumerate() {
            let p = dir.path().join(format!("cpu-{}.folded", utc_stamp(UNIX_EPOCH + Duration::from_secs(secs))));
            fs::write(&p, vec![b'a'; 100]).unwrap();
            let mtime = SystemTime::now() - Duration::from_secs(30 - 10 * i as u64);
            fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
        }
        r.max_bytes = 250;
        r.enforce(SystemTime::now());
        let mut left: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["cpu-20010909T014650Z.folded", "cpu-20010909T014700Z.folded", "notes.txt"]);
        assert_eq!(r.stats().files_deleted, 1);
        assert_eq!(r.stats().bytes_deleted, 100);
    }

    #[test]
    fn age_limit_deletes_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = RollingDir::new(dir.path(), u64::MAX, Duration::from_secs(60)).unwrap();
        let old = dir.path().join("off-cpu-20200101T000000Z.pb.gz");
        let new = dir.path().join("off-cpu-20200101T000100Z.pb.gz");
        for p in [&old, &new] {
            fs::write(p, b"x").unwrap();
        }
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(120))
            .unwrap();
        r.enforce(SystemTime::now());
        assert!(!old.exists());
        assert!(new.exists());
    }

    #[test]
    fn only_our_names_are_ours() {
        assert!(is_ours("cpu-20261127T123456Z.pb.gz"));
        assert!(is_ours("off-cpu-20261127T123456Z.folded"));
        assert!(!is_ours("cpu.folded"));
        assert!(!is_ours("cpu-x.txt"));
        assert!(!is_ours("config.toml"));
        assert!(!is_ours(".cpu-20261127T123456Z.pb.gz.tmp-12"));
    }
}
