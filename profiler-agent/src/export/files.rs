//! Writing output files so readers only ever see complete contents.
//!
//! Profiles are rewritten in place every window while viewers, uploaders
//! or `tail`-style watchers may read them; a plain truncate-and-write would
//! let them see a truncated gzip stream or half an SVG.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::ExportError;

/// Atomically replaces `path` with `bytes`.
///
/// The data goes to `.<name>.tmp-<pid>` in the same directory (a rename is
/// only atomic within one filesystem), is fsynced, and is then renamed over
/// `path`. On failure the temporary file is removed and `path` is left as
/// it was. Concurrent writers to the same path within one process must be
/// serialized by the caller, since they would share the temporary name.
///
/// # Errors
///
/// [`ExportError::NoFileName`] if `path` has no file name; otherwise
/// [`ExportError::CreateTemp`], [`ExportError::WriteTemp`] or
/// [`ExportError::Rename`] naming the step and path that failed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let tmp = temp_path(path)?;
    if let Err(e) = write_synced(&tmp, bytes) {
        // Best effort: the write error is what the caller needs to see.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(source) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(ExportError::Rename { from: tmp, to: path.to_owned(), source });
    }
    sync_parent(path);
    Ok(())
}

/// `dir/.<name>.tmp-<pid>` for `dir/<name>`. Hidden so directory listings
/// and globs like `*.pb.gz` skip it; the pid keeps two agents apart.
fn temp_path(path: &Path) -> Result<PathBuf, ExportError> {
    let name = path.file_name().ok_or_else(|| ExportError::NoFileName { path: path.to_owned() })?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    // Truncate: a leftover from a crashed run with a recycled pid must not
    // leak its tail into the new file.
    let mut file = File::create(tmp).map_err(|source| ExportError::CreateTemp { path: tmp.to_owned(), source })?;
    let write_err = |source| ExportError::WriteTemp { path: tmp.to_owned(), source };
    file.write_all(bytes).map_err(write_err)?;
    // Without this the rename can reach the disk before the data, and a
    // crash would leave an empty file under the final name.
    file.sync_all().map_err(write_err)
}

/// Makes the rename itself durable. Best effort: the new contents are
/// already visible to readers, and some filesystems reject fsync on a
/// directory, which must not turn a successful write into an error.
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn creates_then_replaces_without_leftovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cpu.pb.gz");
        write_atomic(&path, b"first version, longer").expect("first write");
        assert_eq!(fs::read(&path).expect("read"), b"first version, longer");
        write_atomic(&path, b"second").expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"second");
        assert_eq!(entries(dir.path()), ["cpu.pb.gz"]);
    }

    #[test]
    fn stale_temp_file_is_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.svg");
        let tmp = temp_path(&path).expect("temp path");
        assert_eq!(tmp.file_name().expect("name"), format!(".out.svg.tmp-{}", std::process::id()).as_str());
        fs::write(&tmp, b"stale leftover that is longer than the new data").expect("stale");
        write_atomic(&path, b"new").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        assert_eq!(entries(dir.path()), ["out.svg"]);
    }

    #[test]
    fn missing_directory_reports_the_temp_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("no-such-dir").join("x.folded");
        let err = write_atomic(&path, b"x").expect_err("must fail");
        assert!(matches!(err, ExportError::CreateTemp { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn failed_rename_keeps_target_and_cleans_up() {
        // Renaming a file over a non-empty directory fails on every
        // filesystem, which exercises the cleanup path.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("target");
        fs::create_dir(&path).expect("mkdir");
        fs::write(path.join("keep"), b"k").expect("write keep");
        let err = write_atomic(&path, b"x").expect_err("must fail");
        assert!(matches!(err, ExportError::Rename { .. }), "{err:?}");
        assert!(path.join("keep").exists());
        assert_eq!(entries(dir.path()), ["target"]);
    }

    #[test]
    fn path_without_file_name_is_rejected() {
        let err = write_atomic(Path::new("/"), b"x").expect_err("must fail");
        assert!(matches!(err, ExportError::NoFileName { .. }), "{err:?}");
    }
}
