use clap::Parser;
use profiler_agent::{app, cli::Cli};

fn main() -> std::process::ExitCode {
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
