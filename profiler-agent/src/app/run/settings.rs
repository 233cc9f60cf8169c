//! The daemon's effective configuration: file, then environment, then flags.

use std::path::Path;

use crate::{
    cli::RunArgs,
    config::{apply_otel_env, Config, ConfigError, Files, HumanDuration, DEFAULT_CONFIG_PATH},
};

/// Builds the configuration; `env` is normally `std::env::var`.
pub fn resolve(args: &RunArgs, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => Config::load(Path::new(DEFAULT_CONFIG_PATH))?,
        None => Config::default(),
    };
    apply_otel_env(&mut config, env)?;
    if let Some(f) = args.frequency {
        config.sampling.frequency = f;
    }
    if args.off_cpu {
        config.sampling.off_cpu = true;
    }
    if !args.pids.is_empty() {
        config.sampling.pids = args.pids.clone();
    }
    if let Some(i) = args.export_interval {
        config.export.interval = HumanDuration(i);
    }
    if let Some(addr) = args.http_listen {
        config.http.listen = addr;
    }
    if let Some(dir) = &args.output_dir {
        config.export.files.get_or_insert_with(Files::default).dir = dir.clone();
    }
    if !config.has_exporter() {
        config.export.files = Some(Files::default());
    }
    // Network exporters are configured here but shipped in a later step;
    // refusing beats silently dropping what the user asked to send.
    if config.export.otlp.is_some() || config.export.pyroscope.is_some() {
        return Err(ConfigError::Invalid(
            "OTLP and Pyroscope export are not available in this version of profiler-agent; \
             remove [export.otlp]/[export.pyroscope] (or OTEL_EXPORTER_OTLP_*) and use [export.files]"
                .into(),
        ));
    }
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(argv: &[&str]) -> RunArgs {
        let mut v = vec!["profiler-agent", "run"];
        v.extend_from_slice(argv);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Run(r) => r,
            Command::Record(_) => unreachable!(),
        }
    }

    #[test]
    fn flags_override_the_file_and_files_are_the_default_exporter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[sampling]\nfrequency = 49\n[export]\ninterval = \"30s\"\n").unwrap();
        let c = resolve(&args(&["--config", path.to_str().unwrap(), "--export-interval", "5s"]), |_| None).unwrap();
        assert_eq!(c.sampling.frequency, 49);
        assert_eq!(c.export.interval.0, Duration::from_secs(5));
        assert_eq!(c.export.files.unwrap().dir, Files::default().dir);

        let c = resolve(&args(&["--config", path.to_str().unwrap(), "-F", "7", "-o", "/tmp/x", "--off-cpu"]), |_| None)
            .unwrap();
        assert_eq!(c.sampling.frequency, 7);
        assert!(c.sampling.off_cpu);
        assert_eq!(c.export.files.unwrap().dir, Path::new("/tmp/x"));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[export]\nintervall = \"5s\"\n").unwrap();
        let msg = resolve(&args(&["--config", path.to_str().unwrap()]), |_| None).unwrap_err().to_string();
        assert!(msg.contains("bad.toml") && msg.contains("intervall") && msg.contains("line 2"), "{msg}");
        let msg = resolve(&args(&["--config", "/nonexistent.toml"]), |_| None).unwrap_err().to_string();
        assert!(msg.contains("/nonexistent.toml"), "{msg}");
    }

    #[test]
    fn network_exporters_are_refused_until_they_ship() {
        let e = resolve(&args(&[]), |k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4317".into()));
        assert!(e.unwrap_err().to_string().contains("OTEL_EXPORTER_OTLP"));
    }
}
