//! CFI unwinding, user side: compact tables from `.eh_frame` (`table`),
//! shared per file in the kernel's rows array (`alloc`, `registry`), kept in
//! step with processes by the table thread (`worker`).

pub mod alloc;
pub mod index;
pub mod registry;
pub mod table;
pub mod worker;

pub use registry::UnwindStats;
pub use worker::{Feed, Worker};

/// Rows of the kernel's table array for a memory budget in bytes.
pub fn rows_for(bytes: u64) -> u32 {
    let rows = bytes / std::mem::size_of::<profiler_common::unwind::UnwindRow>() as u64;
    u32::try_from(rows).unwrap_or(u32::MAX)
}
