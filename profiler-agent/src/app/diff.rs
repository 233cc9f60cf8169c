//! `profiler-agent diff BEFORE AFTER`, and the comparison at the end of
//! `record --compare-to`: load both sides, test, write the outputs.

use std::path::Path;

use anyhow::Context;

use crate::{
    cli::{DiffArgs, DiffFormat},
    diff::{self, json, svg, table, ProfileKind, Side},
    export::files::write_atomic,
};

/// Runs `profiler-agent diff`.
pub fn diff(args: &DiffArgs) -> anyhow::Result<()> {
    let before = load_side("BEFORE", &args.before, args.profile)?;
    let after = load_side("AFTER", &args.after, args.profile)?;
    diff::check_same_kind(&before, &after)?;
    check_repeats("BEFORE", &before)?;
    check_repeats("AFTER", &after)?;
    let comparison = diff::compare(&before, &after, diff::ALPHA, args.min_change / 100.0);
    let dir = &args.output_dir;
    if args.format.iter().any(|f| *f != DiffFormat::Table) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the output directory {}", dir.display()))?;
    }
    for format in &args.format {
        match format {
            DiffFormat::Table => print!("{}", table::render(&before, &after, &comparison)),
            DiffFormat::Json => {
                let path = dir.join("diff.json");
                write_atomic(&path, json::render(&before, &after, &comparison).as_bytes())?;
                eprintln!("Wrote {}", path.display());
            }
            DiffFormat::Svg => {
                let path = dir.join("diff.svg");
                write_atomic(&path, &svg::render(&before, &after, &comparison)?)?;
                eprintln!("Wrote {}", path.display());
            }
        }
    }
    Ok(())
}

/// Loads one side, saying which in the error.
pub fn load_side(which: &str, path: &Path, kind: Option<ProfileKind>) -> anyhow::Result<Side> {
    diff::load(path, kind).with_context(|| format!("{which} ({}) cannot be compared", path.display()))
}

pub fn check_repeats(which: &str, side: &Side) -> anyhow::Result<()> {
    diff::check_repeats(side).with_context(|| format!("{which} ({}) cannot be compared", side.path.display()))
}

/// The table comparing an earlier recording with the one just written, for
/// `record --compare-to`.
pub fn compare_recordings(before: &Side, after_dir: &Path) -> anyhow::Result<String> {
    let after = load_side("this recording", after_dir, Some(before.kind))?;
    diff::check_same_kind(before, &after)?;
    check_repeats("--compare-to", before)?;
    check_repeats("this recording", &after)?;
    let comparison = diff::compare(before, &after, diff::ALPHA, 0.01);
    Ok(table::render(before, &after, &comparison))
}
