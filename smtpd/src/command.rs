//! Parsing SMTP command lines: the verb, and MAIL/RCPT paths and
//! parameters. No I/O and no policy here; [`crate::session`] decides what
//! each result means.

use tambo_common::address;

/// The verbs tambo knows; anything else is `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Helo,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    Rset,
    Noop,
    Help,
    Quit,
    Vrfy,
    Expn,
    StartTls,
    Auth,
    /// HTTP verbs on the SMTP port (a browser, or a cross-protocol attack).
    Http,
    Unknown,
}

/// A command line split into its verb and argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command<'a> {
    pub verb: Verb,
    /// The verb as sent, for metrics and logs.
    pub raw_verb: &'a [u8],
    /// Everything after the first space, as bytes (may not be UTF-8).
    pub arg: &'a [u8],
}

/// Splits a line (without its line ending) at the first space.
pub fn parse(line: &[u8]) -> Command<'_> {
    let (raw_verb, arg) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], trim(&line[i + 1..])),
        None => (line, &line[line.len()..]),
    };
    let verb = match raw_verb.to_ascii_uppercase().as_slice() {
        b"HELO" => Verb::Helo,
        b"EHLO" => Verb::Ehlo,
        b"MAIL" => Verb::Mail,
        b"RCPT" => Verb::Rcpt,
        b"DATA" => Verb::Data,
        b"RSET" => Verb::Rset,
        b"NOOP" => Verb::Noop,
        b"HELP" => Verb::Help,
        b"QUIT" => Verb::Quit,
        b"VRFY" => Verb::Vrfy,
        b"EXPN" => Verb::Expn,
        b"STARTTLS" => Verb::StartTls,
        b"AUTH" => Verb::Auth,
        b"GET" | b"POST" | b"CONNECT" => Verb::Http,
        _ => Verb::Unknown,
    };
    Command {
        verb,
        raw_verb,
        arg,
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// Most distinct `unknown"…"` labels one smtpd process reports; past it,
/// new unknown verbs count as plain `unknown`. Clients choose these labels,
/// and monitord's key budget must not be spent by them, or real counters
/// (a first 502, a refused session) would be dropped.
pub const MAX_UNKNOWN_LABELS: usize = 64;

/// The metrics label of a command: its upper-case verb, or for unknown
/// verbs `unknown"XXXXXX"` with at most 6 bytes, quoted as Go's
/// `strconv.Quote` does (REFERENCE §7.2), for the first
/// [`MAX_UNKNOWN_LABELS`] distinct ones.
pub fn metric_label(cmd: &Command<'_>) -> String {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    match cmd.verb {
        Verb::Unknown => {
            let label = format!(
                "unknown{}",
                go_quote(&cmd.raw_verb[..cmd.raw_verb.len().min(6)])
            );
            bounded_label(&mut SEEN.lock().unwrap_or_else(|e| e.into_inner()), label)
        }
        _ => String::from_utf8_lossy(cmd.raw_verb).to_ascii_uppercase(),
    }
}

/// `label` if it was seen before or there is room for it; else `unknown`.
fn bounded_label(seen: &mut Vec<String>, label: String) -> String {
    if seen.contains(&label) {
        return label;
    }
    if seen.len() < MAX_UNKNOWN_LABELS {
        seen.push(label.clone());
        return label;
    }
    "unknown".into()
}

fn go_quote(b: &[u8]) -> String {
    let mut s = String::from("\"");
    for &c in b {
        match c {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7E => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push('"');
    s
}

/// Why a MAIL/RCPT argument was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// No `FROM:` / `TO:` (500 5.5.2).
    NoKeyword,
    /// `FROM:` / `TO:` with nothing after it (500 5.5.4).
    Empty,
    /// Not an address we can read (501).
    Malformed(&'static str),
    /// Longer than 256 characters (501).
    TooLong,
    /// The domain does not pass IDNA (501 5.1.8 / 5.1.2).
    BadDomain,
    /// A sender without a domain (501 5.1.8).
    NoDomain,
}

/// A parsed MAIL FROM or RCPT TO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathArg {
    /// The address with its domain normalised (user part as sent); empty
    /// for the null path `<>`.
    pub address: String,
    /// `SIZE=` if given and numeric.
    pub size: Option<u64>,
}

/// Parses `FROM:<addr> params` (`keyword` = `FROM:`) or `TO:<addr>`.
pub fn parse_path(arg: &[u8], keyword: &str) -> Result<PathArg, PathError> {
    let arg = std::str::from_utf8(arg).map_err(|_| PathError::Malformed("not valid UTF-8"))?;
    // `get` rather than indexing: the cut may fall inside a multi-byte
    // character (found by fuzzing: `MAIL FRñ…` used to panic).
    if !arg
        .get(..keyword.len())
        .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
    {
        return Err(PathError::NoKeyword);
    }
    let rest = arg[keyword.len()..].trim_start();
    if rest.is_empty() {
        return Err(PathError::Empty);
    }
    let (path, params) = if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>').ok_or(PathError::Malformed("missing '>'"))?;
        (&inner[..end], inner[end + 1..].trim())
    } else {
        match rest.split_once(' ') {
            Some((p, params)) => (p, params.trim()),
            None => (rest, ""),
        }
    };
    // A source route (`@a,@b:user@d`) is ignored, as RFC 5321 allows.
    let path = match path.strip_prefix('@') {
        Some(p) => p
            .split_once(':')
            .map(|(_, a)| a)
            .ok_or(PathError::Malformed("bad source route"))?,
        None => path,
    };
    let mut size = None;
    for param in params.split_ascii_whitespace() {
        if let Some(v) = param
            .get(..5)
            .filter(|p| p.eq_ignore_ascii_case("SIZE="))
            .map(|_| &param[5..])
        {
            size = v.parse().ok();
        }
    }
    if path.is_empty() {
        return Ok(PathArg {
            address: String::new(),
            size,
        });
    }
    if path.chars().count() > address::MAX_ADDRESS_LEN {
        return Err(PathError::TooLong);
    }
    if !address::is_plausible(path) {
        return Err(PathError::Malformed("not an address"));
    }
    let (user, domain) = address::split(path);
    // A local part that looks like an option could reach an MDA's command
    // line as one (Postfix refuses these too: allow_min_user = no).
    if user.starts_with('-') {
        return Err(PathError::Malformed("user part begins with '-'"));
    }
    // The user part must normalise (no `@`, spaces or controls inside a
    // quoted local part), or queued could not resolve or bounce it.
    if address::normalize_user(user).is_err() {
        return Err(PathError::Malformed("invalid user part"));
    }
    if domain.is_empty() {
        if path.contains('@') {
            return Err(PathError::NoDomain);
        }
        return Ok(PathArg {
            address: user.to_string(),
            size,
        });
    }
    let domain = address::normalize_domain(domain).map_err(|_| PathError::BadDomain)?;
    Ok(PathArg {
        address: format!("{user}@{domain}"),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(parse(b"ehlo client.test").verb, Verb::Ehlo);
        assert_eq!(parse(b"EhLo client.test").arg, b"client.test");
        assert_eq!(parse(b"QUIT").verb, Verb::Quit);
        assert_eq!(parse(b"GET / HTTP/1.1").verb, Verb::Http);
        assert_eq!(parse(b"").verb, Verb::Unknown);
    }

    #[test]
    fn metric_labels() {
        assert_eq!(metric_label(&parse(b"ehlo x")), "EHLO");
        assert_eq!(metric_label(&parse(b"XYZZYPLUGH x")), "unknown\"XYZZYP\"");
        assert_eq!(metric_label(&parse(b"A\"\x01")), "unknown\"A\\\"\\x01\"");
    }

    #[test]
    fn unknown_labels_are_bounded() {
        let mut seen = Vec::new();
        for i in 0..MAX_UNKNOWN_LABELS {
            assert_eq!(
                bounded_label(&mut seen, format!("unknown\"{i}\"")),
                format!("unknown\"{i}\"")
            );
        }
        assert_eq!(bounded_label(&mut seen, "unknown\"NEW\"".into()), "unknown");
        assert_eq!(
            bounded_label(&mut seen, "unknown\"3\"".into()),
            "unknown\"3\""
        );
        assert_eq!(seen.len(), MAX_UNKNOWN_LABELS);
    }

    #[test]
    fn paths() {
        let p = parse_path(b"FROM:<Ann@Example.ORG> SIZE=1000 BODY=8BITMIME", "FROM:").unwrap();
        assert_eq!(p.address, "Ann@example.org");
        assert_eq!(p.size, Some(1000));
        assert_eq!(parse_path(b"from: <>", "FROM:").unwrap().address, "");
        assert_eq!(
            parse_path(b"TO:<postmaster>", "TO:").unwrap().address,
            "postmaster"
        );
        assert_eq!(
            parse_path(b"TO:<@relay.example:bob@x.example>", "TO:")
                .unwrap()
                .address,
            "bob@x.example"
        );
        assert_eq!(
            parse_path(b"TO:bob@x.example", "TO:").unwrap().address,
            "bob@x.example"
        );
        assert_eq!(
            parse_path("TO:<ñandú@xn--bcher-kva.example>".as_bytes(), "TO:")
                .unwrap()
                .address,
            "ñandú@bücher.example"
        );
    }

    #[test]
    fn multibyte_characters_never_panic() {
        for arg in [
            "FRñ:<a@b>",
            "ñ",
            "FROMñ<a@b>",
            "TñO:",
            "FROM:<ñ@ñ> SIZE=ñ",
            "FROM:<a@b> SIZEñ=1",
        ] {
            let _ = parse_path(arg.as_bytes(), "FROM:");
            let _ = parse_path(arg.as_bytes(), "TO:");
        }
        assert_eq!(
            parse_path("FRñ:<a@b>".as_bytes(), "FROM:"),
            Err(PathError::NoKeyword)
        );
    }

    #[test]
    fn bad_paths() {
        assert_eq!(parse_path(b"<a@b>", "FROM:"), Err(PathError::NoKeyword));
        assert_eq!(parse_path(b"FROM:", "FROM:"), Err(PathError::Empty));
        assert_eq!(parse_path(b"FROM:   ", "FROM:"), Err(PathError::Empty));
        assert!(matches!(
            parse_path(b"FROM:<a@b", "FROM:"),
            Err(PathError::Malformed(_))
        ));
        assert!(matches!(
            parse_path(b"FROM:<a b@c>", "FROM:"),
            Err(PathError::Malformed(_))
        ));
        assert!(matches!(
            parse_path(b"FROM:<\xff@c>", "FROM:"),
            Err(PathError::Malformed(_))
        ));
        let long = format!("TO:<{}@example.org>", "a".repeat(260));
        assert_eq!(parse_path(long.as_bytes(), "TO:"), Err(PathError::TooLong));
        assert_eq!(
            parse_path(b"TO:<a@xn--zz>", "TO:"),
            Err(PathError::BadDomain)
        );
        assert_eq!(parse_path(b"FROM:<a@>", "FROM:"), Err(PathError::NoDomain));
        for arg in [
            "TO:<-oQ/tmp@example.org>",
            "TO:<-f>",
            "TO:<@r.example:-x@d.example>",
        ] {
            assert!(
                matches!(
                    parse_path(arg.as_bytes(), "TO:"),
                    Err(PathError::Malformed(_))
                ),
                "{arg}"
            );
        }
        assert!(parse_path(b"TO:<a-b@example.org>", "TO:").is_ok());
    }
}
