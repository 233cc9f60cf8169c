//! Parsing and querying `cpu.folded`: one line per unique stack,
//! `process;outermost;...;leaf COUNT`.

use std::collections::BTreeSet;

/// Suffix of kernel frames.
pub const KERNEL_SUFFIX: &str = "_[k]";
/// Suffix of inlined frames.
pub const INLINED_SUFFIX: &str = "_[i]";
/// Suffix of JIT frames named from a perf map or jitdump.
pub const JIT_SUFFIX: &str = "_[j]";

/// One line of `cpu.folded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    /// Process name first, then outermost to innermost (leaf) frame.
    pub frames: Vec<String>,
    pub count: u64,
}

impl Stack {
    pub fn process(&self) -> &str {
        &self.frames[0]
    }

    /// The function frames (everything after the process name).
    pub fn functions(&self) -> &[String] {
        &self.frames[1..]
    }

    /// The innermost frame (the process name if there are no frames).
    pub fn leaf(&self) -> &str {
        self.frames.last().expect("non-empty stack")
    }

    /// True if the function frames contain frames matching `pattern`, in order
    /// (not necessarily adjacent); see [`frame_is`].
    pub fn has_subsequence(&self, pattern: &[&str]) -> bool {
        let mut want = pattern.iter().peekable();
        for frame in self.functions() {
            match want.peek() {
                Some(name) if frame_is(frame, name) => {
                    want.next();
                }
                Some(_) => {}
                None => break,
            }
        }
        want.peek().is_none()
    }

    pub fn has_kernel_frames(&self) -> bool {
        self.functions().iter().any(|f| is_kernel(f))
    }

    /// The innermost frame that is not a kernel frame (None if there is none).
    pub fn last_user_frame(&self) -> Option<&str> {
        self.functions().iter().rev().map(String::as_str).find(|f| !is_kernel(f))
    }

    /// True if no user frame follows a kernel frame, i.e. the kernel frames
    /// (if any) are the innermost part of the stack.
    pub fn kernel_frames_innermost(&self) -> bool {
        let first_kernel = self.functions().iter().position(|f| is_kernel(f));
        match first_kernel {
            Some(i) => self.functions()[i..].iter().all(|f| is_kernel(f)),
            None => true,
        }
    }

    /// The line as written in `cpu.folded`.
    pub fn line(&self) -> String {
        format!("{} {}", self.frames.join(";"), self.count)
    }
}

/// The parsed contents of `cpu.folded`.
#[derive(Debug, Clone, Default)]
pub struct Folded {
    pub stacks: Vec<Stack>,
}

/// Parses `cpu.folded`, panicking on malformed lines.
pub fn parse_folded(text: &str) -> Folded {
    let mut stacks = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (stack, count) =
            line.rsplit_once(' ').unwrap_or_else(|| panic!("cpu.folded line {}: no count: {line:?}", n + 1));
        let count: u64 =
            count.parse().unwrap_or_else(|e| panic!("cpu.folded line {}: bad count ({e}): {line:?}", n + 1));
        let frames: Vec<String> = stack.split(';').map(str::to_string).collect();
        assert!(!frames[0].is_empty(), "cpu.folded line {}: empty process name: {line:?}", n + 1);
        stacks.push(Stack { frames, count });
    }
    Folded { stacks }
}

impl Folded {
    /// As `(frames, count)` pairs, process name first in each frame list.
    pub fn pairs(&self) -> Vec<(Vec<String>, u64)> {
        self.stacks.iter().map(|s| (s.frames.clone(), s.count)).collect()
    }

    pub fn total(&self) -> u64 {
        self.stacks.iter().map(|s| s.count).sum()
    }

    /// Only the stacks of process `name`.
    pub fn process(&self, name: &str) -> Folded {
        self.filter(|s| s.process() == name)
    }

    pub fn processes(&self) -> BTreeSet<String> {
        self.stacks.iter().map(|s| s.process().to_string()).collect()
    }

    pub fn filter(&self, keep: impl Fn(&Stack) -> bool) -> Folded {
        Folded { stacks: self.stacks.iter().filter(|s| keep(s)).cloned().collect() }
    }

    /// Sum of the counts of the stacks for which `pred` holds.
    pub fn count_where(&self, pred: impl Fn(&Stack) -> bool) -> u64 {
        self.stacks.iter().filter(|s| pred(s)).map(|s| s.count).sum()
    }

    /// Samples whose stack contains frames matching `pattern` in order.
    pub fn count_with_subsequence(&self, pattern: &[&str]) -> u64 {
        self.count_where(|s| s.has_subsequence(pattern))
    }

    /// Samples whose innermost frame matches `name` (see [`frame_is`]).
    pub fn count_with_leaf(&self, name: &str) -> u64 {
        self.count_where(|s| frame_is(s.leaf(), name))
    }

    /// Samples with `name` (see [`frame_is`]) anywhere in the stack.
    pub fn count_with_frame(&self, name: &str) -> u64 {
        self.count_where(|s| s.functions().iter().any(|f| frame_is(f, name)))
    }

    /// Every distinct function frame (process names excluded).
    pub fn function_names(&self) -> BTreeSet<&str> {
        self.stacks.iter().flat_map(|s| s.functions().iter().map(String::as_str)).collect()
    }

    /// The `max` heaviest lines, for assertion messages.
    pub fn top(&self, max: usize) -> String {
        let mut stacks: Vec<&Stack> = self.stacks.iter().collect();
        stacks.sort_by_key(|s| std::cmp::Reverse(s.count));
        let mut out = String::new();
        for s in stacks.iter().take(max) {
            out.push_str(&s.line());
            out.push('\n');
        }
        if stacks.len() > max {
            out.push_str(&format!("... ({} more lines)\n", stacks.len() - max));
        }
        out
    }
}

/// The frame name without its `_[k]` / `_[i]` / `_[j]` suffix.
pub fn base_name(frame: &str) -> &str {
    frame
        .strip_suffix(KERNEL_SUFFIX)
        .or_else(|| frame.strip_suffix(INLINED_SUFFIX))
        .or_else(|| frame.strip_suffix(JIT_SUFFIX))
        .unwrap_or(frame)
}

pub fn is_jit(frame: &str) -> bool {
    frame.ends_with(JIT_SUFFIX)
}

pub fn is_kernel(frame: &str) -> bool {
    frame.ends_with(KERNEL_SUFFIX)
}

pub fn is_inlined(frame: &str) -> bool {
    frame.ends_with(INLINED_SUFFIX)
}

/// True if `frame` is function `name`: equal once the `_[k]`/`_[i]` suffix is
/// removed, also accepting compiler clones such as `name.constprop.0`.
pub fn frame_is(frame: &str, name: &str) -> bool {
    let base = base_name(frame);
    base == name || base.strip_prefix(name).is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_queries() {
        let f = parse_folded(
            "app;main;middle;leaf_alpha 30\napp;main;middle;leaf_beta.isra.0 10\n\
             other proc;main;do_x;entry_SYSCALL_64_[k];x_[k] 5\n",
        );
        assert_eq!(f.total(), 45);
        assert_eq!(f.process("app").total(), 40);
        assert_eq!(f.processes().len(), 2);
        assert_eq!(f.count_with_subsequence(&["main", "leaf_alpha"]), 30);
        assert_eq!(f.count_with_subsequence(&["leaf_alpha", "main"]), 0);
        assert_eq!(f.count_with_leaf("leaf_beta"), 10);
        assert_eq!(f.count_with_frame("x"), 5);
        assert!(f.stacks[2].has_kernel_frames());
        assert!(f.stacks[2].kernel_frames_innermost());
        assert_eq!(f.stacks[2].last_user_frame(), Some("do_x"));
        let bad = parse_folded("p;main;k_[k];user 1\n");
        assert!(!bad.stacks[0].kernel_frames_innermost());
        assert_eq!(f.stacks[2].process(), "other proc");
        assert_eq!(f.pairs()[0].0[0], "app");
    }
}
