//! Version and build time, the same in every binary of one build.

/// tambo's version, as printed by `--version` and exported as
/// `chasquid/version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Build time in Unix seconds (SOURCE_DATE_EPOCH when set at build time).
pub fn timestamp() -> i64 {
    env!("TAMBO_BUILD_TIMESTAMP").parse().unwrap_or(0)
}

/// Build time as `YYYY-MM-DD HH:MM:SS +0000`, the form of
/// `chasquid/sourceDateStr`.
pub fn date_str() -> String {
    let ts = timestamp();
    let days = ts.div_euclid(86_400);
    let secs = ts.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} +0000",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm), so no date crate is needed for this.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The line `--version` prints for a binary.
pub fn version_line(binary: &str) -> String {
    format!("{binary} {VERSION} (built {})", date_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_781), (2026, 11, 24));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
