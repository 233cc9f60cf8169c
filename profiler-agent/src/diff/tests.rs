//! The outputs of a comparison, on a fixture where two leaves trade shares.

use std::path::PathBuf;

use super::model::{ProfileKind, Repeat, Side};
use super::{compare, json, svg, table, ALPHA};

fn side(a: u64, b: u64, noise: &[i64]) -> Side {
    let repeats = noise
        .iter()
        .map(|&n| Repeat {
            source: PathBuf::from("r"),
            stacks: [
                ("app;main;mid;a", (a as i64 + n) as u64),
                ("app;main;mid;b", (b as i64 - n) as u64),
                ("app;main;c", 100),
            ]
            .iter()
            .map(|(s, v)| (s.split(';').map(str::to_owned).collect(), *v))
            .collect(),
        })
        .collect();
    Side {
        path: PathBuf::from("x"),
        kind: ProfileKind::Cpu,
        sample_type: "samples/count".into(),
        samples: 1200,
        from_blocks: true,
        repeats,
        empty_repeats: 0,
    }
}

fn fixture() -> (Side, Side) {
    (side(150, 50, &[0, 3, -2, 1]), side(50, 150, &[2, -3, 0, 1]))
}

#[test]
fn table_lists_the_changes_biggest_first_then_the_count() {
    let (before, after) = fixture();
    let c = compare(&before, &after, ALPHA, 0.01);
    let text = table::render(&before, &after, &c);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("BEFORE 4 time blocks of one recording, 1200 samples"), "{text}");
    let rows: Vec<&&str> = lines.iter().filter(|l| l.ends_with(" a") || l.ends_with(" b")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows.iter().any(|r| r.contains("shrank") && r.contains("-33.")), "{text}");
    assert!(rows.iter().any(|r| r.contains("grew") && r.contains("+33.")), "{text}");
    assert!(!text.lines().any(|l| l.ends_with(" c") || l.ends_with(" mid")), "{text}");
    assert!(lines.last().unwrap().starts_with("2 of 6 functions compared changed significantly"), "{text}");
    assert!(text.contains("Holm") && text.contains("the other 4 did not change significantly"), "{text}");
}

#[test]
fn json_has_exactly_the_documented_fields() {
    let (before, after) = fixture();
    let c = compare(&before, &after, ALPHA, 0.01);
    let doc: serde_json::Value = serde_json::from_str(&json::render(&before, &after, &c)).unwrap();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&doc), ["after", "alpha", "before", "functions", "test"]);
    assert_eq!(keys(&doc["before"]), ["profiles", "samples", "total"]);
    assert_eq!(doc["before"]["profiles"], 4);
    assert_eq!(doc["after"]["total"], 4 * 300);
    assert_eq!(doc["test"], super::METHOD);
    assert_eq!(doc["alpha"], 0.05);
    let f = &doc["functions"][0];
    assert_eq!(
        keys(f),
        [
            "ci95",
            "delta",
            "direction",
            "name",
            "p_value",
            "self_after",
            "self_before",
            "significant",
            "total_after",
            "total_before"
        ]
    );
    assert!(f["name"] == "a" || f["name"] == "b");
    assert_eq!(f["ci95"].as_array().unwrap().len(), 2);
    let c_row = doc["functions"].as_array().unwrap().iter().find(|f| f["name"] == "c").unwrap();
    assert_eq!((c_row["significant"].as_bool(), c_row["direction"].as_str()), (Some(false), Some("none")));
}

#[test]
fn svg_has_widths_from_after_and_verdict_colours() {
    let (before, after) = fixture();
    let c = compare(&before, &after, ALPHA, 0.01);
    let text = String::from_utf8(svg::render(&before, &after, &c).unwrap()).unwrap();
    assert!(text.contains("Differential cpu flame graph"));
    // AFTER: b has 150 of 300 per repeat, 600 in all.
    assert!(text.contains("b: total 16.") && text.contains("grew (significant)"), "tooltip");
    assert!(text.contains("rgb(0,0,255)") || text.contains("rgb(255,0,0)"), "the biggest change is saturated");
    assert!(text.contains("no significant change"));
}
