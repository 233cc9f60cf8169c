//! Exporters: each turns a symbolized [`crate::profile::Profile`] into one
//! output format. They depend on the profile model only.
