//! Durations as Istio documents write them (`5s`, `0.5s`, `100ms`, `1m`, `1h30m`).
//!
//! Istio reads `google.protobuf.Duration` fields through Go's JSON unmarshaller, which hands the
//! string to `time.ParseDuration`; the CRD schema checks the same strings with CEL's
//! `duration()`. So the accepted grammar is Go's: an optional `+`, then one or more decimal
//! numbers each with a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), or a bare `0`. The proto
//! JSON form (`1.5s`) is a special case of it. Negative durations are refused: no Istio field
//! takes one.

use std::time::Duration;

/// Parses a Go-style duration string.
pub fn parse(text: &str) -> Result<Duration, String> {
    let invalid =
        || format!("`{text}` is not a duration (write e.g. `5s`, `0.5s`, `100ms`, `1m`, `1h`)");
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.starts_with('-') {
        return Err(format!("`{text}`: a duration cannot be negative"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0; // nanoseconds
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("`{text}`: missing unit (ns, us, ms, s, m or h)"))?;
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("`{text}`: missing unit (ns, us, ms, s, m or h)")),
            other => return Err(format!("`{text}`: unknown unit `{other}`")),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(invalid());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| invalid())?
        };
        let mut nanos = whole.checked_mul(scale).ok_or_else(invalid)?;
        // Fractions are kept to the nanosecond, as Go does; further digits are dropped.
        let mut place = scale;
        for d in frac.bytes() {
            place /= 10;
            if place == 0 {
                break;
            }
            nanos += u128::from(d - b'0') * place;
        }
        total = total.checked_add(nanos).ok_or_else(invalid)?;
        rest = tail;
    }
    // Go's limit (~292 years) keeps the value meaningful; anything beyond is a typo.
    if total > i64::MAX as u128 {
        return Err(format!("`{text}` is too long a duration"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Istio's rule for most duration fields (`agent.ValidateDuration`): at least 1ms, and a whole
/// number of milliseconds.
pub fn check_istio(d: Duration) -> Result<Duration, String> {
    if d < Duration::from_millis(1) {
        return Err("duration must be at least 1ms".into());
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err("only durations to ms precision are supported".into());
    }
    Ok(d)
}

/// A compact rendering for `/config_dump` (`1.5s`, `100ms`).
pub fn show(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) && d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_forms_istio_documents_use() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("5s", ms(5_000)),
            ("0.5s", ms(500)),
            (".5s", ms(500)),
            ("1.5s", ms(1_500)),
            ("100ms", ms(100)),
            ("10ms", ms(10)),
            ("1m", ms(60_000)),
            ("3m", ms(180_000)),
            ("1h", ms(3_600_000)),
            ("24h", ms(86_400_000)),
            ("1h30m", ms(5_400_000)),
            ("2m0.25s", ms(120_250)),
            ("+7s", ms(7_000)),
            ("1500us", ms(1) + Duration::from_micros(500)),
            ("1µs", Duration::from_micros(1)),
            ("3ns", Duration::from_nanos(3)),
            ("0.000000001s", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refuses_what_go_refuses() {
        for (text, why) in [
            ("", "not a duration"),
            ("5", "missing unit"),
            ("s", "not a duration"),
            ("1.2.3s", "not a duration"),
            ("-1s", "cannot be negative"),
            ("5 s", "unknown unit `"),
            ("1d", "unknown unit `d`"),
            ("5sec", "unknown unit `sec`"),
            ("1s5", "missing unit"),
            ("999999999999999999999999999999999999999h", "not a duration"),
            ("9999999h", "too long"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn istio_bounds() {
        assert!(check_istio(Duration::ZERO)
            .unwrap_err()
            .contains("at least 1ms"));
        assert!(check_istio(Duration::from_micros(1500))
            .unwrap_err()
            .contains("ms precision"));
        assert_eq!(
            check_istio(Duration::from_millis(1)),
            Ok(Duration::from_millis(1))
        );
    }

    #[test]
    fn shows_compactly() {
        assert_eq!(show(Duration::from_secs(5)), "5s");
        assert_eq!(show(Duration::from_millis(250)), "250ms");
        assert_eq!(show(Duration::from_millis(1500)), "1.5s");
    }
}
