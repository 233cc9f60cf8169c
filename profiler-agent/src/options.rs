//! Values both the command line ([`crate::cli`]) and the config file
//! ([`crate::config`]) accept. They live here, below both, so neither of
//! those modules imports the other for them.

/// How user stacks are walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Unwinder {
    /// CFI (.eh_frame) tables, frame pointers where there are none.
    Cfi,
    /// Frame pointers only (the kernel's walk).
    FramePointer,
}

/// Bounds of the CFI table memory: below 64 KiB not even libc fits; above
/// 128 MiB the kernel's binary search needs more than its 24 steps.
pub const MIN_TABLE_MEMORY: u64 = 64 << 10;
/// The largest `--off-cpu-sample`: past one block in 1024 a service's
/// stacks would rest on a handful of blocks per interval.
pub const MAX_OFF_CPU_SAMPLE: u32 = 1024;
pub const MAX_TABLE_MEMORY: u64 = 128 << 20;

/// Parses a CFI table memory size within [`MIN_TABLE_MEMORY`]..=[`MAX_TABLE_MEMORY`].
pub fn parse_table_memory(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if !(MIN_TABLE_MEMORY..=MAX_TABLE_MEMORY).contains(&bytes) {
        return Err(format!("must be between 64KiB and 128MiB, got {bytes} bytes"));
    }
    Ok(bytes)
}

/// Parses a byte size; binary (KiB, MiB, GiB) and decimal (kB, MB, GB) units.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let expected =
        || format!("invalid size `{text}`: expected bytes or a number with a unit (KiB, MiB, GiB, kB, MB, GB)");
    let n: u64 = number.parse().map_err(|_| expected())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(expected()),
    };
    n.checked_mul(scale).ok_or_else(|| format!("invalid size `{text}`: too large"))
}
