//! Wires the stages together for each command. `anyhow` lives here and in
//! `main`; the stages below report typed errors.

pub mod check;
mod collect;
pub(crate) mod diff;
mod preflight;
mod record;
mod run;
mod summary;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Record(args) => record::record(args).await,
        Command::Run(args) => run::run(args).await,
        Command::Diff(args) => diff::diff(&args),
        Command::Check(args) => check::check(args).await,
    }
}
