//! The daemon's configuration: a TOML file (by default
//! `/etc/profiler-agent/config.toml` when it exists), then the standard
//! OpenTelemetry environment variables, then command-line flags, each layer
//! overriding the one before.
//!
//! Every section has `#[serde(default, deny_unknown_fields)]`: a key the
//! agent does not know is an error naming the key, its line, and the keys
//! that were expected, so a typo never silently falls back to a default.

mod env;
pub mod kubernetes;
pub(crate) mod values;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

pub use env::{apply_otel_env, EnvError};
pub use kubernetes::{Kubernetes, KubernetesSettings, ServiceNameSource, Targets};
pub use values::{ByteSize, HumanDuration};

/// Where the file config is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/profiler-agent/config.toml";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message names the line, the column, the key and what was expected.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid environment: {0}")]
    Env(#[from] EnvError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub sampling: Sampling,
    pub export: Export,
    pub http: Http,
    pub resource: ResourceConfig,
    pub kubernetes: Kubernetes,
    pub targets: Targets,
}

/// What is sampled.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Sampling {
    /// On-CPU samples per second per CPU. 19 Hz (a prime, so it does not
    /// beat with periodic work) keeps a daemon's cost near zero; `record`
    /// defaults to 99 for short, detailed runs.
    pub frequency: u64,
    /// Trace the scheduler: off-CPU time and latency histograms.
    pub off_cpu: bool,
    /// Ignore blocks shorter than this.
    pub off_cpu_min_block: HumanDuration,
    /// Take off-CPU stacks for one block in N, at random: per-stack time is
    /// then a sampled estimate, each thread's total stays exact. 1 is exact.
    pub off_cpu_sample: u32,
    /// Only these processes; empty means all.
    pub pids: Vec<u32>,
    /// How user stacks are walked: `cfi` (`.eh_frame` tables, complete
    /// stacks for code without frame pointers) or `frame-pointer`.
    pub unwinder: crate::options::Unwinder,
    /// Kernel memory for CFI tables; the least recently sampled files'
    /// tables are evicted when it is full.
    pub unwind_table_memory: ByteSize,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            frequency: 19,
            off_cpu: false,
            off_cpu_min_block: HumanDuration::ZERO,
            off_cpu_sample: 1,
            pids: Vec::new(),
            unwinder: crate::options::Unwinder::Cfi,
            unwind_table_memory: ByteSize(32 << 20),
        }
    }
}

/// Where profiles and metrics go, and how often.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Export {
    /// Length of one profile; each is exported when it ends.
    pub interval: HumanDuration,
    /// On SIGTERM, how long the final partial interval may take to export.
    pub shutdown_deadline: HumanDuration,
    /// OTLP profiles and metrics; absent: off.
    pub otlp: Option<Otlp>,
    /// Grafana Pyroscope push; absent: off.
    pub pyroscope: Option<Pyroscope>,
    /// Rolling local files; on by default only when no other exporter is configured.
    pub files: Option<Files>,
}

impl Default for Export {
    fn default() -> Self {
        Self {
            interval: HumanDuration(Duration::from_secs(10)),
            shutdown_deadline: HumanDuration(Duration::from_secs(10)),
            otlp: None,
            pyroscope: None,
            files: None,
        }
    }
}

/// OTLP transport.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(format!("unknown OTLP protocol `{other}`: expected `grpc` or `http/protobuf`")),
        }
    }
}

/// The OTLP exporter (profiles and metrics).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Otlp {
    /// `http://host:4317` for gRPC, `http://host:4318` for HTTP.
    pub endpoint: String,
    /// `grpc` or `http/protobuf`.
    pub protocol: OtlpProtocol,
    /// Extra request headers (`authorization`, tenant ids).
    pub headers: BTreeMap<String, String>,
    /// Limit for establishing a connection.
    pub connect_timeout: HumanDuration,
    /// Limit for one export request.
    pub timeout: HumanDuration,
    /// Retry buffer bound; the oldest data is dropped (and counted) first.
    pub buffer_bytes: ByteSize,
    /// Buffered data older than this is dropped (and counted).
    pub buffer_max_age: HumanDuration,
    /// Also export the latency histograms and health series as OTLP metrics.
    pub metrics: bool,
    /// Plaintext even for an `https://` endpoint.
    pub insecure: bool,
    /// PEM CA certificates trusted instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl Default for Otlp {
    fn default() -> Self {
        Self {
            endpoint: "http://localhost:4317".into(),
            protocol: OtlpProtocol::Grpc,
            headers: BTreeMap::new(),
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            timeout: HumanDuration(Duration::from_secs(10)),
            buffer_bytes: ByteSize(16 << 20),
            buffer_max_age: HumanDuration(Duration::from_secs(300)),
            metrics: true,
            insecure: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

/// The Grafana Pyroscope push exporter.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Pyroscope {
    /// Base URL of the Pyroscope server (`http://pyroscope:4040`).
    pub url: String,
    /// Extra request headers (`X-Scope-OrgID` for multi-tenant servers).
    pub headers: BTreeMap<String, String>,
    /// Limit for establishing a connection.
    pub connect_timeout: HumanDuration,
    /// Limit for one push request.
    pub timeout: HumanDuration,
    /// Retry buffer bound; the oldest data is dropped (and counted) first.
    pub buffer_bytes: ByteSize,
    /// Buffered data older than this is dropped (and counted).
    pub buffer_max_age: HumanDuration,
}

impl Default for Pyroscope {
    fn default() -> Self {
        Self {
            url: "http://localhost:4040".into(),
            headers: BTreeMap::new(),
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            timeout: HumanDuration(Duration::from_secs(10)),
            buffer_bytes: ByteSize(16 << 20),
            buffer_max_age: HumanDuration(Duration::from_secs(300)),
        }
    }
}

/// Rolling local files.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Files {
    /// Directory of the `cpu-<start>.pb.gz` and `.folded` files.
    pub dir: PathBuf,
    /// Oldest files are deleted when the directory grows past this.
    pub max_bytes: ByteSize,
    /// Files older than this are deleted.
    pub max_age: HumanDuration,
}

impl Default for Files {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/profiler-agent/profiles"),
            max_bytes: ByteSize(1 << 30),
            max_age: HumanDuration(Duration::from_secs(24 * 3600)),
        }
    }
}

/// The agent's own HTTP endpoint (/healthz, /readyz, /metrics).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    /// Address of /healthz, /readyz and /metrics; loopback by default, since
    /// the endpoint has no authentication.
    pub listen: SocketAddr,
}

impl Default for Http {
    fn default() -> Self {
        // Loopback by default: the endpoint is unauthenticated.
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9464)) }
    }
}

/// What the agent says about itself and the host in every export.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize, schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ResourceConfig {
    /// Overrides the per-process service name (OTEL_SERVICE_NAME).
    pub service_name: Option<String>,
    /// Extra attributes on every resource (OTEL_RESOURCE_ATTRIBUTES).
    pub attributes: BTreeMap<String, String>,
}

impl Config {
    /// Parses TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &std::path::Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let max_sample = crate::options::MAX_OFF_CPU_SAMPLE;
        if !(1..=max_sample).contains(&self.sampling.off_cpu_sample) {
            return invalid(format!(
                "sampling.off_cpu_sample = {}: expected 1 (exact) to {max_sample} (one block in {max_sample})",
                self.sampling.off_cpu_sample
            ));
        }
        if !(1..=10_000).contains(&self.sampling.frequency) {
            return invalid(format!("sampling.frequency = {}: expected 1 to 10000 Hz", self.sampling.frequency));
        }
        let memory = self.sampling.unwind_table_memory.0;
        if !(crate::options::MIN_TABLE_MEMORY..=crate::options::MAX_TABLE_MEMORY).contains(&memory) {
            return invalid(format!("sampling.unwind_table_memory = {memory} bytes: expected 64KiB to 128MiB"));
        }
        if self.export.interval.0 < Duration::from_secs(1) {
            return invalid(format!("export.interval = {:?}: expected at least 1s", self.export.interval.0));
        }
        for (name, url) in [
            ("export.otlp.endpoint", self.export.otlp.as_ref().map(|o| &o.endpoint)),
            ("export.pyroscope.url", self.export.pyroscope.as_ref().map(|p| &p.url)),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return invalid(format!("{name} = \"{url}\": expected an http:// or https:// URL"));
                }
            }
        }
        if let Some(o) = &self.export.otlp {
            if o.client_cert_file.is_some() != o.client_key_file.is_some() {
                return invalid(
                    "export.otlp: client_cert_file and client_key_file go together (mutual TLS needs both)".into(),
                );
            }
        }
        Ok(())
    }

    /// Whether any network or file exporter is configured; when none is,
    /// the daemon writes local files.
    pub fn has_exporter(&self) -> bool {
        self.export.otlp.is_some() || self.export.pyroscope.is_some() || self.export.files.is_some()
    }
}

#[cfg(test)]
mod tests;
