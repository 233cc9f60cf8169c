//! Reading what `profiler-agent record` reports: its end-of-run summary lines
//! on stderr and the `cpu.folded` file it writes.

use std::{fs, path::Path};

use anyhow::{bail, Context as _, Result};

/// `Unwinding:`: how the kernel walked the user stacks (CFI runs only).
pub const UNWINDING: &str = "Unwinding: {} user stacks complete, {} partly by frame pointer ({} frames outside known \
                             mappings, {} without a table); stopped early: {} unsupported rule, {} read fault, {} \
                             depth limit.";
/// `Unwind tables:`: the kernel map memory the tables occupy at the end.
pub const TABLES: &str =
    "Unwind tables: {} files, {} rows, {} bytes of kernel map memory (budget {} bytes), {} evicted.";
/// `Unwind tables built:`: what building them cost in user space.
pub const BUILT: &str = "Unwind tables built: {} for {} processes in {} ms ({} ms per MB of CFI); {} files without \
                         usable CFI; {} too big for the budget; {} requests dropped.";
/// `Dropped:`: the runs of the sampling program that took no stack.
pub const DROPPED: &str = "Dropped: {} samples (ring buffer full: {}, aggregation table full: {}). Not sampled: {} \
                           idle, {} other processes (--pid filter).";
const BPF_TIME: &str = "BPF time per run:";
/// The sampling program, whose run time is the unwinding cost.
pub const PROGRAM: &str = "on_cpu_sample";

/// The `Unwinding:` line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Unwinding {
    pub complete: u64,
    pub partial: u64,
    pub outside_mappings: u64,
    pub without_table: u64,
    pub unsupported: u64,
    pub read_fault: u64,
    pub depth_limit: u64,
}

/// The `Unwind tables:` line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tables {
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    pub budget: u64,
    pub evicted: u64,
}

/// The `Unwind tables built:` line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Built {
    pub tables: u64,
    pub processes: u64,
    pub ms: f64,
    pub ms_per_mb: f64,
    pub without_cfi: u64,
    pub too_big: u64,
    pub dropped: u64,
}

/// The three CFI lines of one summary.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cfi {
    pub unwinding: Unwinding,
    pub tables: Tables,
    pub built: Built,
}

/// The `Dropped:` line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropped {
    /// Samples taken but lost (ring buffer or aggregation table full).
    pub samples: u64,
    /// Runs on an idle CPU, and on other processes than `--pid`'s: no stack taken.
    pub idle: u64,
    pub filtered: u64,
}

/// The `Dropped:` line of `log`.
pub fn dropped(log: &str) -> Result<Dropped> {
    let d = parse_line(log, DROPPED)?;
    Ok(Dropped { samples: d[0] as u64, idle: d[3] as u64, filtered: d[4] as u64 })
}

/// One program's part of the `BPF time per run:` line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunTime {
    pub ns_per_run: u64,
    pub runs: u64,
}

/// `on_cpu_sample`'s run time from the `BPF time per run:` line of `log`.
pub fn sample_run_time(log: &str) -> Result<RunTime> {
    let Some(line) = find_line(log, BPF_TIME) else {
        bail!(
            "the agent printed no `{BPF_TIME}` line, so the kernel's BPF statistics were off during the run \
             (did something write 0 to kernel.bpf_stats_enabled?); its output:\n{}",
            tail(log)
        );
    };
    let items = line[BPF_TIME.len()..].trim().trim_end_matches('.');
    let Some(item) = items.split(", ").find(|i| i.split_whitespace().next() == Some(PROGRAM)) else {
        bail!("the agent's line {line:?} has no figure for {PROGRAM}; expected `{PROGRAM} <ns> ns x <runs>` in it");
    };
    let n = numbers(item, &format!("{PROGRAM} {{}} ns x {{}}"))
        .with_context(|| format!("cannot parse {item:?} in the agent's line {line:?}"))?;
    Ok(RunTime { ns_per_run: n[0] as u64, runs: n[1] as u64 })
}

/// The `Unwinding:`, `Unwind tables:` and `Unwind tables built:` lines of `log`.
pub fn cfi_lines(log: &str) -> Result<Cfi> {
    let u = parse_line(log, UNWINDING)?;
    let t = parse_line(log, TABLES)?;
    let b = parse_line(log, BUILT)?;
    let int = |v: f64| v as u64;
    Ok(Cfi {
        unwinding: Unwinding {
            complete: int(u[0]),
            partial: int(u[1]),
            outside_mappings: int(u[2]),
            without_table: int(u[3]),
            unsupported: int(u[4]),
            read_fault: int(u[5]),
            depth_limit: int(u[6]),
        },
        tables: Tables { files: int(t[0]), rows: int(t[1]), bytes: int(t[2]), budget: int(t[3]), evicted: int(t[4]) },
        built: Built {
            tables: int(b[0]),
            processes: int(b[1]),
            ms: b[2],
            ms_per_mb: b[3],
            without_cfi: int(b[4]),
            too_big: int(b[5]),
            dropped: int(b[6]),
        },
    })
}

/// The numbers of the line of `log` that `template` describes (found by the
/// text up to its first `:`).
fn parse_line(log: &str, template: &str) -> Result<Vec<f64>> {
    let key = &template[..template.find(':').map_or(template.len(), |i| i + 1)];
    let Some(line) = find_line(log, key) else {
        bail!("the agent printed no `{key}` line (expected: {template:?}); its output:\n{}", tail(log));
    };
    numbers(line, template).with_context(|| format!("cannot parse the agent's line {line:?}; expected {template:?}"))
}

/// The first line of `log` containing `key`, from `key` on (so a log prefix
/// before it does not matter).
fn find_line<'a>(log: &'a str, key: &str) -> Option<&'a str> {
    log.lines().find_map(|l| l.find(key).map(|i| l[i..].trim_end()))
}

/// The numbers at the `{}`s of `template` in `line`, whose other text must
/// match `template` exactly.
pub fn numbers(line: &str, template: &str) -> Result<Vec<f64>> {
    let mut pieces = template.split("{}");
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = line.strip_prefix(first) else {
        bail!("it does not start with {first:?}");
    };
    let mut out = Vec::new();
    for piece in pieces {
        let (number, after) = if piece.is_empty() {
            (rest, "")
        } else {
            match rest.find(piece) {
                Some(i) => (&rest[..i], &rest[i + piece.len()..]),
                None => bail!("{:?} is missing after {} number(s)", piece, out.len()),
            }
        };
        let value: f64 = number.trim().parse().map_err(|_| {
            anyhow::anyhow!("{number:?} (number {} of the line, before {piece:?}) is not a number", out.len() + 1)
        })?;
        out.push(value);
        rest = after;
    }
    if !rest.trim().is_empty() {
        bail!("unexpected text at its end: {rest:?}");
    }
    Ok(out)
}

/// The last 20 lines of `log`.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Samples and user-stack depths of a folded file.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Depth {
    pub samples: u64,
    /// User frames per sample, weighted by sample count.
    pub mean: f64,
    pub max: usize,
    /// Samples with at least `min` user frames (the `min` given to `depth`).
    pub deep: u64,
}

/// User-stack depth in `cpu.folded` (`process;outer;...;leaf COUNT` lines):
/// the frames after the process name that are neither kernel (`_[k]`) nor
/// inlined (`_[i]`, not a frame the unwinder walked).
pub fn depth(folded: &str, min: usize) -> Result<Depth> {
    let mut d = Depth::default();
    let mut frames_total = 0u64;
    for line in folded.lines().filter(|l| !l.trim().is_empty()) {
        let parsed = line.rsplit_once(' ').and_then(|(stack, n)| Some((stack, n.parse::<u64>().ok()?)));
        let Some((stack, count)) = parsed else {
            bail!("cannot parse the folded line {line:?}: expected `process;outer;...;leaf COUNT`");
        };
        let user = stack.split(';').skip(1).filter(|f| !f.ends_with("_[k]") && !f.ends_with("_[i]")).count();
        d.samples += count;
        frames_total += user as u64 * count;
        d.max = d.max.max(user);
        if user >= min {
            d.deep += count;
        }
    }
    if d.samples > 0 {
        d.mean = frames_total as f64 / d.samples as f64;
    }
    Ok(d)
}

/// `depth` of `dir/cpu.folded`.
pub fn folded_depth(dir: &Path, min: usize) -> Result<Depth> {
    let path = dir.join("cpu.folded");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}, which `record --format folded` writes", path.display()))?;
    depth(&text, min).with_context(|| format!("in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "Recorded 5.0 s at 99 Hz on 2 CPUs: 990 samples from 1 processes (12 unique stacks).\n\
        Dropped: 5 samples (ring buffer full: 5, aggregation table full: 0). Not sampled: 1 idle, 671 other \
        processes (--pid filter).\n\
        Unwinding: 980 user stacks complete, 10 partly by frame pointer (3 frames outside known mappings, 7 without \
        a table); stopped early: 0 unsupported rule, 1 read fault, 2 depth limit.\n\
        Unwind tables: 3 files, 41234 rows, 659744 bytes of kernel map memory (budget 33554432 bytes), 0 evicted.\n\
        Unwind tables built: 3 for 1 processes in 4.2 ms (13.5 ms per MB of CFI); 1 files without usable CFI; 0 \
        too big for the budget; 0 requests dropped.\n\
        BPF time per run: on_cpu_sample 4213 ns x 991, sched_process_exec 300 ns x 2.\n\
        Wrote /tmp/x/cpu.folded\n";

    #[test]
    fn parses_the_cfi_lines() {
        let cfi = cfi_lines(LOG).unwrap();
        assert_eq!(
            cfi.unwinding,
            Unwinding {
                complete: 980,
                partial: 10,
                outside_mappings: 3,
                without_table: 7,
                unsupported: 0,
                read_fault: 1,
                depth_limit: 2
            }
        );
        assert_eq!(cfi.tables, Tables { files: 3, rows: 41234, bytes: 659744, budget: 33554432, evicted: 0 });
        assert_eq!(cfi.built.tables, 3);
        assert_eq!(cfi.built.processes, 1);
        assert!((cfi.built.ms - 4.2).abs() < 1e-9 && (cfi.built.ms_per_mb - 13.5).abs() < 1e-9);
        assert_eq!((cfi.built.without_cfi, cfi.built.dropped), (1, 0));
    }

    #[test]
    fn parses_the_dropped_line() {
        assert_eq!(dropped(LOG).unwrap(), Dropped { samples: 5, idle: 1, filtered: 671 });
    }

    #[test]
    fn parses_the_bpf_line() {
        assert_eq!(sample_run_time(LOG).unwrap(), RunTime { ns_per_run: 4213, runs: 991 });
        let only = "BPF time per run: on_cpu_sample 812 ns x 1000.\n";
        assert_eq!(sample_run_time(only).unwrap(), RunTime { ns_per_run: 812, runs: 1000 });
    }

    #[test]
    fn missing_or_changed_lines_are_errors_not_panics() {
        let e = cfi_lines("Recorded 1.0 s\nWrote x\n").unwrap_err().to_string();
        assert!(e.contains("no `Unwinding:` line"), "{e}");
        let changed = LOG.replace("rows", "entries");
        let e = format!("{:#}", cfi_lines(&changed).unwrap_err());
        assert!(e.contains("cannot parse the agent's line \"Unwind tables:"), "{e}");
        let e = format!("{:#}", cfi_lines(&LOG.replace("41234", "many")).unwrap_err());
        assert!(e.contains("\"many\""), "{e}");
        let e = sample_run_time("Wrote x\n").unwrap_err().to_string();
        assert!(e.contains("BPF statistics were off"), "{e}");
        let e = sample_run_time("BPF time per run: sched_switch 1 ns x 2.\n").unwrap_err().to_string();
        assert!(e.contains("no figure for on_cpu_sample"), "{e}");
        assert!(numbers("a 1 b 2 c", "a {} b {}").is_err());
        assert_eq!(numbers("x: 1.5, 2", "x: {}, {}").unwrap(), vec![1.5, 2.0]);
    }

    #[test]
    fn counts_user_frames() {
        let folded = "deep;clone3;start_thread;worker;f;g 3\n\
                      deep;clone3;start_thread;worker;f;g;h;asm_sysvec_apic_timer_interrupt_[k] 1\n\
                      deep;main;inl_[i] 0\n";
        let d = depth(folded, 6).unwrap();
        assert_eq!(d.samples, 4);
        assert_eq!(d.max, 6);
        assert_eq!(d.deep, 1);
        assert!((d.mean - (5.0 * 3.0 + 6.0) / 4.0).abs() < 1e-9, "{}", d.mean);
        assert!(depth("garbage\n", 1).is_err());
        assert_eq!(depth("", 1).unwrap(), Depth::default());
    }
}
