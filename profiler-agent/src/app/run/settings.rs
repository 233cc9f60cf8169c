//! The daemon's effective configuration: file, then environment, then flags.

use std::path::Path;

use crate::{
    cli::RunArgs,
    config::{apply_otel_env, Config, ConfigError, Files, HumanDuration, Otlp, Pyroscope, DEFAULT_CONFIG_PATH},
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
    if let Some(n) = args.off_cpu_sample {
        config.sampling.off_cpu_sample = n;
    }
    if !args.pids.is_empty() {
        config.sampling.pids = args.pids.clone();
    }
    args.targets.merge_into(&mut config.targets);
    if let Some(i) = args.export_interval {
        config.export.interval = HumanDuration(i);
    }
    if let Some(addr) = args.http_listen {
        config.http.listen = addr;
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        config.export.otlp.get_or_insert_with(Otlp::default).endpoint = endpoint.trim_end_matches('/').to_owned();
    }
    if let Some(protocol) = args.otlp_protocol {
        config.export.otlp.get_or_insert_with(Otlp::default).protocol = protocol;
    }
    if let Some(url) = &args.pyroscope_url {
        config.export.pyroscope.get_or_insert_with(Pyroscope::default).url = url.trim_end_matches('/').to_owned();
    }
    if let Some(dir) = &args.output_dir {
        config.export.files.get_or_insert_with(Files::default).dir = dir.clone();
    }
    if !config.has_exporter() {
        config.export.files = Some(Files::default());
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
            _ => unreachable!(),
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
    fn network_exporters_from_env_and_flags_replace_the_default_files() {
        let c = resolve(&args(&[]), |k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4317".into())).unwrap();
        assert_eq!(c.export.otlp.unwrap().endpoint, "http://c:4317");
        assert!(c.export.files.is_none(), "files are only the default when nothing else is configured");
        let c = resolve(
            &args(&[
                "--otlp-endpoint",
                "http://flag:4318/",
                "--otlp-protocol",
                "http/protobuf",
                "--pyroscope-url",
                "http://p:4040",
            ]),
            |k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://env:4317".into()),
        )
        .unwrap();
        let otlp = c.export.otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://flag:4318", "flags override the environment");
        assert_eq!(otlp.protocol, crate::config::OtlpProtocol::HttpProtobuf);
        assert_eq!(c.export.pyroscope.unwrap().url, "http://p:4040");
        let e = Cli::try_parse_from(["profiler-agent", "run", "--otlp-protocol", "thrift"]).unwrap_err().to_string();
        assert!(e.contains("thrift") && e.contains("http/protobuf"), "{e}");
    }
}
