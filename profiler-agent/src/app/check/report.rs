//! What `check` found, and how it is shown: one line per check on a
//! terminal, or one JSON document for scripts.

use serde::Serialize;

use super::problems::Problem;

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// The agent runs, but something is degraded (unnamed frames, an
    /// unreachable exporter).
    Warn,
    /// The agent cannot run.
    Fail,
    /// Not checked, because an earlier check failed.
    Skip,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// Stable name of the check (`kernel.btf`, `capability.CAP_BPF`).
    pub check: String,
    pub status: Status,
    /// What was found, in one line.
    pub detail: String,
    /// The problem found, when not ok; docs/operations.md has a section per problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<&'static str>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

impl Finding {
    pub fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { check: check.into(), status: Status::Ok, detail: detail.into(), problem: None, remedy: None }
    }

    /// A finding for `problem`, at the problem's severity.
    pub fn problem(check: impl Into<String>, problem: Problem, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            status: problem.status(),
            detail: detail.into(),
            problem: Some(problem.id()),
            remedy: Some(problem.remedy().to_owned()),
        }
    }

    pub fn skip(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { check: check.into(), status: Status::Skip, detail: detail.into(), problem: None, remedy: None }
    }
}

/// The whole report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// Whether the agent can run here (no check failed).
    pub ok: bool,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn new(findings: Vec<Finding>) -> Self {
        Self { ok: !findings.iter().any(|f| f.status == Status::Fail), findings }
    }

    pub fn count(&self, status: Status) -> usize {
        self.findings.iter().filter(|f| f.status == status).count()
    }

    /// The terminal form: a verdict, then one aligned line per check, with
    /// the remedy under each problem.
    pub fn to_text(&self) -> String {
        let width = self.findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            out.push_str(&format!("{tag}  {:width$}  {}\n", f.check, f.detail));
            if let Some(remedy) = &f.remedy {
                out.push_str(&format!("      {:width$}  -> {remedy}\n", ""));
            }
        }
        let (fails, warns) = (self.count(Status::Fail), self.count(Status::Warn));
        if self.ok {
            out.push_str(&format!("\nThis host can run profiler-agent ({warns} warning(s)).\n"));
        } else {
            out.push_str(&format!(
                "\nThis host cannot run profiler-agent: {fails} check(s) failed, {warns} warning(s).\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_follows_failures_only() {
        let ok = Finding::ok("kernel.version", "Linux 6.18");
        let warn = Finding::problem("kernel.kallsyms", Problem::KallsymsHidden, "addresses read 0");
        assert!(Report::new(vec![ok.clone(), warn.clone()]).ok);
        let fail = Finding::problem("capability.CAP_BPF", Problem::MissingCapBpf, "not held");
        let report = Report::new(vec![ok, warn, fail]);
        assert!(!report.ok);
        let text = report.to_text();
        assert!(text.contains("FAIL  capability.CAP_BPF"), "{text}");
        assert!(text.contains("cannot run"), "{text}");
        assert!(text.contains(Problem::MissingCapBpf.remedy()), "{text}");
    }

    #[test]
    fn json_names_status_and_problem() {
        let report = Report::new(vec![Finding::problem("capability.CAP_PERFMON", Problem::MissingCapPerfmon, "no")]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["findings"][0]["status"], "fail");
        assert_eq!(json["findings"][0]["problem"], "missing-cap-perfmon");
    }
}
