//! The profiler agent as a library: the binary in `main.rs` only parses the
//! command line and hands over to [`app`].
//!
//! Data flows down the module list: [`bpf`] delivers raw samples,
//! [`process`] knows the mappings they point into, [`aggregate`] counts
//! unique stacks, [`symbolize`] turns them into a [`profile::Profile`], and
//! [`export`] writes that out. [`metadata`] adds the container and pod of
//! each process for the exporters; [`target`] narrows what the kernel samples.

pub mod aggregate;
pub mod app;
pub mod bounded;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod diff;
#[cfg(test)]
mod docs;
pub mod duration;
pub mod export;
pub mod latency;
pub mod lifecycle;
pub mod metadata;
pub mod offcpu;
pub mod options;
pub mod process;
pub mod profile;
pub mod runtimes;
pub mod symbolize;
pub mod target;
pub mod telemetry;
pub mod unwind;
