//! `cargo xtask package deb`: the Debian package an operator installs.
//!
//! A builder of our own around `dpkg-deb --build` rather than cargo-deb: the
//! package needs a generated conffile and man page, maintainer scripts and a
//! computed glibc dependency, and `dpkg-deb` is on every Debian machine.

mod deb;
mod man;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::{build, setup, step};

/// Package formats.
#[derive(Subcommand)]
pub enum Package {
    /// Build `profiler-agent_<version>_<arch>.deb` and print its path.
    ///
    /// Contents: /usr/bin/profiler-agent, the systemd unit
    /// (packaging/systemd/profiler-agent.service), /etc/profiler-agent/config.toml
    /// (a conffile: packaging/config.example.toml with every line commented),
    /// /etc/default/profiler-agent, the man page profiler-agent(8) and
    /// maintainer scripts that create the `profiler-agent` user.
    #[command(verbatim_doc_comment)]
    Deb(DebArgs),
}

#[derive(Args)]
pub struct DebArgs {
    /// Package this agent binary instead of building the release one.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Directory for the .deb [default: <target>/debian].
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

pub fn run(package: Package) -> Result<()> {
    match package {
        Package::Deb(args) => {
            let binary = match args.binary {
                Some(b) => std::path::absolute(b)?,
                None => build::build_agent(&setup::run()?, true)?,
            };
            let out_dir = match args.out_dir {
                Some(d) => d,
                None => build::target_dir()?.join("debian"),
            };
            let deb = deb::build(&binary, &out_dir)?;
            step(format!("package: built {}", deb.display()));
            println!("{}", deb.display());
            Ok(())
        }
    }
}
