//! Folded ("collapsed") stacks: one line per unique stack,
//! `process;outermost;...;leaf VALUE`.
//!
//! This is the format of Brendan Gregg's `stackcollapse-*` scripts, read by
//! `flamegraph.pl`, inferno, speedscope and friends. Kernel frames carry the
//! `_[k]` suffix and inlined frames `_[i]`, which those tools colour
//! differently.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::profile::{Frame, FrameKind, Profile};

/// Stand-in for names that are empty or frame indices that point nowhere:
/// an empty field would make the line ambiguous for some parsers, and an
/// exporter should degrade rather than panic on a malformed profile.
const UNKNOWN: &str = "[unknown]";

/// Encodes `profile` as folded stacks, one `\n`-terminated line per unique
/// `(process name, frame names)` stack.
///
/// Samples of different pids/tids with the same process name collapse onto
/// one line, with values summed. Zero-value samples are skipped. Lines are
/// sorted, so equal profiles encode to identical text.
pub fn encode(profile: &Profile) -> String {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    let mut key = String::new();
    for sample in profile.samples.iter().filter(|s| s.value > 0) {
        key.clear();
        push_name(&mut key, &sample.process_name);
        for &index in sample.frames.iter().rev() {
            key.push(';');
            match profile.frames.get(index) {
                Some(frame) => push_frame(&mut key, frame),
                None => key.push_str(UNKNOWN),
            }
        }
        // Look up by &str first so the common case (stack already seen)
        // does not allocate a new key.
        match stacks.get_mut(key.as_str()) {
            Some(total) => *total = total.saturating_add(sample.value),
            None => {
                stacks.insert(key.clone(), sample.value);
            }
        }
    }

    let mut out = String::new();
    for (stack, value) in &stacks {
        // Writing into a String cannot fail.
        let _ = writeln!(out, "{stack} {value}");
    }
    out
}

/// Appends the folded name of `frame`: its function name plus the kind
/// suffix.
fn push_frame(out: &mut String, frame: &Frame) {
    push_name(out, &frame.function);
    match frame.kind {
        FrameKind::Kernel => out.push_str("_[k]"),
        FrameKind::Inlined => out.push_str("_[i]"),
        FrameKind::User | FrameKind::Python { .. } => {}
        FrameKind::Jit(_) => {
            // The runtime's own names carry the location (V8's `JS:*f
            // file:line:col`); keep it, so flame graphs tell apart
            // functions of the same name.
            if let Some(file) = &frame.file {
                out.push(' ');
                push_name(out, file);
                if let Some(line) = frame.line {
                    let _ = write!(out, ":{line}");
                }
            }
            out.push_str("_[j]");
        }
    }
}

/// Appends `name` with the characters that would break the line structure
/// replaced: `;` separates frames and a newline ends the record. Other
/// whitespace (tabs, `\r`) becomes a plain space so the value stays the
/// token after the last space. Spaces are kept; C++ and Rust names have them.
fn push_name(out: &mut String, name: &str) {
    if name.is_empty() {
        out.push_str(UNKNOWN);
        return;
    }
    out.extend(name.chars().map(|c| match c {
        ';' => ':',
        c if c.is_whitespace() => ' ',
        c => c,
    }));
}

/// A line of folded text that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct DecodeError {
    /// 1-based line number.
    pub line: usize,
    pub reason: &'static str,
}

/// Parses folded stacks, as [`encode`] (or any `stackcollapse-*` script)
/// writes them: `outermost;...;leaf COUNT` per line. Blank lines and `# `
/// comments are skipped; lines are returned in order, not merged.
///
/// # Errors
///
/// The first line without a count after its last space, with a count that
/// is not an unsigned integer, or with an empty frame name.
pub fn decode(text: &str) -> Result<Vec<(Vec<&str>, u64)>, DecodeError> {
    let mut stacks = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |reason| DecodeError { line: n + 1, reason };
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let parsed = line.rsplit_once(' ').and_then(|(stack, count)| Some((stack, count.parse::<u64>().ok()?)));
        // A `# ` line is a comment unless it is a stack: a process may be
        // named `#` (the first frame is its comm), and `# 1` is then its
        // one-frame stack.
        if parsed.is_none() && line.starts_with("# ") {
            continue;
        }
        let (stack, _) = line.rsplit_once(' ').ok_or_else(|| err("expected `frame;frame;... COUNT`"))?;
        let (_, count) = parsed.ok_or_else(|| err("the count after the last space is not an unsigned integer"))?;
        let frames: Vec<&str> = stack.split(';').collect();
        if frames.iter().any(|f| f.is_empty()) {
            return Err(err("empty frame name"));
        }
        stacks.push((frames, count));
    }
    Ok(stacks)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::export::testutil::{frame, on_cpu_profile, sample};
    use crate::profile::ValueType;

    fn empty() -> Profile {
        Profile::new(ValueType::new("samples", "count"), None, 0, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn jit_frames_carry_their_location_and_suffix() {
        let mut p = empty();
        let jit = crate::profile::FrameKind::Jit(crate::profile::JitRuntime::V8);
        p.frames = vec![
            Frame { file: Some("/srv/w.js".into()), line: Some(3), ..frame("JS:*hot", jit, None, 0x10) },
            frame("LWork;::spin", jit, None, 0x20),
        ];
        p.samples = vec![sample(1, 1, "p", "p", vec![0, 1], 1)];
        assert_eq!(encode(&p), "p;LWork:::spin_[j];JS:*hot /srv/w.js:3_[j] 1\n");
    }

    #[test]
    fn fixture_encodes_outermost_first_with_suffixes_and_sorted() {
        let (p, _) = on_cpu_profile();
        assert_eq!(
            encode(&p),
            "app;main;[unknown] 1\n\
             app;main;outer;mid_inline_[i];inner_inline_[i] 3\n\
             app;main;worker_loop;libc.so.6+0x1234;do_syscall_64_[k] 2\n"
        );
    }

    #[test]
    fn same_process_name_merges_across_pids_and_tids() {
        let mut p = empty();
        p.frames = vec![frame("a", FrameKind::User, None, 0), frame("b", FrameKind::User, None, 0)];
        p.samples = vec![
            sample(1, 1, "nginx", "nginx", vec![1, 0], 2),
            sample(1, 2, "nginx", "worker", vec![1, 0], 3),
            sample(7, 7, "nginx", "nginx", vec![1, 0], 5),
            sample(8, 8, "curl", "curl", vec![1, 0], 1),
            sample(8, 8, "curl", "curl", vec![0], 4),
        ];
        assert_eq!(encode(&p), "curl;a 4\ncurl;a;b 1\nnginx;a;b 10\n");
    }

    #[test]
    fn identical_names_from_distinct_frames_merge() {
        // Two interned frames that differ only in address fold to the same
        // name, so their stacks are one line.
        let mut p = empty();
        p.frames = vec![frame("f", FrameKind::User, None, 1), frame("f", FrameKind::User, None, 2)];
        p.samples = vec![sample(1, 1, "p", "p", vec![0], 1), sample(1, 1, "p", "p", vec![1], 1)];
        assert_eq!(encode(&p), "p;f 2\n");
    }

    #[test]
    fn names_are_sanitized_so_every_line_parses() {
        let mut p = empty();
        p.frames = vec![
            frame("core::ptr::drop<[u8; 8]>", FrameKind::User, None, 0),
            frame("evil\nname\twith\r\nbreaks", FrameKind::Inlined, None, 0),
            frame("", FrameKind::User, None, 0),
        ];
        p.samples = vec![sample(1, 1, "my proc;x", "t", vec![1, 0, 2, 99], 7)];
        let text = encode(&p);
        assert_eq!(text, "my proc:x;[unknown];[unknown];core::ptr::drop<[u8: 8]>;evil name with  breaks_[i] 7\n");
        for line in text.lines() {
            let (stack, value) = line.rsplit_once(' ').expect("value separator");
            assert_eq!(value.parse::<u64>().expect("numeric value"), 7);
            assert_eq!(stack.split(';').count(), 5);
        }
    }

    #[test]
    fn zero_values_and_empty_profiles_produce_nothing() {
        let mut p = empty();
        assert_eq!(encode(&p), "");
        p.frames = vec![frame("a", FrameKind::User, None, 0)];
        p.samples = vec![sample(1, 1, "p", "p", vec![0], 0)];
        assert_eq!(encode(&p), "");
    }

    #[test]
    fn stack_without_frames_is_just_the_process() {
        let mut p = empty();
        p.samples = vec![sample(1, 1, "idle", "idle", vec![], 9)];
        assert_eq!(encode(&p), "idle 9\n");
    }

    #[test]
    fn decode_reads_what_encode_writes() {
        let (p, _) = on_cpu_profile();
        let text = encode(&p);
        let stacks = decode(&text).unwrap();
        assert_eq!(stacks.len(), 3);
        assert_eq!(stacks[1], (vec!["app", "main", "outer", "mid_inline_[i]", "inner_inline_[i]"], 3));
        assert_eq!(decode("# comment\n\na;b 2\r\nc 0\n").unwrap(), vec![(vec!["a", "b"], 2), (vec!["c"], 0)]);
        assert_eq!(decode("# 1\n").unwrap(), vec![(vec!["#"], 1)], "a process named `#`");
        assert_eq!(decode("std::vec<T; 4> x 5\n").unwrap(), vec![(vec!["std::vec<T", " 4> x"], 5)]);
    }

    #[test]
    fn decode_rejects_malformed_lines_naming_them() {
        assert_eq!(decode("a;b 1\nnocount\n").unwrap_err().line, 2);
        assert!(decode("a;b x\n").unwrap_err().to_string().contains("line 1"));
        assert!(decode("a;b -3\n").is_err());
        assert!(decode("a;;b 3\n").is_err());
        assert!(decode(" 3\n").is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(s in "\\PC*") {
            let _ = decode(&s);
        }

        #[test]
        fn decode_round_trips_encoded_names(names in proptest::collection::vec("[^;\\s]{1,12}", 1..6), count in 1u64..u64::MAX) {
            let line = format!("{} {count}\n", names.join(";"));
            let stacks = decode(&line).unwrap();
            proptest::prop_assert_eq!(stacks, vec![(names.iter().map(String::as_str).collect::<Vec<_>>(), count)]);
        }
    }
}
