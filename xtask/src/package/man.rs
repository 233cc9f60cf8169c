//! The man page profiler-agent(8), made from the binary's own `--help` texts
//! so it never disagrees with the program.

use std::{path::Path, process::Command};

use anyhow::{ensure, Context as _, Result};

/// Subcommands documented in the page, each from `profiler-agent SUB --help`.
const SUBCOMMANDS: [&str; 3] = ["check", "record", "run"];

/// The roff source of the page, for the agent binary at `binary`.
pub fn page(binary: &Path, version: &str) -> Result<String> {
    let help = |args: &[&str]| -> Result<String> {
        let out = Command::new(binary)
            .args(args)
            .arg("--help")
            .output()
            .with_context(|| format!("cannot run {} to read its --help for the man page", binary.display()))?;
        ensure!(
            out.status.success(),
            "`{} {} --help` failed: {}",
            binary.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut roff = String::new();
    roff.push_str(&format!(".TH PROFILER-AGENT 8 \"\" \"profiler-agent {version}\" \"System Administration\"\n"));
    roff.push_str(".SH NAME\nprofiler-agent \\- continuous eBPF profiler for Linux\n");
    roff.push_str(".SH SYNOPSIS\n");
    for sub in SUBCOMMANDS {
        roff.push_str(&format!(".B profiler-agent {sub}\n.RI [ OPTIONS ]\n.br\n"));
    }
    roff.push_str(".SH DESCRIPTION\n");
    roff.push_str(&preformatted(&help(&[])?));
    for sub in SUBCOMMANDS {
        roff.push_str(&format!(".SH \"PROFILER-AGENT {}\"\n", sub.to_uppercase()));
        roff.push_str(&preformatted(&help(&[sub])?));
    }
    roff.push_str(
        ".SH FILES\n\
         .TP\n/etc/profiler-agent/config.toml\n\
         The daemon's configuration; every key is shown, commented, with its default.\n\
         .TP\n/etc/default/profiler-agent\n\
         Environment of the systemd unit (OTEL_* variables, PROFILER_LOG).\n\
         .TP\n/var/lib/profiler-agent\n\
         State directory: rolling local profiles when no exporter is configured.\n\
         .SH SEE ALSO\n\
         .BR systemctl (1),\n\
         .BR capabilities (7),\n\
         /usr/share/doc/profiler-agent/operations.md\n",
    );
    Ok(roff)
}

/// `text` verbatim in a no-fill block, escaped so roff does not read
/// backslashes or a leading `.`/`'` as requests.
fn preformatted(text: &str) -> String {
    let mut out = String::from(".nf\n");
    for line in text.lines() {
        let line = line.replace('\\', "\\e");
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(".fi\n");
    out
}

#[cfg(test)]
mod tests {
    use super::preformatted;

    #[test]
    fn escapes_roff_requests_and_backslashes() {
        let out = preformatted(".hidden\n'also\n  a\\b\n");
        assert_eq!(out, ".nf\n\\&.hidden\n\\&'also\n  a\\eb\n.fi\n");
    }
}
