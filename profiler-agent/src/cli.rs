//! Command-line interface. Runtime choices are flags; anything that would
//! make a config file (exporters, retention) belongs to the daemon's config.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::duration::parse_duration;

/// Continuous profiler for Linux: samples on-CPU stacks of every process
/// with eBPF and writes flame-graph-ready profiles.
#[derive(Debug, Parser)]
#[command(name = "profiler-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level for the agent's own diagnostics (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "PROFILER_LOG")]
    pub log_level: log::LevelFilter,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Record on-CPU stacks for a while, then write folded, pprof and SVG files.
    ///
    /// Examples:
    ///   profiler-agent record --duration 10                 # whole system, 10 s
    ///   profiler-agent record --pid 1234 --frequency 499    # one process until Ctrl-C
    ///   profiler-agent record -d 30s --format folded -o /tmp/prof
    ///   profiler-agent record -d 10 --off-cpu --pid 1234    # plus where it blocks
    ///   profiler-agent record -d 10 --cgroup /system.slice/nginx.service
    ///   profiler-agent record -d 10 --process-name '^postgres$'
    ///
    /// Needs root, or CAP_BPF and CAP_PERFMON (plus CAP_SYS_PTRACE to read
    /// other users' processes' mappings).
    #[command(verbatim_doc_comment)]
    Record(RecordArgs),
    /// Run as a daemon: profile continuously and export every interval.
    ///
    /// Settings come from the config file (default /etc/profiler-agent/config.toml
    /// when it exists; see packaging/config.example.toml), then the OTEL_*
    /// environment variables, then these flags. Without any exporter
    /// configured, profiles go to rolling local files.
    ///
    /// Examples:
    ///   profiler-agent run                                   # files under /var/lib/profiler-agent/profiles
    ///   profiler-agent run --output-dir /tmp/p --export-interval 30s --off-cpu
    ///   profiler-agent run --config /etc/profiler-agent/config.toml
    ///
    /// Endpoints on --http-listen: /healthz, /readyz, /metrics (Prometheus).
    /// SIGTERM/SIGINT export the last partial interval and exit 0. SIGHUP is
    /// ignored: restart the agent to apply a changed configuration.
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Compare two sets of profiles and report what changed significantly.
    ///
    /// BEFORE and AFTER are each a profile file (cpu.pb.gz, off-cpu.pb.gz,
    /// any *.folded the agent writes), or a directory: a `record` output
    /// directory or the daemon's files directory. Every profile of the
    /// chosen kind in a directory is one repeat of that side; the same
    /// profile in two formats counts once (pprof is read).
    ///
    /// Method: each function's inclusive share of every repeat is compared
    /// with Welch's t-test on the per-repeat shares (the noise is the
    /// variation between repeats, not binomial counting noise), and the
    /// p-values are Holm-corrected across functions at alpha = 0.05. A
    /// single recording made by `record` is split into its one-second time
    /// blocks (blocks/; off-CPU and wall blocks with `record --off-cpu`),
    /// which serve as its repeats. At least 2 repeats per side are needed.
    ///
    /// Examples:
    ///   profiler-agent diff before/ after/                  # two `record` outputs
    ///   profiler-agent diff /var/lib/profiler-agent/profiles/old/ /var/lib/profiler-agent/profiles/new/
    ///   profiler-agent diff a/ b/ --format table,json,svg -o report/ --min-change 0.5
    #[command(verbatim_doc_comment)]
    Diff(DiffArgs),
    /// Check whether this host can run the agent, and say what to do when not.
    ///
    /// Reads the kernel version, BTF, capabilities (held against needed),
    /// kernel.perf_event_paranoid, kptr_restrict, memlock and the cgroup
    /// layout; loads tiny BPF programs to probe perf_event, tp_btf (and the
    /// raw-tracepoint fallback), the ring buffer, bpf_loop and mmapable
    /// arrays; and tries the exporters of the configuration `run` would use
    /// (same flags), each with a timeout. Exits 0 when the agent can run,
    /// 1 when it cannot. docs/operations.md explains every problem.
    ///
    /// Examples:
    ///   profiler-agent check
    ///   profiler-agent check --config /etc/profiler-agent/config.toml --output json
    #[command(verbatim_doc_comment)]
    Check(crate::app::check::CheckArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file [default: /etc/profiler-agent/config.toml if it exists].
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Send OTLP profiles here: `http://host:4317` (gRPC) or, with
    /// `--otlp-protocol http/protobuf`, `http://host:4318`
    /// [env: OTEL_EXPORTER_OTLP_ENDPOINT].
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: `grpc` or `http/protobuf` [env: OTEL_EXPORTER_OTLP_PROTOCOL].
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<crate::config::OtlpProtocol>,
    /// Push to Grafana Pyroscope at this URL (`http://pyroscope:4040`).
    #[arg(long, value_name = "URL")]
    pub pyroscope_url: Option<String>,
    /// Write rolling pprof and folded files to this directory (the default
    /// exporter when no other is configured).
    #[arg(short, long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Length of one profile [default: 10s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub export_interval: Option<Duration>,
    /// Samples per second per CPU [default: 19].
    #[arg(short = 'F', long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub frequency: Option<u64>,
    /// Also trace the scheduler: off-CPU profiles (exact unless
    /// --off-cpu-sample) and latency. A thread still blocked at a cut is
    /// counted up to it, labelled state=still_blocked, so a hung thread
    /// shows in every interval.
    #[arg(long)]
    pub off_cpu: bool,
    /// Take off-CPU stacks for one block in N, at random (sampled: per-stack
    /// time is an estimate, per-thread totals stay exact; see `record
    /// --help`) [default: 1, exact; config `sampling.off_cpu_sample`].
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=crate::options::MAX_OFF_CPU_SAMPLE as i64))]
    pub off_cpu_sample: Option<u32>,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Only profile this process (repeatable) [default: all].
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    #[command(flatten)]
    pub targets: crate::target::TargetArgs,
}

/// Output formats of `record`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Format {
    /// `cpu.folded`: one line per unique stack, `process;outer;...;leaf COUNT`.
    Folded,
    /// `cpu.pb.gz`: gzip pprof, for `go tool pprof`, Pyroscope, speedscope.
    Pprof,
    /// `cpu.svg`: interactive flame graph.
    Svg,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// How long to record: seconds (`10`), or with a unit (`10s`, `500ms`, `2m`).
    /// Without it, records until Ctrl-C or SIGTERM.
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Only sample this process (repeatable). Other processes cost no unwinding.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    #[command(flatten)]
    pub targets: crate::target::TargetArgs,
    /// Samples per second per CPU. Odd primes (99, 499) avoid lock-step with periodic work.
    #[arg(short = 'F', long, default_value_t = 99, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub frequency: u64,
    /// Where to write the files [default: ./profile-<YYYYMMDD-HHMMSS>].
    #[arg(short, long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Comma-separated output formats.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST", default_value = "folded,pprof,svg")]
    pub format: Vec<Format>,
    /// Also record off-CPU time: where threads block, in nanoseconds
    /// (off-cpu.*), a per-thread wall-clock view (wall.*), and run-queue and
    /// off-CPU latency histograms in the summary. Exact by default: every
    /// block is timed and its stacks taken (see --off-cpu-sample). Threads
    /// already blocked at the start count from it;
    /// threads still blocked at the end count up to it, labelled
    /// state=still_blocked, and the summary lists the longest.
    #[arg(long)]
    pub off_cpu: bool,
    /// With --off-cpu, ignore blocks shorter than this (`1ms`, `50us`); 0 records every block.
    #[arg(long, value_parser = parse_duration, default_value = "0", value_name = "DURATION", requires = "off_cpu")]
    pub off_cpu_min_block: Duration,
    /// With --off-cpu, take stacks for one block in N, chosen at random,
    /// to cut the cost on services that block tens of thousands of times a
    /// second. Sampled, not exact: each stack's time is an estimate (a
    /// sampled block counts N times), scaled so that every thread's total
    /// stays exact (every block is still timed); a thread with no sampled
    /// block shows without stacks. Blocks still going after 1 s have their
    /// stacks taken whatever the coin said. 1 (the default) is exact.
    #[arg(long, default_value_t = 1, value_name = "N", requires = "off_cpu",
          value_parser = clap::value_parser!(u32).range(1..=crate::options::MAX_OFF_CPU_SAMPLE as i64))]
    pub off_cpu_sample: u32,
    /// Attach the scheduler programs as raw tracepoints, the fallback for
    /// kernels whose BTF lacks the tracepoints (for testing that path).
    #[arg(long, hide = true, requires = "off_cpu")]
    pub off_cpu_raw_tracepoints: bool,
    /// How user stacks are walked. `cfi` reads the `.eh_frame` unwind tables
    /// of every mapped file, so code built without frame pointers (most
    /// distribution binaries: glibc, python3) has complete stacks, and falls
    /// back to frame pointers where a file has no table (JIT code).
    /// `frame-pointer` costs no table memory but truncates such stacks.
    #[arg(long, value_enum, default_value = "cfi", value_name = "METHOD")]
    pub unwinder: Unwinder,
    /// Kernel memory for CFI tables (`32MiB`, `512KiB`). Tables are shared
    /// by every process mapping the same file (libc is built once); when
    /// full, the least recently sampled files' tables are evicted and those
    /// frames fall back to frame pointers.
    #[arg(long, value_parser = parse_table_memory, default_value = "32MiB", value_name = "SIZE")]
    pub unwind_table_memory: u64,
    /// At the end, compare this recording with an earlier one (a `record`
    /// output directory) as `profiler-agent diff DIR <this one>` does, and
    /// print the table under the summary.
    #[arg(long, value_name = "DIR")]
    pub compare_to: Option<PathBuf>,
}

// Shared with the config file; re-exported so `cli::Unwinder` keeps working.
pub use crate::options::{parse_table_memory, Unwinder, MAX_TABLE_MEMORY, MIN_TABLE_MEMORY};

/// Output formats of `diff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum DiffFormat {
    /// On stdout: the functions that changed significantly, biggest first.
    Table,
    /// `DIR/diff.json`: every function compared, with shares, interval and p-value.
    Json,
    /// `DIR/diff.svg`: differential flame graph (widths from AFTER; red grew, blue shrank).
    Svg,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The baseline: a profile file or a directory of profiles.
    #[arg(value_name = "BEFORE")]
    pub before: PathBuf,
    /// The profiles to compare with it.
    #[arg(value_name = "AFTER")]
    pub after: PathBuf,
    /// Where diff.json and diff.svg go (created if missing).
    #[arg(short, long, value_name = "DIR", default_value = ".")]
    pub output_dir: PathBuf,
    /// Comma-separated output formats.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST", default_value = "table")]
    pub format: Vec<DiffFormat>,
    /// Which profile to compare [default: cpu for directories; a file's own kind].
    #[arg(long, value_enum, value_name = "KIND")]
    pub profile: Option<crate::diff::ProfileKind>,
    /// Smallest change reported, in points of share (1 = 1 % of the total);
    /// smaller changes are not reported even if significant.
    #[arg(long, value_name = "PCT", default_value_t = 1.0, value_parser = parse_min_change)]
    pub min_change: f64,
}

fn parse_min_change(text: &str) -> Result<f64, String> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("expected a number of points between 0 and 100, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<RecordArgs, clap::Error> {
        let mut argv = vec!["profiler-agent", "record"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Record(r) => r,
            _ => unreachable!("parsed `record`"),
        })
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let r = parse(&[]).unwrap();
        assert_eq!(r.frequency, 99);
        assert_eq!(r.duration, None);
        assert_eq!(r.format, [Format::Folded, Format::Pprof, Format::Svg]);
        assert!(r.pids.is_empty());
    }

    #[test]
    fn parses_the_contract() {
        let r =
            parse(&["--duration", "10s", "--pid", "1", "--pid", "2", "--frequency", "19", "--format", "svg,folded"])
                .unwrap();
        assert_eq!(r.duration, Some(Duration::from_secs(10)));
        assert_eq!(r.pids, [1, 2]);
        assert_eq!(r.frequency, 19);
        assert_eq!(r.format, [Format::Svg, Format::Folded]);
        assert_eq!(parse(&["--duration", "7"]).unwrap().duration, Some(Duration::from_secs(7)));
        let r = parse(&["--off-cpu", "--off-cpu-min-block", "2ms"]).unwrap();
        assert!(r.off_cpu);
        assert_eq!(r.off_cpu_min_block, Duration::from_millis(2));
        assert!(!parse(&[]).unwrap().off_cpu);
        assert!(parse(&["--off-cpu-min-block", "2ms"]).is_err(), "needs --off-cpu");
        assert_eq!(parse(&["--off-cpu"]).unwrap().off_cpu_sample, 1, "exact by default");
        assert_eq!(parse(&["--off-cpu", "--off-cpu-sample", "8"]).unwrap().off_cpu_sample, 8);
        assert!(parse(&["--off-cpu-sample", "8"]).is_err(), "needs --off-cpu");
        assert!(parse(&["--off-cpu", "--off-cpu-sample", "0"]).is_err());
        assert!(parse(&["--off-cpu", "--off-cpu-sample", "1025"]).is_err());
    }

    #[test]
    fn diff_defaults_and_values() {
        let parse_diff = |args: &[&str]| {
            let mut argv = vec!["profiler-agent", "diff"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Diff(d) => d,
                _ => unreachable!("parsed `diff`"),
            })
        };
        let d = parse_diff(&["a", "b"]).unwrap();
        assert_eq!((d.format.as_slice(), d.min_change, d.profile), ([DiffFormat::Table].as_slice(), 1.0, None));
        let d = parse_diff(&["a", "b", "--format", "json,svg", "--profile", "off-cpu", "--min-change", "0.5"]).unwrap();
        assert_eq!(d.format, [DiffFormat::Json, DiffFormat::Svg]);
        assert_eq!(d.profile, Some(crate::diff::ProfileKind::OffCpu));
        assert_eq!(d.min_change, 0.5);
        assert!(parse_diff(&["a"]).is_err());
        assert!(parse_diff(&["a", "b", "--min-change", "-1"]).unwrap_err().to_string().contains("-1"));
        assert!(parse_diff(&["a", "b", "--profile", "heap"]).is_err());
    }

    #[test]
    fn rejects_bad_values_naming_them() {
        let e = parse(&["--format", "folded,bogus"]).unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("pprof"), "{e}");
        let e = parse(&["--duration", "abc"]).unwrap_err().to_string();
        assert!(e.contains("abc"), "{e}");
        assert!(parse(&["--frequency", "0"]).is_err());
        assert!(parse(&["--pid", "-3"]).is_err());
    }
}
