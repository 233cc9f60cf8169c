//! Naming frames of language runtimes the native symbolizer cannot name:
//! CPython's interpreted frames (`python`).

pub mod python;
