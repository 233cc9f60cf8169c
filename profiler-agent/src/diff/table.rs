//! The `table` format: what changed, biggest first, for a terminal.

use std::fmt::Write as _;

use super::model::{Comparison, Direction, Side};
use super::METHOD_DESCRIPTION;

/// Renders the changed functions and the closing count line.
pub fn render(before: &Side, after: &Side, c: &Comparison) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} profiles: BEFORE {}; AFTER {}", before.kind, describe(before), describe(after));
    let changed: Vec<_> = c.significant().collect();
    if !changed.is_empty() {
        let _ =
            writeln!(out, "{:>7} {:>7} {:>7} {:>7} {:>10}  {:<18} {:<7} function", "total", "", "self", "", "", "", "");
        let _ = writeln!(
            out,
            "{:>7} {:>7} {:>7} {:>7} {:>10}  {:<18} {:<7} ",
            "before", "after", "before", "after", "change", "95% interval", "verdict"
        );
        for f in &changed {
            let verdict = match f.direction {
                Direction::Up => "grew",
                Direction::Down => "shrank",
                Direction::None => "same",
            };
            let _ = writeln!(
                out,
                "{:>7} {:>7} {:>7} {:>7} {:>+6.1} pts  {:<18} {:<7} {}",
                pct(f.total_before),
                pct(f.total_after),
                pct(f.self_before),
                pct(f.self_after),
                f.delta * 100.0,
                format!("[{:+.1}, {:+.1}]", f.ci95.0 * 100.0, f.ci95.1 * 100.0),
                verdict,
                f.name
            );
        }
    }
    let compared = c.functions.len();
    let _ = write!(
        out,
        "{} of {compared} functions compared changed significantly ({METHOD_DESCRIPTION}, alpha {}, \
         --min-change {:.1} points); the other {} did not change significantly.",
        changed.len(),
        c.alpha,
        c.min_change * 100.0,
        compared - changed.len(),
    );
    if c.untested > 0 {
        let _ =
            write!(out, " {} more were under {:.1} % on both sides and not tested.", c.untested, c.min_change * 100.0);
    }
    out.push('\n');
    out
}

fn pct(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// "10 time blocks of one recording, 990 samples".
pub fn describe(side: &Side) -> String {
    let n = side.repeats.len();
    let what = if side.from_blocks { format!("{n} time blocks of one recording") } else { format!("{n} profiles") };
    let empty = match side.empty_repeats {
        0 => String::new(),
        e => format!(" ({e} empty left out)"),
    };
    let unit = side.sample_type.split('/').nth(1).unwrap_or("");
    if unit == "count" {
        format!("{what}{empty}, {} samples", side.samples)
    } else {
        format!("{what}{empty}, {} {unit}", side.total())
    }
}
