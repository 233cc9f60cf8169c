//! What a comparison is made of: two sides of repeats, and its result.

use std::path::PathBuf;

/// Which profile of a recording is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ProfileKind {
    /// On-CPU samples (`cpu.pb.gz`, `cpu.folded`, `cpu-<time>.*`).
    Cpu,
    /// Off-CPU nanoseconds (`off-cpu.pb.gz`, `off-cpu.folded`, `off-cpu-<time>.*`).
    OffCpu,
    /// Per-thread wall-clock nanoseconds (`wall.folded`).
    Wall,
}

impl ProfileKind {
    /// The file stem `record` and the daemon write this kind under.
    pub fn stem(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::OffCpu => "off-cpu",
            Self::Wall => "wall",
        }
    }

    /// The pprof sample type (type/unit) our writers give this kind.
    pub fn sample_type(self) -> &'static str {
        match self {
            Self::Cpu => "samples/count",
            Self::OffCpu => "off_cpu/nanoseconds",
            Self::Wall => "wall/nanoseconds",
        }
    }

    /// The kind whose pprof sample type is `sample_type`, if one of ours.
    pub fn from_sample_type(sample_type: &str) -> Option<Self> {
        [Self::Cpu, Self::OffCpu, Self::Wall].into_iter().find(|k| k.sample_type() == sample_type)
    }

    /// The kind a file name says (`cpu.folded`, `off-cpu-20261127T101500Z.pb.gz`).
    pub fn from_file_name(name: &str) -> Option<Self> {
        // `off-cpu` first: `cpu` is not its prefix, but keep the longest match first anyway.
        [Self::OffCpu, Self::Cpu, Self::Wall]
            .into_iter()
            .find(|k| name.strip_prefix(k.stem()).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-')))
    }
}

impl std::fmt::Display for ProfileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.stem())
    }
}

/// One repeat of one side: a profile, or one time block of a recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repeat {
    /// The file it was read from.
    pub source: PathBuf,
    /// Folded stacks: process name first, then outermost to leaf, with values.
    pub stacks: Vec<(Vec<String>, u64)>,
}

impl Repeat {
    /// Sum of the values.
    pub fn total(&self) -> u64 {
        self.stacks.iter().map(|(_, v)| *v).fold(0, u64::saturating_add)
    }
}

/// Everything read for BEFORE or AFTER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// What the user named.
    pub path: PathBuf,
    pub kind: ProfileKind,
    /// `type/unit` of the values, e.g. `samples/count`.
    pub sample_type: String,
    /// Samples taken (on-CPU counts; for measured values, the stacks read).
    pub samples: u64,
    /// Whether the repeats are the time blocks of one recording.
    pub from_blocks: bool,
    pub repeats: Vec<Repeat>,
    /// Repeats left out because they hold no value at all (an idle block).
    pub empty_repeats: usize,
}

impl Side {
    /// Sum of the values over all repeats.
    pub fn total(&self) -> u64 {
        self.repeats.iter().map(Repeat::total).fold(0, u64::saturating_add)
    }
}

/// Which way a function moved, when the change is significant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
    None,
}

/// The comparison of one function.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionChange {
    /// As in folded stacks: kernel frames end in `_[k]`, inlined in `_[i]`.
    pub name: String,
    /// Mean share of the side's value in stacks containing the function.
    pub total_before: f64,
    pub total_after: f64,
    /// Mean share in stacks where it is the leaf.
    pub self_before: f64,
    pub self_after: f64,
    /// `total_after - total_before`.
    pub delta: f64,
    /// 95 % confidence interval of `delta` (Welch), not adjusted for multiplicity.
    pub ci95: (f64, f64),
    /// Holm-adjusted p-value of `delta != 0`.
    pub p_value: f64,
    /// `p_value < alpha` and `|delta| >= min_change`.
    pub significant: bool,
    pub direction: Direction,
}

/// The result of a comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// Every function tested, largest `|delta|` first.
    pub functions: Vec<FunctionChange>,
    /// Functions seen but not tested: their share is below `min_change` on
    /// both sides, so no change of theirs could be reported.
    pub untested: usize,
    pub alpha: f64,
    /// Practical threshold, as a fraction (0.01 = 1 point of share).
    pub min_change: f64,
}

impl Comparison {
    /// The functions reported as changed.
    pub fn significant(&self) -> impl Iterator<Item = &FunctionChange> {
        self.functions.iter().filter(|f| f.significant)
    }
}

/// The name of the method, as `--help`, the docs and `diff.json` give it.
pub const METHOD: &str = "welch-t-per-repeat-shares-holm";
