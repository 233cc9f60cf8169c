//! BEFORE and AFTER from the command line: files or directories -> a
//! [`Side`] of repeats.
//!
//! - A directory: every profile of the kind in it is one repeat (`record`
//!   writes `cpu.pb.gz`, the daemon `cpu-<UTC start>.pb.gz` per interval).
//!   The same profile in two formats (`cpu.pb.gz` and `cpu.folded`) counts
//!   once, read from pprof.
//! - A recording (a directory, or its `cpu.pb.gz`/`cpu.folded`) holds one
//!   profile of the kind; its time blocks in `blocks/` (written by
//!   `record`) are then the repeats.
//! - Any other file is one repeat.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::model::{ProfileKind, Repeat, Side};
use crate::export::{folded, pprof};

/// Where `record` writes the time blocks of a recording, next to its profiles.
pub const BLOCKS_DIR: &str = "blocks";

/// Files larger than this are refused rather than read into memory.
const MAX_FILE_BYTES: u64 = 1 << 30;

/// Why BEFORE or AFTER cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: no such file or directory", .0.display())]
    Missing(PathBuf),
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has no {kind} profiles (looked for {stem}.pb.gz, {stem}.folded, {stem}-*.pb.gz, {stem}-*.folded and {blocks}/)", .dir.display(), stem = .kind.stem(), blocks = BLOCKS_DIR)]
    NoProfiles { dir: PathBuf, kind: ProfileKind },
    #[error("{} is not a profile: expected *.pb.gz (pprof) or *.folded", .0.display())]
    UnknownFormat(PathBuf),
    #[error("{} is corrupt: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{} is larger than {} MiB", .0.display(), MAX_FILE_BYTES >> 20)]
    TooLarge(PathBuf),
    #[error("{} holds {found} data, not {wanted} (pick the kind with --profile)", .path.display())]
    WrongKind { path: PathBuf, found: ProfileKind, wanted: ProfileKind },
    #[error("mixed sample types in {}: {} has {first}, {} has {second}", .side.display(), .first_path.display(), .second_path.display())]
    MixedSampleTypes { side: PathBuf, first_path: PathBuf, first: String, second_path: PathBuf, second: String },
    #[error(
        "{} gives {repeats} profile(s) with samples; the test needs at least 2 repeats per side to measure \
         run-to-run noise: give a directory of several recordings or daemon intervals, or a recording made by \
         `profiler-agent record` (it writes one-second time blocks in {blocks}/; off-CPU and wall ones with --off-cpu)", .path.display(), blocks = BLOCKS_DIR
    )]
    TooFewRepeats { path: PathBuf, repeats: usize },
    #[error("BEFORE holds {before} profiles and AFTER {after} profiles: compare profiles of one kind")]
    DifferentKinds { before: ProfileKind, after: ProfileKind },
}

/// Both sides must measure the same thing.
pub fn check_same_kind(before: &Side, after: &Side) -> Result<(), LoadError> {
    if before.kind != after.kind || before.sample_type != after.sample_type {
        return Err(LoadError::DifferentKinds { before: before.kind, after: after.kind });
    }
    Ok(())
}

/// A profile file, once its kind is known.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Candidate {
    path: PathBuf,
    pprof: bool,
}

/// Reads BEFORE or AFTER. `kind` is the `--profile` choice; `None` means
/// "cpu" for directories and "what the file is" for files.
pub fn load(path: &Path, kind: Option<ProfileKind>) -> Result<Side, LoadError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LoadError::Missing(path.to_path_buf()),
        _ => LoadError::Io { path: path.to_path_buf(), source: e },
    })?;
    let (kind, files, from_blocks) = if meta.is_dir() {
        let kind = kind.unwrap_or(ProfileKind::Cpu);
        let (files, blocks) = directory(path, kind)?;
        (kind, files, blocks)
    } else {
        let c = candidate(path).ok_or_else(|| LoadError::UnknownFormat(path.to_path_buf()))?;
        let name = file_name(path);
        let named = ProfileKind::from_file_name(&name);
        let kind = match kind.or(named) {
            Some(k) => k,
            // A file named by another tool: its sample type says what it is.
            None if c.pprof => pprof_kind(path)?,
            None => ProfileKind::Cpu,
        };
        // `cpu.pb.gz` of a recording: its time blocks are beside it.
        let recording = named == Some(kind) && base(&name) == kind.stem();
        let blocks = match (recording, path.parent()) {
            (true, Some(dir)) => profiles_in(&dir.join(BLOCKS_DIR), kind)?,
            _ => Vec::new(),
        };
        if blocks.len() >= 2 {
            (kind, blocks, true)
        } else {
            (kind, vec![c], false)
        }
    };

    let mut side = Side {
        path: path.to_path_buf(),
        kind,
        sample_type: String::new(),
        samples: 0,
        from_blocks,
        repeats: Vec::new(),
        empty_repeats: 0,
    };
    let mut first_type: Option<(PathBuf, String)> = None;
    for file in files {
        let (repeat, sample_type, samples) = read(&file, kind)?;
        match &first_type {
            None => first_type = Some((file.path.clone(), sample_type.clone())),
            Some((first_path, first)) if *first != sample_type => {
                return Err(LoadError::MixedSampleTypes {
                    side: path.to_path_buf(),
                    first_path: first_path.clone(),
                    first: first.clone(),
                    second_path: file.path,
                    second: sample_type,
                })
            }
            Some(_) => {}
        }
        side.samples = side.samples.saturating_add(samples);
        if repeat.total() == 0 {
            side.empty_repeats += 1;
        } else {
            side.repeats.push(repeat);
        }
    }
    side.sample_type = first_type.map(|(_, t)| t).unwrap_or_default();
    Ok(side)
}

/// The test needs at least two repeats with samples per side. Checked
/// after [`check_same_kind`], so comparing the wrong files says so first.
pub fn check_repeats(side: &Side) -> Result<(), LoadError> {
    if side.repeats.len() < 2 {
        return Err(LoadError::TooFewRepeats { path: side.path.clone(), repeats: side.repeats.len() });
    }
    Ok(())
}

/// The profile files of `kind` in `dir`, or its blocks when `dir` is one
/// recording. Returns whether the blocks were used.
fn directory(dir: &Path, kind: ProfileKind) -> Result<(Vec<Candidate>, bool), LoadError> {
    let top = profiles_in(dir, kind)?;
    if top.len() <= 1 {
        let blocks = profiles_in(&dir.join(BLOCKS_DIR), kind)?;
        if blocks.len() >= 2 || (top.is_empty() && !blocks.is_empty()) {
            return Ok((blocks, true));
        }
    }
    if top.is_empty() {
        return Err(LoadError::NoProfiles { dir: dir.to_path_buf(), kind });
    }
    Ok((top, false))
}

/// Profiles of `kind` directly in `dir` (none if it does not exist), one
/// per base name, pprof preferred, sorted by name (so by time for the
/// daemon's files).
fn profiles_in(dir: &Path, kind: ProfileKind) -> Result<Vec<Candidate>, LoadError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(Vec::new()),
        Err(source) => return Err(LoadError::Io { path: dir.to_path_buf(), source }),
    };
    let mut by_base: BTreeMap<String, Candidate> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|source| LoadError::Io { path: dir.to_path_buf(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if ProfileKind::from_file_name(&name) != Some(kind) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Some(c) = candidate(&entry.path()) else { continue };
        let slot = by_base.entry(base(&name).to_owned()).or_insert_with(|| c.clone());
        if c.pprof {
            *slot = c;
        }
    }
    Ok(by_base.into_values().collect())
}

/// The kind a pprof file's sample type names, `cpu` when not one of ours.
fn pprof_kind(path: &Path) -> Result<ProfileKind, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
    let profile = pprof::read::read(&bytes)
        .map_err(|e| LoadError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    let sample_type = format!("{}/{}", profile.value_type.kind, profile.value_type.unit);
    Ok(ProfileKind::from_sample_type(&sample_type).unwrap_or(ProfileKind::Cpu))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The name without its profile suffix.
fn base(name: &str) -> &str {
    name.strip_suffix(".pb.gz")
        .or_else(|| name.strip_suffix(".pb"))
        .or_else(|| name.strip_suffix(".folded"))
        .unwrap_or(name)
}

fn candidate(path: &Path) -> Option<Candidate> {
    let name = file_name(path);
    if name.ends_with(".pb.gz") || name.ends_with(".pb") {
        Some(Candidate { path: path.to_path_buf(), pprof: true })
    } else if name.ends_with(".folded") {
        Some(Candidate { path: path.to_path_buf(), pprof: false })
    } else {
        None
    }
}

/// One file -> a repeat, its `type/unit`, and its sample count.
fn read(file: &Candidate, kind: ProfileKind) -> Result<(Repeat, String, u64), LoadError> {
    let path = &file.path;
    let io = |source| LoadError::Io { path: path.clone(), source };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(LoadError::TooLarge(path.clone()));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let corrupt = |reason: String| LoadError::Corrupt { path: path.clone(), reason };
    let (text, sample_type, samples) = if file.pprof {
        let profile = pprof::read::read(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let sample_type = format!("{}/{}", profile.value_type.kind, profile.value_type.unit);
        if let Some(found) = ProfileKind::from_sample_type(&sample_type).filter(|&k| k != kind) {
            return Err(LoadError::WrongKind { path: path.clone(), found, wanted: kind });
        }
        let samples = if profile.value_type.unit == "count" {
            profile.total()
        } else {
            profile.samples.iter().filter(|s| s.value > 0).count() as u64
        };
        (folded::encode(&profile), sample_type, samples)
    } else {
        let text = String::from_utf8(bytes).map_err(|_| corrupt("not UTF-8 text".into()))?;
        (text, kind.sample_type().to_owned(), 0)
    };
    let lines = folded::decode(&text).map_err(|e| corrupt(e.to_string()))?;
    let mut merged: BTreeMap<Vec<&str>, u64> = BTreeMap::new();
    for (frames, value) in lines {
        let slot = merged.entry(frames).or_default();
        *slot = slot.saturating_add(value);
    }
    let lines_read = merged.len() as u64;
    let stacks: Vec<(Vec<String>, u64)> = merged
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(frames, v)| (frames.into_iter().map(str::to_owned).collect(), v))
        .collect();
    let repeat = Repeat { source: path.clone(), stacks };
    let samples = match (file.pprof, kind) {
        (true, _) => samples,
        (false, ProfileKind::Cpu) => repeat.total(),
        (false, _) => lines_read,
    };
    Ok((repeat, sample_type, samples))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::testutil::on_cpu_profile;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn folded_cpu() -> String {
        folded::encode(&on_cpu_profile().0)
    }

    #[test]
    fn same_profile_in_two_formats_counts_once_and_pprof_wins() {
        let d = tempfile::tempdir().unwrap();
        let (p, _) = on_cpu_profile();
        for stamp in ["20261127T101500Z", "20261127T101510Z"] {
            write(d.path(), &format!("cpu-{stamp}.pb.gz"), &pprof::to_gzip(&p).unwrap());
            // A folded twin that would differ if it were read.
            write(d.path(), &format!("cpu-{stamp}.folded"), b"other;stack 5\n");
        }
        write(d.path(), "off-cpu-20261127T101500Z.folded", b"x;y 5\n");
        write(d.path(), "notes.txt", b"hello");
        let side = load(d.path(), None).unwrap();
        assert_eq!(side.repeats.len(), 2);
        assert!(side.repeats.iter().all(|r| r.source.to_string_lossy().ends_with(".pb.gz")));
        assert_eq!(side.sample_type, "samples/count");
        assert_eq!(side.samples, 2 * p.total());
        assert!(!side.from_blocks);
    }

    #[test]
    fn a_recording_uses_its_blocks_whether_named_by_dir_or_file() {
        let d = tempfile::tempdir().unwrap();
        let text = folded_cpu();
        write(d.path(), "cpu.folded", text.as_bytes());
        write(d.path(), "cpu.svg", b"<svg/>");
        for i in 0..3 {
            write(d.path(), &format!("blocks/cpu-2026112{i}T000000Z.folded"), text.as_bytes());
        }
        for path in [d.path().to_path_buf(), d.path().join("cpu.folded")] {
            let side = load(&path, None).unwrap();
            assert_eq!(side.repeats.len(), 3, "{}", path.display());
            assert!(side.from_blocks);
        }
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = load(&d.path().join("nope"), None).unwrap_err().to_string();
        assert!(e.contains("nope: no such file"), "{e}");

        write(d.path(), "empty/off-cpu.folded", b"a;b 1\n");
        let e = load(&d.path().join("empty"), None).unwrap_err().to_string();
        assert!(e.contains("has no cpu profiles"), "{e}");

        let one = write(d.path(), "one/cpu.folded", folded_cpu().as_bytes());
        let e = check_repeats(&load(&one, None).unwrap()).unwrap_err().to_string();
        assert!(e.contains("at least 2 repeats"), "{e}");

        write(d.path(), "corrupt/cpu-1.folded", b"a;b 1\n");
        write(d.path(), "corrupt/cpu-2.folded", b"a;b 1\nbroken line\n");
        let e = load(&d.path().join("corrupt"), None).unwrap_err().to_string();
        assert!(e.contains("cpu-2.folded is corrupt: line 2"), "{e}");

        write(d.path(), "badgz/cpu-1.pb.gz", b"\x1f\x8b\x08garbage");
        write(d.path(), "badgz/cpu-2.pb.gz", b"\x1f\x8b\x08garbage");
        let e = load(&d.path().join("badgz"), None).unwrap_err().to_string();
        assert!(e.contains("is corrupt") && e.contains("gzip"), "{e}");

        let txt = write(d.path(), "x.txt", b"");
        assert!(load(&txt, None).unwrap_err().to_string().contains("not a profile"));
    }

    #[test]
    fn mixed_sample_types_and_wrong_kinds_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (p, _) = on_cpu_profile();
        let mut alloc = p.clone();
        alloc.value_type = crate::profile::ValueType::new("alloc_space", "bytes");
        write(d.path(), "mixed/cpu-1.pb.gz", &pprof::to_gzip(&p).unwrap());
        write(d.path(), "mixed/cpu-2.pb.gz", &pprof::to_gzip(&alloc).unwrap());
        let e = load(&d.path().join("mixed"), None).unwrap_err().to_string();
        assert!(e.contains("mixed sample types") && e.contains("alloc_space/bytes"), "{e}");

        let mut off = p;
        off.value_type = crate::profile::ValueType::new("off_cpu", "nanoseconds");
        write(d.path(), "kind/cpu-1.pb.gz", &pprof::to_gzip(&off).unwrap());
        let e = load(&d.path().join("kind"), None).unwrap_err().to_string();
        assert!(e.contains("holds off-cpu data, not cpu"), "{e}");
    }

    #[test]
    fn idle_repeats_are_left_out() {
        let d = tempfile::tempdir().unwrap();
        let text = folded_cpu();
        write(d.path(), "cpu-1.folded", text.as_bytes());
        write(d.path(), "cpu-2.folded", b"");
        write(d.path(), "cpu-3.folded", text.as_bytes());
        let side = load(d.path(), None).unwrap();
        assert_eq!((side.repeats.len(), side.empty_repeats), (2, 1));
        let other = write(d.path(), "o/off-cpu.folded", text.as_bytes());
        let e = check_same_kind(&side, &load(&other, None).unwrap()).unwrap_err().to_string();
        assert!(e.contains("BEFORE holds cpu profiles and AFTER off-cpu profiles"), "{e}");
    }
}
