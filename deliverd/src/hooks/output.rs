//! What a hook's standard output means: the headers post-data adds, and
//! the last line a refusal shows the client.
//!
//! Both end up in the message or in an SMTP reply, so neither may carry
//! anything that changes their shape: the headers must be a header block
//! and nothing else (no blank line that would start the body, no bare CR),
//! and the refusal text is one line without control characters.

use tambo_proto::submit::MAX_HOOK_TEXT;

use crate::supervise::Captured;

/// post-data's output as headers to prepend, with CRLF line ends; `None`
/// if it is not a header block (REFERENCE §6): it must be empty, or end
/// in a newline and consist of `Name: value` lines, each possibly followed
/// by continuation lines that start with a space or a tab.
///
/// Stricter than chasquid, which only asks for a `:` somewhere: the name
/// must be RFC 5322 field-name characters, and there may be no line of
/// white space alone (read by some parsers as the blank line that ends
/// the headers), no bare CR and no NUL. Lines may end in CRLF or LF, and
/// the output must be UTF-8, since it travels as text.
pub fn header_block(out: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(out).ok()?;
    if text.is_empty() {
        return Some(String::new());
    }
    let body = text.strip_suffix('\n')?;
    let mut block = String::with_capacity(text.len() + text.len() / 2);
    let mut seen_header = false;
    for line in body.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim_matches([' ', '\t']).is_empty() || line.contains(['\r', '\0']) {
            return None;
        }
        if line.starts_with([' ', '\t']) {
            if !seen_header {
                return None;
            }
        } else {
            let (name, _) = line.split_once(':')?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return None;
            }
            seen_header = true;
        }
        block.push_str(line);
        block.push_str("\r\n");
    }
    Some(block)
}

/// The last complete line of `out` (chasquid's `lastLine`): the text
/// before the final newline, back to the newline before it. Empty if
/// there is no complete line. Trimmed, with control characters turned
/// into spaces and cut to [`MAX_HOOK_TEXT`] bytes, since it becomes part
/// of an SMTP reply.
pub fn last_line(out: &Captured) -> String {
    // Past the kept part, the tail holds the end of the output.
    let bytes = if out.overflow { &out.tail } else { &out.head };
    let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
        return String::new();
    };
    let start = bytes[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    one_line(&String::from_utf8_lossy(&bytes[start..end]), MAX_HOOK_TEXT)
}

/// `text` trimmed, on one line (control characters become spaces), cut
/// to at most `max` bytes at a character boundary.
pub fn one_line(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut t = clean.trim().to_string();
    if t.len() > max {
        let mut end = max;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
        t.truncate(t.trim_end().len());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(s: &str) -> Captured {
        Captured {
            head: s.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_header_blocks_become_crlf() {
        assert_eq!(header_block(b"").as_deref(), Some(""));
        assert_eq!(
            header_block(b"X-Spam: yes\nX-Score: 5\n  (of 10)\n\tmore\n").as_deref(),
            Some("X-Spam: yes\r\nX-Score: 5\r\n  (of 10)\r\n\tmore\r\n")
        );
        assert_eq!(
            header_block(b"X-A: 1\r\nX-B:2\r\n").as_deref(),
            Some("X-A: 1\r\nX-B:2\r\n"),
            "CRLF output is kept, and no space is needed after the colon"
        );
        assert_eq!(
            header_block("X-Name: Zoë\n".as_bytes()).as_deref(),
            Some("X-Name: Zoë\r\n")
        );
    }

    #[test]
    fn anything_else_is_not_a_header_block() {
        for bad in [
            &b"\n"[..],
            b"X-A: 1",                 // no final newline
            b"X-A: 1\n\nbody\n",       // a blank line
            b"X-A: 1\n\r\n",           // a blank CRLF line
            b"X-A: 1\n \t\n",          // white space alone
            b" continued\n",           // a continuation first
            b"no colon here\n",        // not a header
            b": no name\n",            // empty name
            b"Bad Name: x\n",          // a space in the name
            b"X-A: a\rb\n",            // a bare CR
            b"X-A: a\0b\n",            // NUL
            b"X-A: \xff\xfe\n",        // not UTF-8
            b"X-A: 1\nSubject: x\n\n", // ends with a blank line
        ] {
            assert_eq!(
                header_block(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn last_complete_line() {
        assert_eq!(last_line(&captured("")), "");
        assert_eq!(last_line(&captured("no newline")), "");
        assert_eq!(last_line(&captured("one\n")), "one");
        assert_eq!(last_line(&captured("a\nb\n")), "b");
        assert_eq!(last_line(&captured("a\nb\npartial")), "b");
        assert_eq!(last_line(&captured("a\n\n")), "", "the last line is empty");
        assert_eq!(
            last_line(&captured("  go away\t\r\n")),
            "go away",
            "trimmed, CR included"
        );
        assert_eq!(
            last_line(&captured("bad\x1b[31m red\x07\n")),
            "bad [31m red",
            "no control character reaches the reply"
        );
        let long = format!("{}\n", "é".repeat(MAX_HOOK_TEXT));
        let l = last_line(&captured(&long));
        assert!(l.len() <= MAX_HOOK_TEXT && l.len() >= MAX_HOOK_TEXT - 1);
        assert!(l.chars().all(|c| c == 'é'));
    }

    #[test]
    fn past_the_limit_the_tail_has_the_last_line() {
        let out = Captured {
            head: b"start\n".to_vec(),
            overflow: true,
            tail: b"ial line\nthe reason\n".to_vec(),
        };
        assert_eq!(last_line(&out), "the reason");
        let cut = Captured {
            head: b"start\n".to_vec(),
            overflow: true,
            tail: b"end of a long line\n".to_vec(),
        };
        assert_eq!(last_line(&cut), "end of a long line");
    }
}
