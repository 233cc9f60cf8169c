//! The `json` format, `diff.json`: the contract scripts and tests read.

use serde::Serialize;

use super::model::{Comparison, Direction, Side, METHOD};

#[derive(Serialize)]
struct SideJson {
    profiles: usize,
    samples: u64,
    total: u64,
}

#[derive(Serialize)]
struct FunctionJson<'a> {
    name: &'a str,
    total_before: f64,
    total_after: f64,
    self_before: f64,
    self_after: f64,
    delta: f64,
    ci95: [f64; 2],
    p_value: f64,
    significant: bool,
    direction: Direction,
}

#[derive(Serialize)]
struct DiffJson<'a> {
    before: SideJson,
    after: SideJson,
    test: &'static str,
    alpha: f64,
    functions: Vec<FunctionJson<'a>>,
}

fn side(s: &Side) -> SideJson {
    SideJson { profiles: s.repeats.len(), samples: s.samples, total: s.total() }
}

/// `diff.json` as pretty-printed text.
pub fn render(before: &Side, after: &Side, c: &Comparison) -> String {
    let doc = DiffJson {
        before: side(before),
        after: side(after),
        test: METHOD,
        alpha: c.alpha,
        functions: c
            .functions
            .iter()
            .map(|f| FunctionJson {
                name: &f.name,
                total_before: f.total_before,
                total_after: f.total_after,
                self_before: f.self_before,
                self_after: f.self_after,
                delta: f.delta,
                ci95: [f.ci95.0, f.ci95.1],
                p_value: f.p_value,
                significant: f.significant,
                direction: f.direction,
            })
            .collect(),
    };
    // Only finite floats and strings: serialization cannot fail.
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}
