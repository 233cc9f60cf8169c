//! The `svg` format, `diff.svg`: a differential flame graph. Widths are
//! AFTER's (all its repeats summed); colour is the verdict: red grew, blue
//! shrank, saturated only when the change is significant, pale otherwise.

use std::collections::{BTreeMap, HashMap};

use super::model::{Comparison, Direction, Side};
use super::table::describe;
use crate::export::svg::{render_styled, FrameStyle};
use crate::export::ExportError;

/// Colour of functions that were not tested or did not move at all.
const NEUTRAL: (u8, u8, u8) = (224, 224, 224);

/// Renders `diff.svg`.
pub fn render(before: &Side, after: &Side, c: &Comparison) -> Result<Vec<u8>, ExportError> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for r in &after.repeats {
        for (frames, v) in &r.stacks {
            let slot = merged.entry(frames.join(";")).or_default();
            *slot = slot.saturating_add(*v);
        }
    }
    let folded: String = merged.iter().map(|(s, v)| format!("{s} {v}\n")).collect();

    let biggest = c.significant().map(|f| f.delta.abs()).fold(0.0_f64, f64::max);
    let mut styles: HashMap<String, FrameStyle> = HashMap::new();
    for f in &c.functions {
        let rgb = colour(f.direction, f.delta, biggest);
        let verdict = match f.direction {
            Direction::Up => "grew (significant)",
            Direction::Down => "shrank (significant)",
            Direction::None => "no significant change",
        };
        let tooltip = format!(
            "{}: total {:.2}% -> {:.2}%, self {:.2}% -> {:.2}%, change {:+.2} points (95% interval {:+.2} to {:+.2}), \
             adjusted p = {:.3}: {verdict}",
            f.name,
            f.total_before * 100.0,
            f.total_after * 100.0,
            f.self_before * 100.0,
            f.self_after * 100.0,
            f.delta * 100.0,
            f.ci95.0 * 100.0,
            f.ci95.1 * 100.0,
            f.p_value,
        );
        styles.insert(f.name.clone(), FrameStyle { rgb, tooltip });
    }
    // Functions too small to test keep a neutral colour, so the palette's
    // warm colours cannot be mistaken for "grew".
    for name in merged.keys().flat_map(|s| s.split(';')) {
        if !styles.contains_key(name) {
            let tooltip = format!("{name}: under {:.1} % of both sides, not tested", c.min_change * 100.0);
            styles.insert(name.to_owned(), FrameStyle { rgb: NEUTRAL, tooltip });
        }
    }
    let subtitle = format!(
        "Widths: AFTER ({}). Red grew, blue shrank; saturated = significant (Holm, alpha {}), pale = not. BEFORE: {}.",
        describe(after),
        c.alpha,
        describe(before)
    );
    let count = if after.sample_type.ends_with("/count") { "samples" } else { "ns" };
    render_styled(&folded, &format!("Differential {} flame graph", after.kind), &subtitle, count, &styles)
}

/// Saturated red/blue for significant changes (deeper for bigger ones), a
/// pale tint of the same hue otherwise.
fn colour(direction: Direction, delta: f64, biggest: f64) -> (u8, u8, u8) {
    let (strength, up) = match direction {
        Direction::Up | Direction::Down => {
            let k = if biggest > 0.0 { (delta.abs() / biggest).min(1.0) } else { 1.0 };
            (0.6 + 0.4 * k, direction == Direction::Up)
        }
        Direction::None if delta == 0.0 => return NEUTRAL,
        Direction::None => (0.12, delta > 0.0),
    };
    let other = (255.0 * (1.0 - strength)).round() as u8;
    if up {
        (255, other, other)
    } else {
        (other, other, 255)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_is_saturated_and_the_rest_pale() {
        let (r, g, b) = colour(Direction::Up, 0.3, 0.3);
        assert_eq!((r, g, b), (255, 0, 0));
        let (r, g, b) = colour(Direction::Down, 0.01, 0.3);
        assert!(b == 255 && r == g && r < 110, "{r} {g} {b}");
        let (r, g, b) = colour(Direction::None, 0.02, 0.3);
        assert!(r == 255 && g > 200 && g == b, "pale red {r} {g} {b}");
        let (r, g, b) = colour(Direction::None, -0.02, 0.3);
        assert!(b == 255 && r > 200, "pale blue {r} {g} {b}");
        assert_eq!(colour(Direction::None, 0.0, 0.3), NEUTRAL);
    }
}
