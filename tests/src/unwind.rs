//! CFI unwinding: the `Unwind tables:` and `Unwinding:` lines of the agent's
//! summary, and checks (with objdump) that a workload really was built
//! without frame pointers and without tail calls.

use std::path::Path;
use std::process::Command;

use crate::agent::RECORD_TIMEOUT;
use crate::folded::{frame_is, Stack};
use crate::{spawn_record, RecordOutput, RunningAgent};

/// gcc flags of the no-frame-pointer workloads: what distributions build
/// with. Calls that must stay calls need `__attribute__((noinline))` and
/// work after the call (else -O2 turns them into jumps); check with
/// [`assert_calls`].
pub const C_NOFP_FLAGS: &[&str] = &["-O2", "-fomit-frame-pointer"];

/// The `Unwind tables:` line of the summary:
/// `Unwind tables: F files, R rows, B bytes of kernel map memory (budget X bytes), E evicted.`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnwindTables {
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    pub budget: u64,
    pub evicted: u64,
}

/// Parses the `Unwind tables:` line of the agent's stderr; None if there is
/// none or it does not have that shape.
pub fn parse_unwind_tables(stderr: &str) -> Option<UnwindTables> {
    let line = stderr.lines().find_map(|l| l.trim().strip_prefix("Unwind tables: "))?;
    // The integer right before `marker`.
    let before = |marker: &str| -> Option<u64> {
        let head = line[..line.find(marker)?].trim_end();
        let start = head.rfind(|c: char| !c.is_ascii_digit()).map_or(0, |i| i + 1);
        head[start..].parse().ok()
    };
    // The integer right after `marker`.
    let after = |marker: &str| -> Option<u64> {
        let rest = line[line.find(marker)? + marker.len()..].trim_start();
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    Some(UnwindTables {
        files: before(" files")?,
        rows: before(" rows")?,
        bytes: before(" bytes of kernel map memory")?,
        budget: after("(budget ")?,
        evicted: before(" evicted")?,
    })
}

/// The `Unwinding: ...` line of the agent's stderr (its counts), if any.
pub fn unwinding_line(stderr: &str) -> Option<&str> {
    stderr.lines().map(str::trim).find(|l| l.starts_with("Unwinding: "))
}

/// The disassembly (`objdump -d --no-show-raw-insn`, AT&T syntax) of
/// function `name` in `bin`, one instruction a line; panics if objdump fails
/// or the function is not in the symbol table.
pub fn disassemble(bin: &Path, name: &str) -> String {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "att"])
        .arg(bin)
        .output()
        .unwrap_or_else(|e| panic!("cannot run objdump: {e}"));
    assert!(out.status.success(), "objdump -d {} failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let header = format!("<{name}>:");
    let mut lines = text.lines().skip_while(|l| !l.ends_with(&header));
    assert!(lines.next().is_some(), "function {name} is not in {} (objdump -d)", bin.display());
    let body: Vec<&str> = lines.take_while(|l| !l.trim().is_empty()).collect();
    body.join("\n")
}

/// Panics unless none of `functions` in `bin` sets up a frame pointer
/// (`mov %rsp,%rbp`), i.e. a frame-pointer walk cannot find their callers.
pub fn assert_no_frame_pointer(bin: &Path, functions: &[&str]) {
    for f in functions {
        let asm = disassemble(bin, f);
        assert!(
            !asm.contains("%rsp,%rbp"),
            "{f} in {} sets up a frame pointer; the workload must be built without:\n{asm}",
            bin.display()
        );
    }
}

/// Panics unless `caller` in `bin` has a `call` (not a tail-call `jmp`) to
/// `callee` (or a compiler clone of it, `callee.constprop.0`), so `caller`
/// is a frame on the stack while `callee` runs.
pub fn assert_calls(bin: &Path, caller: &str, callee: &str) {
    let asm = disassemble(bin, caller);
    let (exact, clone) = (format!("<{callee}>"), format!("<{callee}."));
    let found = asm.lines().any(|l| l.contains("call") && (l.contains(&exact) || l.contains(&clone)));
    assert!(found, "{caller} in {} does not call {callee} (inlined or a tail call?):\n{asm}", bin.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_unwind_tables_line() {
        let stderr = "Recorded 5.0 s at 99 Hz on 2 CPUs: 495 samples from 1 processes (3 unique stacks).\n\
             Unwinding: 490 user stacks complete, 5 partly by frame pointer (0 frames outside known mappings, 5 without a table); \
             stopped early: 0 unsupported rule, 0 read fault, 0 depth limit.\n\
             Unwind tables: 4 files, 25903 rows, 310836 bytes of kernel map memory (budget 33554432 bytes), 0 evicted.\n\
             Unwind tables built: 4 for 1 processes in 12.5 ms (3.1 ms per MB of CFI); 0 files without usable CFI; 0 requests dropped.\n";
        assert_eq!(
            parse_unwind_tables(stderr),
            Some(UnwindTables { files: 4, rows: 25903, bytes: 310836, budget: 33554432, evicted: 0 })
        );
        assert!(unwinding_line(stderr).unwrap().starts_with("Unwinding: 490 user stacks complete"));
        assert_eq!(parse_unwind_tables("Unwind tables built: 4 for 1 processes\n"), None);
        assert_eq!(parse_unwind_tables("Recorded 5.0 s\n"), None);
        assert_eq!(unwinding_line("Recorded 5.0 s\n"), None);
    }
}

// Helpers of the unwinding tests (tests/tests/unwind*.rs).

pub const FREQUENCY: &str = "99";

/// The frames glibc puts between `_start` and `main`. With libc's debug
/// symbols (libc6-dbg, found through /usr/lib/debug/.build-id) the static
/// `__libc_start_call_main` (which calls main) shows; from the dynamic
/// symbols alone only `__libc_start_main` (which calls it) has a name.
pub const LIBC_START: &[&str] = &["__libc_start_call_main", "__libc_start_main", "__libc_start_main_impl"];

/// Agent arguments choosing the unwinder (`cfi` or `frame-pointer`).
pub fn unwinder(kind: &'static str) -> Vec<&'static str> {
    vec!["--unwinder", kind]
}

/// Starts `record --pid <each> --duration <secs> -F 99 --format folded <extra>`.
pub fn spawn_pids(pids: &[u32], secs: u64, extra: &[&str]) -> RunningAgent {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let duration = secs.to_string();
    let mut args: Vec<&str> = Vec::new();
    for p in &pids {
        args.extend(["--pid", p.as_str()]);
    }
    args.extend(["--duration", &duration, "--frequency", FREQUENCY, "--format", "folded"]);
    args.extend(extra);
    spawn_record(&args)
}

/// [`spawn_pids`] to completion; panics unless the agent exited with 0.
pub fn record_pids(pids: &[u32], secs: u64, extra: &[&str]) -> RecordOutput {
    let out = spawn_pids(pids, secs, extra).wait(RECORD_TIMEOUT);
    out.assert_success();
    out
}

pub fn share(part: u64, whole: u64) -> f64 {
    part as f64 / whole.max(1) as f64
}

pub fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// The outermost frame is `_start` (the entry point: nothing calls it).
pub fn outermost_is_start(s: &Stack) -> bool {
    s.functions().first().is_some_and(|f| frame_is(f, "_start"))
}

/// `_start` outermost, then one of glibc's [`LIBC_START`] frames, then
/// `inner` in order: the stack was walked all the way out of `main`.
pub fn reaches_start(s: &Stack, inner: &[&str]) -> bool {
    outermost_is_start(s)
        && LIBC_START.iter().any(|libc| {
            let mut pattern = vec!["_start", libc];
            pattern.extend_from_slice(inner);
            s.has_subsequence(&pattern)
        })
}

/// The innermost user frame is `name`.
pub fn user_leaf_is(s: &Stack, name: &str) -> bool {
    s.last_user_frame().is_some_and(|f| frame_is(f, name))
}

/// The agent's `Unwinding:` line, or a note that there is none.
pub fn unwinding(out: &RecordOutput) -> &str {
    unwinding_line(&out.stderr).unwrap_or("(no `Unwinding:` line in the agent's stderr)")
}
