//! Developer tasks for the profiler workspace: `cargo xtask <command>`.
//!
//! `setup` installs what the eBPF build needs (nightly + rust-src, bpf-linker)
//! into a cache outside the clone; `build`, `test`, `run` and `bench` call it
//! first, so each of them works on a fresh machine.

mod bench;
mod build;
mod docs;
mod package;
mod run;
mod setup;
mod test;

use std::{process::ExitCode, sync::OnceLock, time::Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for the profiler workspace")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the nightly toolchain, its rust-src and bpf-linker (idempotent).
    Setup,
    /// Set up, then build profiler-agent (with its embedded eBPF object).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run unit tests, then the root-only integration tests (one at a time).
    Test {
        /// Extra arguments for both test binaries, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the release agent and run it: `cargo xtask run -- record --duration 10`.
    Run {
        /// Arguments for profiler-agent.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Regenerate docs/operations.md (configuration, metrics, troubleshooting) from the code.
    Docs,
    /// Build an installable package: `cargo xtask package deb`.
    Package {
        #[command(subcommand)]
        package: package::Package,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
}

fn main() -> ExitCode {
    START.get_or_init(Instant::now);
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain of contexts, without anyhow's backtrace: the messages say
            // what failed and what to do.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Setup => setup::run().map(drop),
        Command::Build { release } => build::run(release).map(drop),
        Command::Test { args } => test::run(&args),
        Command::Run { args } => run::run(&args),
        Command::Bench { bench } => bench::run(bench),
        Command::Package { package } => package::run(package),
        Command::Docs => docs::run(),
    }
}

static START: OnceLock<Instant> = OnceLock::new();

/// Prints a progress line on stderr, prefixed with the time since xtask started.
pub fn step(msg: impl std::fmt::Display) {
    let secs = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[xtask {secs:6.1}s] {msg}");
}

/// Whether we run as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
