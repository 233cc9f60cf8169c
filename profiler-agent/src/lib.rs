//! The profiler agent as a library: the binary in `main.rs` only parses the
//! command line and hands over to [`app`].

pub mod export;
pub mod profile;
