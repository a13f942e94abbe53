//! The policy itself: parsing the text a domain serves (RFC 8461 §3.2),
//! checking it (REFERENCE §4.7), and matching MX hosts against it (§4.1).
//!
//! Parsing is strict: whatever the grammar does not allow makes the whole
//! policy invalid, and an invalid policy is treated as no policy at all.

use std::time::Duration;

/// The longest `max_age` a policy may ask for (RFC 8461 §3.2: one year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// The one policy version there is.
pub const VERSION: &str = "STSv1";

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl Mode {
    /// The label of `chasquid/smtpOut/sts/mode`, and the policy's own
    /// word for the mode.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }

    /// The mode a policy names; the match is exact (`%s` in the RFC's ABNF).
    fn parse(s: &str) -> Option<Mode> {
        match s {
            "enforce" => Some(Mode::Enforce),
            "testing" => Some(Mode::Testing),
            "none" => Some(Mode::None),
            _ => None,
        }
    }
}

/// A valid policy (REFERENCE §4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub max_age: Duration,
    /// The `mx` patterns, as given (`mx.example.com`, `*.example.net`).
    pub mx: Vec<String>,
}

/// Why a policy is invalid. Texts may quote what the server sent: they
/// are `{:?}`-escaped so a hostile policy cannot forge log lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("the policy is not UTF-8 text")]
    NotUtf8,
    #[error("line {0} is not a `key: value` field")]
    BadLine(usize),
    #[error("`{0}` appears more than once")]
    Repeated(&'static str),
    #[error("no `{0}` field")]
    Missing(&'static str),
    #[error("unknown version {0:?}")]
    Version(String),
    #[error("unknown mode {0:?}")]
    Mode(String),
    #[error("max_age {0:?} is not a number of seconds between 1 and {MAX_AGE_LIMIT}")]
    MaxAge(String),
    #[error("mx {0:?} is not a host name or `*.` and a host name")]
    Mx(String),
}

/// The fields of a policy, before they are checked: what the text had, or
/// what the cache file holds (both go through [`Fields::check`]).
#[derive(Debug, Default)]
pub struct Fields<'a> {
    pub version: Option<&'a str>,
    pub mode: Option<&'a str>,
    pub max_age: Option<u64>,
    pub mx: Vec<&'a str>,
}

impl Fields<'_> {
    /// The policy, if the fields make a valid one.
    pub fn check(self) -> Result<Policy, PolicyError> {
        let version = self.version.ok_or(PolicyError::Missing("version"))?;
        if version != VERSION {
            return Err(PolicyError::Version(excerpt(version)));
        }
        let mode = self.mode.ok_or(PolicyError::Missing("mode"))?;
        let mode = Mode::parse(mode).ok_or_else(|| PolicyError::Mode(excerpt(mode)))?;
        let max_age = self.max_age.ok_or(PolicyError::Missing("max_age"))?;
        if max_age == 0 || max_age > MAX_AGE_LIMIT {
            return Err(PolicyError::MaxAge(max_age.to_string()));
        }
        if let Some(bad) = self.mx.iter().find(|p| !valid_pattern(p)) {
            return Err(PolicyError::Mx(excerpt(bad)));
        }
        // RFC 8461's ABNF requires an mx "except when mode is none": that is
        // how a domain withdraws its policy (§8.3), and refusing such a
        // policy would keep an older `enforce` one alive until it expires.
        if self.mx.is_empty() && mode != Mode::None {
            return Err(PolicyError::Missing("mx"));
        }
        Ok(Policy {
            mode,
            max_age: Duration::from_secs(max_age),
            mx: self.mx.into_iter().map(str::to_string).collect(),
        })
    }
}

/// Parses and checks the policy text a domain serves.
///
/// The ABNF: one `name ":" *WSP value *WSP` field per line, LF or CRLF
/// ended, the last terminator optional. `version`, `mode` and `max_age`
/// appear exactly once, `mx` any number of times; other well-formed
/// fields are extensions and ignored. Field names and the values of
/// `version` and `mode` are case-sensitive. Empty lines are tolerated at
/// the end only (editors add them; the grammar has no place for them
/// anywhere else).
pub fn parse(raw: &[u8]) -> Result<Policy, PolicyError> {
    let text = std::str::from_utf8(raw).map_err(|_| PolicyError::NotUtf8)?;
    let mut f = Fields::default();
    let mut max_age_seen = false;
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let last = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(0, |i| i + 1);
    for (i, line) in lines[..last].iter().enumerate() {
        let n = i + 1;
        let (name, value) = line.split_once(':').ok_or(PolicyError::BadLine(n))?;
        let value = value.trim_matches(is_wsp);
        if !valid_field_name(name)
            || value.is_empty()
            || value.chars().any(|c| c.is_control() && c != '\t')
        {
            return Err(PolicyError::BadLine(n));
        }
        match name {
            "version" => set_once(&mut f.version, value, "version")?,
            "mode" => set_once(&mut f.mode, value, "mode")?,
            "max_age" => {
                if std::mem::replace(&mut max_age_seen, true) {
                    return Err(PolicyError::Repeated("max_age"));
                }
                f.max_age = Some(parse_max_age(value)?);
            }
            "mx" => f.mx.push(value),
            _ => {}
        }
    }
    f.check()
}

fn set_once<'a>(
    slot: &mut Option<&'a str>,
    value: &'a str,
    name: &'static str,
) -> Result<(), PolicyError> {
    if slot.replace(value).is_some() {
        return Err(PolicyError::Repeated(name));
    }
    Ok(())
}

/// `1*10DIGIT`: no sign, no spaces, so at most 9999999999 (no overflow).
fn parse_max_age(value: &str) -> Result<u64, PolicyError> {
    let bad = || PolicyError::MaxAge(excerpt(value));
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

/// The start of what a peer sent, for an error text: a log line quotes
/// it, and need not quote 10 KiB.
pub fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn is_wsp(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// `(ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")`.
fn valid_field_name(name: &str) -> bool {
    let b = name.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_alphanumeric())
        && b.len() <= 32
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// `["*."] Domain`: a wildcard only as the whole leftmost label.
fn valid_pattern(pattern: &str) -> bool {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    normalize_host(name).is_some()
}

impl Policy {
    /// Whether `mx_host` (an MX name from DNS) matches one of the
    /// patterns: exactly (case-insensitive, trailing dot ignored, IDNA
    /// applied), or `*.suffix` with exactly one more leftmost label.
    pub fn matches(&self, mx_host: &str) -> bool {
        let Some(host) = normalize_host(mx_host) else {
            return false;
        };
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => normalize_host(suffix).is_some_and(|suffix| {
                host.split_once('.')
                    .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix)
            }),
            None => normalize_host(p).is_some_and(|p| p == host),
        })
    }
}

/// A host name in the form names are compared in: IDNA-ASCII, lower case,
/// no trailing dot. None if it is not a host name (empty labels, a `*`
/// anywhere, too long, or not convertible).
pub fn normalize_host(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let ascii = idna::domain_to_ascii(name).ok()?;
    let ok = !ascii.is_empty()
        && ascii.len() <= 253
        && ascii
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(host_byte));
    ok.then_some(ascii)
}

/// Letters, digits, hyphens; and underscores, which some MX names carry
/// although RFC 5321's Domain has none (rejecting them would only turn
/// such a policy off).
fn host_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Policy {
        parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn err(text: &str) -> PolicyError {
        match parse(text.as_bytes()) {
            Ok(p) => panic!("{text:?} parsed as {p:?}"),
            Err(e) => e,
        }
    }

    fn policy(mx: &[&str]) -> Policy {
        Policy {
            mode: Mode::Enforce,
            max_age: Duration::from_secs(1),
            mx: mx.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn valid_policies() {
        let p = ok(
            "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400\n",
        );
        assert_eq!(
            p,
            Policy {
                mode: Mode::Enforce,
                max_age: Duration::from_secs(86400),
                mx: vec!["mx1.example.com".into(), "*.example.net".into()],
            }
        );
        // CRLF, no final terminator, any order, WSP around values, an
        // extension field, the largest max_age, trailing empty lines.
        let p = ok(
            "mode:\ttesting \r\nmax_age:31557600\r\nx-ext.1: some thing\r\nmx: mx.example.com\r\nversion: STSv1",
        );
        assert_eq!(p.mode, Mode::Testing);
        assert_eq!(p.max_age, Duration::from_secs(MAX_AGE_LIMIT));
        assert_eq!(p.mx, ["mx.example.com"]);
        assert_eq!(
            ok("version: STSv1\nmode: none\nmx: a.example\nmax_age: 1\n\n\r\n").mode,
            Mode::None
        );
        // Withdrawing a policy (RFC 8461 §8.3): mode none needs no mx.
        assert!(ok("version: STSv1\nmode: none\nmax_age: 1\n").mx.is_empty());
        // IDNA in a pattern.
        assert_eq!(
            ok("version: STSv1\nmode: enforce\nmx: *.ñaca.example\nmax_age: 5\n").mx,
            ["*.ñaca.example"]
        );
    }

    #[test]
    fn invalid_policies() {
        let base = |replace: &str, with: &str| {
            let text = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 600\n";
            assert!(text.contains(replace));
            text.replace(replace, with)
        };
        // Version.
        assert_eq!(
            err(&base("STSv1", "STSv2")),
            PolicyError::Version("STSv2".into())
        );
        assert_eq!(
            err(&base("STSv1", "stsv1")),
            PolicyError::Version("stsv1".into())
        );
        assert_eq!(
            err(&base("version: STSv1\n", "")),
            PolicyError::Missing("version")
        );
        // Mode.
        assert_eq!(
            err(&base("enforce", "report")),
            PolicyError::Mode("report".into())
        );
        assert_eq!(
            err(&base("enforce", "Enforce")),
            PolicyError::Mode("Enforce".into())
        );
        assert_eq!(
            err(&base("mode: enforce\n", "")),
            PolicyError::Missing("mode")
        );
        // max_age: zero, over a year, not a number, signed, too many digits.
        for bad in [
            "0",
            "31557601",
            "ten",
            "-1",
            "+5",
            "1.5",
            "99999999999",
            "1 2",
        ] {
            assert_eq!(
                err(&base("600", bad)),
                PolicyError::MaxAge(bad.into()),
                "{bad}"
            );
        }
        assert_eq!(
            err(&base("max_age: 600\n", "")),
            PolicyError::Missing("max_age")
        );
        // No mx outside mode none; malformed patterns.
        assert_eq!(
            err(&base("mx: mx.example.com\n", "")),
            PolicyError::Missing("mx")
        );
        for bad in [
            "*",
            "*.",
            "a.*.example.com",
            "**.example.com",
            "a..b",
            "a b",
        ] {
            assert_eq!(
                err(&base("mx.example.com", bad)),
                PolicyError::Mx(bad.into()),
                "{bad}"
            );
        }
        // Repeated single fields.
        assert_eq!(
            err(&base("mode: enforce\n", "mode: enforce\nmode: none\n")),
            PolicyError::Repeated("mode")
        );
        assert_eq!(
            err(&base("max_age: 600\n", "max_age: 600\nmax_age: 600\n")),
            PolicyError::Repeated("max_age")
        );
        assert_eq!(
            err(&base(
                "version: STSv1\n",
                "version: STSv1\nversion: STSv1\n"
            )),
            PolicyError::Repeated("version")
        );
        // Garbage and lines the grammar has no place for.
        assert_eq!(err("<html>hello</html>"), PolicyError::BadLine(1));
        assert_eq!(
            err(&base("mode: enforce\n", "mode: enforce\n\n")),
            PolicyError::BadLine(3)
        );
        assert_eq!(
            err(&base("mode:", " mode:")),
            PolicyError::BadLine(2),
            "space before a name"
        );
        assert_eq!(
            err(&base("mode:", "mode :")),
            PolicyError::BadLine(2),
            "space before the colon"
        );
        assert_eq!(
            err(&base("mode: enforce", "mode:")),
            PolicyError::BadLine(2),
            "empty value"
        );
        assert_eq!(
            err(&base("mode: enforce", "mode: enforce\u{7}")),
            PolicyError::BadLine(2),
            "control character"
        );
        assert_eq!(err(""), PolicyError::Missing("version"));
        assert_eq!(parse(b"version: STSv1\xff"), Err(PolicyError::NotUtf8));
    }

    #[test]
    fn errors_quote_an_excerpt() {
        let long = "x".repeat(1000);
        let e = err(&format!(
            "version: STSv1\nmode: {long}\nmx: a.b\nmax_age: 1\n"
        ));
        assert_eq!(e, PolicyError::Mode(format!("{}…", "x".repeat(64))));
        assert_eq!(excerpt("ñ".repeat(64).as_str()), "ñ".repeat(64));
        assert_eq!(
            excerpt("ñ".repeat(65).as_str()),
            format!("{}…", "ñ".repeat(64))
        );
    }

    #[test]
    fn exact_matches() {
        let p = policy(&["mx.example.com"]);
        assert!(p.matches("mx.example.com"));
        assert!(p.matches("MX.Example.COM"), "case");
        assert!(p.matches("mx.example.com."), "trailing dot in the host");
        assert!(policy(&["mx.example.com."]).matches("mx.example.com"));
        assert!(policy(&["MX.EXAMPLE.com"]).matches("mx.example.com"));
        assert!(!p.matches("x.mx.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("mx.example.co"));
        assert!(!p.matches(""));
        assert!(!p.matches("."));
        // A policy with several patterns: any one will do.
        let p = policy(&["a.example", "b.example"]);
        assert!(p.matches("b.example"));
        assert!(!p.matches("c.example"));
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let p = policy(&["*.example.com"]);
        assert!(p.matches("mx.example.com"));
        assert!(p.matches("MX1.example.com."));
        assert!(!p.matches("example.com"), "zero labels");
        assert!(!p.matches(".example.com"), "an empty label");
        assert!(!p.matches("a.b.example.com"), "two labels");
        assert!(!p.matches("mx.example.net"));
        assert!(!p.matches("mxexample.com"));
        // `*` in the host is never a wildcard.
        assert!(!policy(&["a.example.com"]).matches("*.example.com"));
    }

    #[test]
    fn idna_on_both_sides() {
        let p = policy(&["ñaca.example"]);
        assert!(p.matches("ñaca.example"));
        assert!(p.matches("Ñaca.example"));
        assert!(p.matches("xn--aca-6ma.example"));
        assert!(!p.matches("naca.example"));
        let p = policy(&["*.xn--aca-6ma.example"]);
        assert!(p.matches("mx.ñaca.example"));
        assert!(!p.matches("mx.naca.example"));
        let p = policy(&["*.ñaca.example"]);
        assert!(p.matches("mx.xn--aca-6ma.example"));
    }

    #[test]
    fn host_names_are_normalized() {
        assert_eq!(normalize_host("Mx.Example.").as_deref(), Some("mx.example"));
        assert_eq!(
            normalize_host("ñ.example").as_deref(),
            Some("xn--ida.example")
        );
        for bad in ["", ".", "a..b", ".a", "a/b", "*.a", "a b", "pol:x"] {
            assert_eq!(normalize_host(bad), None, "{bad:?}");
        }
        assert_eq!(normalize_host(&"a".repeat(64)), None);
        assert!(normalize_host(&["a"; 127].join(".")).is_some());
        assert_eq!(normalize_host(&["a"; 128].join(".")), None);
    }
}
