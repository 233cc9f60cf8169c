//! Per-repeat shares of every function, and the test of their change.

use std::collections::{HashMap, HashSet};

use super::model::{Comparison, Direction, FunctionChange, Repeat, Side};
use super::stats::{holm, mean_var, welch};

/// Inclusive and self shares of each function, one value per repeat.
#[derive(Debug, Default)]
struct Shares<'a> {
    total: HashMap<&'a str, Vec<f64>>,
    own: HashMap<&'a str, Vec<f64>>,
}

fn shares(repeats: &[Repeat]) -> Shares<'_> {
    let n = repeats.len();
    let mut out = Shares::default();
    let mut seen: HashSet<&str> = HashSet::new();
    for (r, repeat) in repeats.iter().enumerate() {
        let total = repeat.total() as f64;
        if total <= 0.0 {
            continue;
        }
        let mut inclusive: HashMap<&str, u64> = HashMap::new();
        let mut own: HashMap<&str, u64> = HashMap::new();
        for (frames, value) in &repeat.stacks {
            // A recursive function is in the stack once, whatever its depth.
            seen.clear();
            for f in frames {
                if seen.insert(f.as_str()) {
                    *inclusive.entry(f.as_str()).or_default() += value;
                }
            }
            if let Some(leaf) = frames.last() {
                *own.entry(leaf.as_str()).or_default() += value;
            }
        }
        for (name, v) in inclusive {
            out.total.entry(name).or_insert_with(|| vec![0.0; n])[r] = v as f64 / total;
        }
        for (name, v) in own {
            out.own.entry(name).or_insert_with(|| vec![0.0; n])[r] = v as f64 / total;
        }
    }
    out
}

/// Compares the per-repeat shares of every function with Welch's t-test,
/// Holm-corrected at `alpha` over the functions tested. Functions whose
/// mean share is below `min_change` on both sides cannot change by
/// `min_change` and are not tested, so they do not dilute the correction.
pub fn compare(before: &Side, after: &Side, alpha: f64, min_change: f64) -> Comparison {
    let b = shares(&before.repeats);
    let a = shares(&after.repeats);
    let zeros_b = vec![0.0; before.repeats.len()];
    let zeros_a = vec![0.0; after.repeats.len()];
    let mut names: Vec<&str> = b.total.keys().chain(a.total.keys()).copied().collect();
    names.sort_unstable();
    names.dedup();

    let mut tested = Vec::new();
    let mut untested = 0;
    for name in names {
        let tb = b.total.get(name).unwrap_or(&zeros_b);
        let ta = a.total.get(name).unwrap_or(&zeros_a);
        let (mb, ma) = (mean_var(tb).0, mean_var(ta).0);
        if mb.max(ma) < min_change || mb.max(ma) <= 0.0 {
            untested += 1;
            continue;
        }
        let w = welch(tb, ta);
        let self_b = mean_var(b.own.get(name).unwrap_or(&zeros_b)).0;
        let self_a = mean_var(a.own.get(name).unwrap_or(&zeros_a)).0;
        tested.push(FunctionChange {
            name: name.to_owned(),
            total_before: mb,
            total_after: ma,
            self_before: self_b,
            self_after: self_a,
            delta: w.delta,
            ci95: w.ci95,
            p_value: w.p_value,
            significant: false,
            direction: Direction::None,
        });
    }
    let raw: Vec<f64> = tested.iter().map(|f| f.p_value).collect();
    for (f, p) in tested.iter_mut().zip(holm(&raw)) {
        f.p_value = p;
        f.significant = p < alpha && f.delta.abs() >= min_change;
        f.direction = match (f.significant, f.delta > 0.0) {
            (false, _) => Direction::None,
            (true, true) => Direction::Up,
            (true, false) => Direction::Down,
        };
    }
    tested.sort_by(|x, y| y.delta.abs().total_cmp(&x.delta.abs()).then_with(|| x.name.cmp(&y.name)));
    Comparison { functions: tested, untested, alpha, min_change }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::model::ProfileKind;
    use std::path::PathBuf;

    fn repeat(stacks: &[(&str, u64)]) -> Repeat {
        Repeat {
            source: PathBuf::from("x"),
            stacks: stacks.iter().map(|(s, v)| (s.split(';').map(str::to_owned).collect(), *v)).collect(),
        }
    }

    fn side(repeats: Vec<Repeat>) -> Side {
        Side {
            path: PathBuf::from("x"),
            kind: ProfileKind::Cpu,
            sample_type: "samples/count".into(),
            samples: 0,
            from_blocks: false,
            repeats,
            empty_repeats: 0,
        }
    }

    /// `a` and `b` leaves under `mid`, plus an untouched `c`, with a little
    /// noise per repeat.
    fn workload(a: u64, b: u64, noise: &[i64]) -> Side {
        side(
            noise
                .iter()
                .map(|&n| {
                    repeat(&[
                        ("app;main;mid;a", (a as i64 + n) as u64),
                        ("app;main;mid;b", (b as i64 - n) as u64),
                        ("app;main;c", 100),
                        ("app;main;rec;rec;rec", 2),
                    ])
                })
                .collect(),
        )
    }

    #[test]
    fn shares_count_each_function_once_per_stack() {
        let side = workload(150, 50, &[0]);
        let s = shares(&side.repeats);
        assert_eq!(s.total["main"], vec![1.0]);
        assert!((s.total["rec"][0] - 2.0 / 302.0).abs() < 1e-12, "recursion counted once");
        assert!((s.own["rec"][0] - 2.0 / 302.0).abs() < 1e-12);
        assert!(!s.own.contains_key("mid"));
        assert!((s.total["mid"][0] - 200.0 / 302.0).abs() < 1e-12);
    }

    #[test]
    fn a_real_shift_is_flagged_both_ways_and_nothing_else() {
        let before = workload(150, 50, &[0, 3, -2, 1, -1]);
        let after = workload(50, 150, &[2, -3, 0, 1, -2]);
        let c = compare(&before, &after, 0.05, 0.01);
        let flagged: Vec<(&str, Direction)> = c.significant().map(|f| (f.name.as_str(), f.direction)).collect();
        assert_eq!(flagged.len(), 2, "{c:#?}");
        assert!(flagged.contains(&("a", Direction::Down)) && flagged.contains(&("b", Direction::Up)), "{flagged:?}");
        let a = &c.functions[0];
        assert!((a.delta.abs() - 100.0 / 302.0).abs() < 0.01);
        assert!(a.ci95.0 <= a.delta && a.delta <= a.ci95.1);
        for name in ["c", "mid", "main", "app"] {
            let f = c.functions.iter().find(|f| f.name == name).unwrap();
            assert!(!f.significant && f.direction == Direction::None, "{f:?}");
        }
        // `rec` is under 1 % on both sides: not tested.
        assert_eq!(c.untested, 1);
        assert!(c.functions.windows(2).all(|w| w[0].delta.abs() >= w[1].delta.abs()), "sorted by |delta|");
    }

    #[test]
    fn min_change_hides_small_significant_changes() {
        let before = workload(100, 100, &[0, 1, -1, 0]);
        let after = workload(103, 97, &[0, 1, -1, 0]);
        let strict = compare(&before, &after, 0.05, 0.0);
        assert!(strict.significant().any(|f| f.name == "a"), "{strict:#?}");
        let practical = compare(&before, &after, 0.05, 0.05);
        assert_eq!(practical.significant().count(), 0);
        let a = practical.functions.iter().find(|f| f.name == "a").unwrap();
        assert!(a.p_value < 0.05, "still statistically clear: {a:?}");
    }

    #[test]
    fn identical_sides_flag_nothing() {
        let before = workload(150, 50, &[0, 3, -2, 1]);
        let c = compare(&before, &before.clone(), 0.05, 0.01);
        assert_eq!(c.significant().count(), 0);
        assert!(c.functions.iter().all(|f| f.delta == 0.0 && f.p_value == 1.0));
    }
}
