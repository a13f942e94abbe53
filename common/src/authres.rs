//! The Authentication-Results header (RFC 8601, REFERENCE §2.8) that
//! reports the SPF check and the DKIM verification of unauthenticated mail.
//!
//! Almost everything in it comes from strangers: the SPF reason and the
//! sender domain from the client and its DNS, the signing domain and `b=`
//! from the message, error texts naming both. So every piece goes through
//! one of two escapes before it is written — [`comment`] or [`value`] —
//! which between them let no CR, LF or other control character through and
//! keep quotes and parentheses balanced: no input can end the header,
//! start a new one, or make the next part read as something else. Pieces
//! are also capped, so that no line gets near RFC 5322's 998-octet limit.
//!
//! One result per line, continuation lines starting with a tab (shown
//! here as spaces), CRLF line ends, as the stored message has them:
//!
//! ```text
//! Authentication-Results: mx.example.org;
//!     spf=pass (matched ip4:192.0.2.0/24) smtp.mailfrom=example.com;
//!     dkim=pass header.d=example.com header.b=AbCdEfGhIjKl
//! ```

use std::fmt::Write;

use tambo_proto::submit::SpfReport;

/// Most bytes of a reason kept (before escaping, which at most doubles it).
pub const MAX_REASON: usize = 160;
/// Most bytes of a domain or the authserv-id kept: a domain name's limit.
pub const MAX_DOMAIN: usize = 253;
/// How much of `b=` identifies a signature (RFC 6008 §4 suggests a prefix;
/// REFERENCE §2.8 says 12 characters).
pub const B_PREFIX: usize = 12;

/// What came of one DKIM signature (RFC 8601 §2.7.1). The texts say why,
/// for the comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DkimResult {
    Pass,
    /// The signature or the body hash did not verify.
    Fail(String),
    /// The signature cannot be checked, and trying again will not help.
    PermError(String),
    /// The key could not be fetched for now (a DNS failure).
    TempError(String),
}

impl DkimResult {
    /// The result's name in the header.
    pub fn name(&self) -> &'static str {
        match self {
            DkimResult::Pass => "pass",
            DkimResult::Fail(_) => "fail",
            DkimResult::PermError(_) => "permerror",
            DkimResult::TempError(_) => "temperror",
        }
    }
}

/// One DKIM signature's line: its result, and what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSignature {
    pub result: DkimResult,
    /// The signature's `d=`, as written (empty if it had none).
    pub domain: String,
    /// The signature's `b=`, folding whitespace removed (empty if none).
    pub b: String,
}

/// The whole header field, `Authentication-Results: ` to the final CRLF.
///
/// `dkim` is `None` when DKIM verification did not run (or could not read
/// the message), and `Some(&[])` for a message without signatures
/// (`dkim=none`). `None` when there is nothing to report: the header is
/// only added with SPF or DKIM data (REFERENCE §2.8).
pub fn header(
    authserv_id: &str,
    spf: Option<&SpfReport>,
    dkim: Option<&[DkimSignature]>,
) -> Option<String> {
    let mut results: Vec<String> = Vec::new();
    if let Some(spf) = spf {
        let mut r = format!("spf={}", spf.result.name());
        if let Some(c) = comment(&spf.reason) {
            r.push(' ');
            r.push_str(&c);
        }
        if !spf.domain.is_empty() {
            let _ = write!(r, " smtp.mailfrom={}", value(&spf.domain, MAX_DOMAIN));
        }
        results.push(r);
    }
    match dkim {
        None => {}
        Some([]) => results.push("dkim=none".to_string()),
        Some(sigs) => results.extend(sigs.iter().map(dkim_result)),
    }
    if results.is_empty() {
        return None;
    }
    let mut h = format!(
        "Authentication-Results: {};\r\n",
        value(authserv_id, MAX_DOMAIN)
    );
    let last = results.len() - 1;
    for (i, r) in results.iter().enumerate() {
        h.push('\t');
        h.push_str(r);
        h.push_str(if i == last { "\r\n" } else { ";\r\n" });
    }
    Some(h)
}

fn dkim_result(sig: &DkimSignature) -> String {
    let mut r = format!("dkim={}", sig.result.name());
    match &sig.result {
        DkimResult::Pass => {}
        DkimResult::Fail(why) | DkimResult::PermError(why) | DkimResult::TempError(why) => {
            // A reason is what RFC 8601 asks for with these results; an
            // empty one still says which kind of failure it was.
            let c = comment(why).unwrap_or_else(|| format!("({})", sig.result.name()));
            r.push(' ');
            r.push_str(&c);
        }
    }
    if !sig.domain.is_empty() {
        let _ = write!(r, " header.d={}", value(&sig.domain, MAX_DOMAIN));
    }
    let b: String = sig.b.chars().take(B_PREFIX).collect();
    if !b.is_empty() {
        let _ = write!(r, " header.b={}", value(&b, B_PREFIX));
    }
    r
}

/// A comment (RFC 5322 §3.2.2) holding `text`, or `None` if there is
/// nothing to say. Parentheses and backslashes are quoted so the comment
/// ends where it should; control characters (CR and LF among them) and
/// other line or paragraph breaks become spaces.
pub fn comment(text: &str) -> Option<String> {
    let text = cut(text.trim(), MAX_REASON).trim();
    if text.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('(');
    for c in text.chars() {
        match c {
            '(' | ')' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if is_unsafe(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out.push(')');
    Some(out)
}

/// `text` as an RFC 2045 `value`: a token if it is one, else a quoted
/// string with its quotes and backslashes escaped and control characters
/// turned into spaces. Cut to `max` bytes first.
pub fn value(text: &str, max: usize) -> String {
    let text = cut(text, max);
    if !text.is_empty() && text.bytes().all(is_token_byte) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if is_unsafe(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Characters that must never reach a header as they are: controls (CR,
/// LF, tab, DEL, the C1 set) and Unicode's line and paragraph separators,
/// which some readers take for line breaks.
fn is_unsafe(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// RFC 2045 token characters: printable US-ASCII except SPACE and the
/// tspecials.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tambo_proto::submit::SpfResult;

    fn spf(result: SpfResult, domain: &str, reason: &str) -> SpfReport {
        SpfReport {
            result,
            domain: domain.into(),
            reason: reason.into(),
        }
    }

    fn sig(result: DkimResult, domain: &str, b: &str) -> DkimSignature {
        DkimSignature {
            result,
            domain: domain.into(),
            b: b.into(),
        }
    }

    #[test]
    fn nothing_to_report_is_no_header() {
        assert_eq!(header("mx.example.org", None, None), None);
    }

    #[test]
    fn spf_and_no_signatures() {
        let s = spf(SpfResult::Pass, "example.com", "matched ip4:192.0.2.0/24");
        assert_eq!(
            header("mx.example.org", Some(&s), Some(&[])).unwrap(),
            "Authentication-Results: mx.example.org;\r\n\
             \tspf=pass (matched ip4:192.0.2.0/24) smtp.mailfrom=example.com;\r\n\
             \tdkim=none\r\n"
        );
    }

    #[test]
    fn spf_alone_has_no_trailing_separator_and_no_empty_comment() {
        let s = spf(SpfResult::SoftFail, "example.com", "  ");
        assert_eq!(
            header("mx.example.org", Some(&s), None).unwrap(),
            "Authentication-Results: mx.example.org;\r\n\
             \tspf=softfail smtp.mailfrom=example.com\r\n"
        );
    }

    #[test]
    fn every_dkim_result() {
        let sigs = [
            sig(DkimResult::Pass, "example.com", "AbCdEfGhIjKlMnOp"),
            sig(
                DkimResult::Fail("body hash mismatch".into()),
                "example.net",
                "QRSTUVWXYZab+cdef",
            ),
            sig(
                DkimResult::PermError("rsa-sha1 is not accepted (RFC 8301)".into()),
                "example.org",
                "short",
            ),
            sig(DkimResult::TempError(String::new()), "", ""),
        ];
        assert_eq!(
            header("mx.example.org", None, Some(&sigs)).unwrap(),
            "Authentication-Results: mx.example.org;\r\n\
             \tdkim=pass header.d=example.com header.b=AbCdEfGhIjKl;\r\n\
             \tdkim=fail (body hash mismatch) header.d=example.net header.b=QRSTUVWXYZab;\r\n\
             \tdkim=permerror (rsa-sha1 is not accepted \\(RFC 8301\\)) header.d=example.org header.b=short;\r\n\
             \tdkim=temperror (temperror)\r\n"
        );
    }

    #[test]
    fn base64_specials_are_quoted() {
        // `/` and `=` are tspecials: a bare `header.b=ab/c` is not a value.
        let sigs = [sig(DkimResult::Pass, "example.com", "ab/cd+ef==")];
        assert_eq!(
            header("mx", None, Some(&sigs)).unwrap(),
            "Authentication-Results: mx;\r\n\tdkim=pass header.d=example.com header.b=\"ab/cd+ef==\"\r\n"
        );
    }

    #[test]
    fn hostile_pieces_cannot_inject_headers_or_break_the_structure() {
        let s = spf(
            SpfResult::Fail,
            "evil.example\r\nBcc: victim@example.com",
            "nope)\r\nX-Injected: 1 (\\",
        );
        let sigs = [sig(
            DkimResult::PermError("bad\nkey\u{2028}(".into()),
            "a\"b;c=d\r\n\tX: y",
            "x\r\nY: z",
        )];
        let h = header("mx.example.org\r\nX: 1", Some(&s), Some(&sigs)).unwrap();
        assert_eq!(
            h,
            "Authentication-Results: \"mx.example.org  X: 1\";\r\n\
             \tspf=fail (nope\\)  X-Injected: 1 \\(\\\\) smtp.mailfrom=\"evil.example  Bcc: victim@example.com\";\r\n\
             \tdkim=permerror (bad key \\() header.d=\"a\\\"b;c=d   X: y\" header.b=\"x  Y: z\"\r\n"
        );
        // Every CR is followed by LF then a tab, but for the last one.
        let lines: Vec<&str> = h.split("\r\n").collect();
        assert_eq!(lines.last(), Some(&""));
        assert!(
            lines[1..lines.len() - 1]
                .iter()
                .all(|l| l.starts_with('\t'))
        );
        assert!(!h.replace("\r\n", "").contains(['\r', '\n']));
    }

    #[test]
    fn pieces_are_capped_so_lines_stay_short() {
        let long = "é".repeat(1000);
        let s = spf(SpfResult::Neutral, &long, &"(".repeat(1000));
        let sigs = [sig(DkimResult::Fail("\\".repeat(1000)), &long, &long)];
        let h = header(&long, Some(&s), Some(&sigs)).unwrap();
        for line in h.split("\r\n") {
            assert!(line.len() < 998, "{} bytes", line.len());
        }
        // Cut at a character boundary, not in the middle of an é.
        assert!(h.contains(&format!("\"{}\"", "é".repeat(MAX_DOMAIN / 2))));
    }

    #[test]
    fn unicode_stays_readable() {
        let s = spf(SpfResult::None, "bücher.example", "no record for bücher");
        assert_eq!(
            header("mx", Some(&s), None).unwrap(),
            "Authentication-Results: mx;\r\n\tspf=none (no record for bücher) smtp.mailfrom=\"bücher.example\"\r\n"
        );
    }
}
