//! Go-style durations (`300ms`, `1h30m`, `20h`): chasquid.conf's syntax, so
//! `give_up_send_after` carries over unchanged.

use std::time::Duration;

/// Parses a Go duration. There are no days; zero and negative values are
/// refused because every duration tambo reads must be positive.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.starts_with('-') {
        return Err(format!("{s:?} is negative; durations must be > 0"));
    }
    let body = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    let mut rest = body;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("{s:?}: expected a number before {rest:?}"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{s:?}: bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{s:?}: missing unit (ns, us, ms, s, m, h)")),
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (ns, us, ms, s, m, h)"
                ));
            }
        };
        total += value * scale;
    }
    if total <= 0.0 {
        return Err(format!("{s:?} must be > 0"));
    }
    if total > 1e12 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats like Go's `time.Duration.String` for the common cases
/// (`1m23.5s`, `20h0m0s`, `150ms`), as the mail log does.
pub fn format(d: Duration) -> String {
    let total = d.as_secs_f64();
    if total < 1.0 {
        let ms = d.as_secs_f64() * 1000.0;
        return format!("{}ms", trim_float(ms));
    }
    let h = d.as_secs() / 3600;
    let m = (d.as_secs() / 60) % 60;
    let s = total - (h * 3600 + m * 60) as f64;
    let s = trim_float(s);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

fn trim_float(v: f64) -> String {
    let t = format!("{v:.3}");
    let t = t.trim_end_matches('0').trim_end_matches('.');
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("20h").unwrap(), Duration::from_secs(72_000));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1_500));
        assert_eq!(parse("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse("2us").unwrap(), Duration::from_micros(2));
    }

    #[test]
    fn refuses_bad_durations() {
        for bad in ["", "10", "h", "1d", "-1h", "0s", "1h-", "1..2s", "abc"] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format(Duration::from_millis(83_500)), "1m23.5s");
        assert_eq!(format(Duration::from_secs(72_000)), "20h0m0s");
        assert_eq!(format(Duration::from_millis(150)), "150ms");
    }
}
