use clap::Parser;
use profiler_agent::{app, cli::Cli};

/// Allocations from this size up get their own mapping, returned to the
/// kernel when freed. glibc's default threshold starts at 128 KiB but rises
/// to the largest block freed so far (up to 32 MiB): after start-up frees
/// the parsed kernel BTF (~9 MB, twice), every later large buffer (an
/// interval's aggregates, a profile being encoded, a file's DWARF) came from
/// the arenas, which kept their high-water mark. A fixed threshold stops the
/// rise. `cargo xtask bench churn`, 60 s at 2000 processes/s asked: peak RSS
/// 77.6 -> 65.5 MB; an idle daemon on a quiet host 47 -> 40 MB; daemon CPU
/// per process spawned unchanged within noise (0.048-0.053 ticks either
/// way, 2 runs each).
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

fn main() -> std::process::ExitCode {
    // Before any thread starts: glibc reads it once per arena.
    // SAFETY: mallopt only sets an allocator parameter; no memory is touched.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    let cli = Cli::parse();
    env_logger::Builder::new().filter_level(cli.log_level).format_timestamp_millis().init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
