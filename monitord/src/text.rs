//! Peer-sent text in monitord's plain-text output (`/debug/flags`, log
//! lines): a flag value or version is whatever a peer registered, and a
//! newline in it would forge lines of its own.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with every character that could break or disguise a line written
/// as an escape: `\n`, `\r`, `\t`, `\x..` for other ASCII controls (and
/// DEL), `\u{..}` for the C1 controls, Unicode line and paragraph
/// separators and bidirectional overrides (which reorder what a reader
/// sees). `\` itself becomes `\\`, so an escape in the output always
/// means the character, never the peer's literal text.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c,
            '\u{2028}' | '\u{2029}'
            | '\u{200e}' | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert!(matches!(escape("plain ünï \"x\""), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\nb\rc\td\0e\x1bf\x7fg\u{85}h\u{2028}i\u{202e}j\\nk"),
            "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg\\u{85}h\\u{2028}i\\u{202e}j\\\\nk"
        );
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            let s = c.to_string();
            let e = escape(&s);
            assert!(
                !e.chars().any(|c| c.is_control() || c == '\u{2028}'),
                "{c:?}"
            );
        }
    }
}
