//! `profiler-agent diff`: is a change between two sets of profiles real,
//! or noise?
//!
//! Data flows load -> compare -> outputs:
//! - [`load`]: BEFORE and AFTER (files or directories) -> [`model::Side`]s
//!   of repeats, each a set of folded stacks (pprof is read through
//!   [`crate::export::pprof::read`], folded through [`crate::export::folded::decode`]).
//! - [`compare`]: per-repeat shares of every function -> tested changes.
//! - [`table`], [`json`], [`svg`]: the three output formats.
//!
//! # The method
//!
//! Samples within one recording are not independent (timer sampling of a
//! loop is autocorrelated, and run-to-run noise exceeds binomial noise), so
//! counts are never tested as if they were. Instead each side is a set of
//! *repeats*: separate profiles (several recordings, or the daemon's
//! intervals), or, for a single recording, its one-second time blocks,
//! which `record` writes to `blocks/`. For every function, its inclusive
//! share of each repeat's total is one observation; the shares of BEFORE
//! and AFTER are compared with Welch's unequal-variance t-test, so the
//! noise is the variation between repeats, whatever its source. The
//! p-values of all functions tested are adjusted with Holm's step-down
//! method, which bounds the chance of flagging any unchanged function at
//! alpha = 0.05 (so two profiles of the same program flag nothing 19 times
//! in 20). A change is reported when its adjusted p-value is below alpha
//! and it is at least `--min-change` points of share; functions whose
//! share is below that on both sides are not tested. The 95 % interval is
//! Welch's interval of the change, per function (not adjusted).
//!
//! Blocks of one recording share its conditions (placement, frequency,
//! other load), so they show within-run noise only: to judge changes as
//! small as run-to-run drift, compare several recordings per side.

pub mod compare;
pub mod json;
pub mod load;
pub mod model;
pub mod stats;
pub mod svg;
pub mod table;

#[cfg(test)]
mod tests;

pub use compare::compare;
pub use load::{check_repeats, check_same_kind, load, LoadError};
pub use model::{Comparison, ProfileKind, Side, METHOD};

/// Significance level of the test.
pub const ALPHA: f64 = 0.05;

/// The method in words, for the table and `--help`.
pub const METHOD_DESCRIPTION: &str = "Welch's t-test on per-repeat shares, Holm-corrected";
