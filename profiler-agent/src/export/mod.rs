//! Exporters: each turns a symbolized [`crate::profile::Profile`] into one
//! output format. They depend on the profile model only.
//!
//! - [`folded`]: Brendan Gregg's collapsed-stack text (`proc;outer;leaf 42`),
//!   the lingua franca of flame graph tools.
//! - [`pprof`]: google/pprof `profile.proto`, plain or gzipped.
//! - [`svg`]: an interactive flame graph rendered from folded text.
//! - [`files`]: atomic file replacement, so whoever watches the output
//!   directory never reads a half-written profile.

use std::io;
use std::path::PathBuf;

pub mod files;
pub mod folded;
pub mod otlp;
pub mod otlp_metrics;
pub mod pprof;
pub mod pyroscope;
pub mod rolling;
pub mod svg;
pub mod workload;

#[cfg(test)]
pub(crate) mod testutil;

/// Why an export failed.
///
/// Variants carry the path involved so a log line is actionable without the
/// caller having to add context; the underlying I/O error is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The target path has no file name (e.g. `/` or `..`), so there is no
    /// sibling temporary file to write first.
    #[error("cannot write to {}: path has no file name", .path.display())]
    NoFileName { path: PathBuf },

    /// Creating the temporary file next to the target failed.
    #[error("failed to create temporary file {}", .path.display())]
    CreateTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Writing or flushing the temporary file failed.
    #[error("failed to write temporary file {}", .path.display())]
    WriteTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Moving the finished temporary file over the target failed.
    #[error("failed to rename {} to {}", .from.display(), .to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Gzip-compressing the encoded pprof profile failed.
    #[error("failed to gzip-compress pprof profile")]
    Gzip(#[source] io::Error),

    /// inferno could not render the flame graph SVG.
    #[error("failed to render flame graph SVG")]
    FlameGraph(#[source] io::Error),
}
