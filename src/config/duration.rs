//! Durations as written in the config file: `"250ms"`, `"10s"`, `"5m"`, `"1h"`, `"1d"`,
//! or a compound of those from the largest unit to the smallest (`"1m30s"`).

use std::time::Duration;

const EXPECTED: &str = r#"expected a number followed by ms, s, m, h or d (e.g. "250ms", "10s")"#;

/// Units from largest to smallest: (suffix, milliseconds).
const UNITS: [(&str, u64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// Parses a duration such as `"250ms"`, `"10s"`, `"5m"`, `"1h"`, `"1d"` or `"1m30s"`.
///
/// The error message is complete (it quotes the input and says what is expected).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = |why: &str| {
        if why.is_empty() { format!("invalid duration {s:?}: {EXPECTED}") } else { format!("invalid duration {s:?}: {why}; {EXPECTED}") }
    };
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.starts_with('-') {
        return Err(err("must not be negative"));
    }
    let mut rest = s;
    let mut total_ms: u64 = 0;
    // Index into UNITS of the last unit seen: the next one must be strictly smaller.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err(""));
        }
        let (num, tail) = rest.split_at(digits);
        let letters = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(letters);
        if unit.is_empty() {
            return Err(err(if tail.is_empty() { "missing unit" } else { "" }));
        }
        let Some(idx) = UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(err(&format!("unknown unit {unit:?}")));
        };
        if last_unit.is_some_and(|last| idx <= last) {
            return Err(err(r#"units must go from the largest to the smallest, each at most once (e.g. "1m30s")"#));
        }
        last_unit = Some(idx);
        let too_large = || format!("invalid duration {s:?}: too large");
        let n: u64 = num.parse().map_err(|_| too_large())?;
        let ms = n.checked_mul(UNITS[idx].1).ok_or_else(too_large)?;
        total_ms = total_ms.checked_add(ms).ok_or_else(too_large)?;
        rest = tail;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration the way `parse_duration` reads it (`"1m30s"`, `"250ms"`, `"0s"`).
/// Sub-millisecond parts are dropped.
pub fn format_duration(d: Duration) -> String {
    let mut ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in UNITS {
        let n = ms / size;
        if n > 0 {
            out.push_str(&n.to_string());
            out.push_str(unit);
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_single_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn accepts_compounds() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h1s"), Ok(Duration::from_secs(3601)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1d2h3m4s5ms"), Ok(Duration::from_millis(93_784_005)));
    }

    #[test]
    fn rejects_bad_input_with_expectation() {
        for bad in ["", "-5s", "10", "10 seconds", "s", "1.5s", "10S", " 10s", "10s ", "1m1m", "30s1m", "10x", "1μs", "+1s", "1s-"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.starts_with(&format!("invalid duration {bad:?}")), "{e}");
            assert!(e.contains("expected"), "{bad}: {e}");
        }
        assert_eq!(
            parse_duration("10 seconds").unwrap_err(),
            r#"invalid duration "10 seconds": expected a number followed by ms, s, m, h or d (e.g. "250ms", "10s")"#
        );
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("-1s").unwrap_err().contains("negative"));
    }

    #[test]
    fn rejects_overflow() {
        for big in ["99999999999999999999s", "18446744073709551615s", "213503982334601d", "1d18446744073709551615ms"] {
            assert!(parse_duration(big).unwrap_err().contains("too large"), "{big}");
        }
    }

    #[test]
    fn format_round_trips() {
        for s in ["250ms", "10s", "1m30s", "1h", "1d", "1d2h3m4s5ms", "0s"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(format_duration(d), s);
        }
    }
}
