//! SMTP and LMTP replies (RFC 5321 §4.2): a three-digit code, then one or
//! more lines of text; every line but the last has `-` after the code.

use std::fmt;

/// One whole reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 200–599: the first digit says what kind of answer it is.
    pub code: u16,
    /// The text of every line, without the code and separator, joined
    /// with `\n`. One string rather than a list, so a reply's size in
    /// memory is what was read, whatever its number of lines.
    pub text: String,
}

impl Reply {
    /// 2xx: done.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx: go on (354 after DATA).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 5xx: the only replies that make a failure permanent.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The text lines, in order.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.split('\n')
    }
}

/// `550 5.1.1 no such user`, lines joined by spaces: the form failure
/// texts quote, with the enhanced code where the server put it.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        for line in self.lines().filter(|l| !l.is_empty()) {
            write!(f, " {line}")?;
        }
        Ok(())
    }
}

/// One reply line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line<'a> {
    pub code: u16,
    /// Whether more lines of the same reply follow (`250-`).
    pub more: bool,
    pub text: &'a str,
}

/// Why a line is not a reply line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("a reply line must start with a code from 200 to 599")]
    BadCode,
    #[error("a reply code must be followed by a space, a dash or the end of the line")]
    BadSeparator,
}

/// Parses one line (without its line end). Codes outside 2xx–5xx are
/// refused: 1xx is never used in SMTP, and a classification by first
/// digit must not meet anything else.
pub fn parse_line(line: &str) -> Result<Line<'_>, LineError> {
    let b = line.as_bytes();
    if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&b[0]) {
        return Err(LineError::BadCode);
    }
    let code = u16::from(b[0] - b'0') * 100 + u16::from(b[1] - b'0') * 10 + u16::from(b[2] - b'0');
    let (more, text) = match b.get(3) {
        None => (false, ""),
        Some(b' ') => (false, &line[4..]),
        Some(b'-') => (true, &line[4..]),
        Some(_) => return Err(LineError::BadSeparator),
    };
    Ok(Line { code, more, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(
            parse_line("250-mx.example.org hello"),
            Ok(Line {
                code: 250,
                more: true,
                text: "mx.example.org hello"
            })
        );
        assert_eq!(
            parse_line("550 5.1.1 no"),
            Ok(Line {
                code: 550,
                more: false,
                text: "5.1.1 no"
            })
        );
        assert_eq!(
            parse_line("354"),
            Ok(Line {
                code: 354,
                more: false,
                text: ""
            })
        );
        assert_eq!(parse_line("25"), Err(LineError::BadCode));
        assert_eq!(parse_line("150 x"), Err(LineError::BadCode));
        assert_eq!(parse_line("650 x"), Err(LineError::BadCode));
        assert_eq!(parse_line("2a0 x"), Err(LineError::BadCode));
        assert_eq!(parse_line("250x"), Err(LineError::BadSeparator));
        assert_eq!(parse_line("ok"), Err(LineError::BadCode));
    }

    #[test]
    fn display_joins_lines() {
        let r = Reply {
            code: 550,
            text: "5.1.1 no such user\nsee https://example.org".into(),
        };
        assert_eq!(
            r.to_string(),
            "550 5.1.1 no such user see https://example.org"
        );
        assert_eq!(
            Reply {
                code: 354,
                text: String::new()
            }
            .to_string(),
            "354"
        );
        assert!(r.is_permanent() && !r.is_positive() && !r.is_intermediate());
    }
}
