//! Human durations for flags and config: `10` (seconds), `10s`, `500ms`,
//! `2m`, `1h`, `250us`, `100ns`.

use std::time::Duration;

/// Parses a duration; a bare number is seconds. Fractions are allowed
/// (`1.5s`). The error says what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let expected = || {
        format!("invalid duration `{text}`: expected a number of seconds or a number with a unit (ns, us, ms, s, m, h), e.g. `10` or `10s`")
    };
    let value: f64 = number.parse().map_err(|_| expected())?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(expected()),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e12 {
        return Err(format!("invalid duration `{text}`: too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_units() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("40us"), Ok(Duration::from_micros(40)));
    }

    #[test]
    fn rejects_garbage_with_the_input_in_the_message() {
        for bad in ["", "abc", "10x", "-1", "s", "1e400"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn whole_seconds_round_trip(n in 0u64..1_000_000) {
            prop_assert_eq!(parse_duration(&format!("{n}s")), Ok(Duration::from_secs(n)));
            prop_assert_eq!(parse_duration(&n.to_string()), Ok(Duration::from_secs(n)));
        }
    }
}
