//! The header section check of DATA (REFERENCE §2.8 step 2), done on the
//! unstuffed message as it streams past: smtpd never holds the message, and
//! header lines may be of any length, so the scanner keeps O(1) state.
//!
//! The rules are RFC 5322's, as strict as Go's net/mail (what chasquid
//! parses with) on the points that matter, and stricter on two:
//! - each line is `name:value`, the name one or more printable US-ASCII
//!   characters (33–126) other than `:`, with nothing between the name and
//!   the colon (net/mail lets `Subject :` through; RFC 5322 only has it as
//!   obsolete syntax); or it is a continuation line (starting with SP or
//!   HT) after a header line;
//! - the first line may not be a continuation;
//! - the section ends at the first empty line, or at the end of the message
//!   (a message of headers only, or an empty one, is fine);
//! - values are not looked at: they may carry 8-bit text (SMTPUTF8).
//!
//! The scanner also counts `Received:` headers, for loop detection.
//!
//! The input has CRLF line ends only (the DATA decoder refuses a bare CR or
//! LF before any byte gets here), so a CR always starts a line end.

/// Where in a line the scanner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line.
    LineStart,
    /// Inside a field name.
    Name,
    /// In a field name that has a character a name may not hold (a space,
    /// a control, 8-bit): the line is bad, and which way depends on
    /// whether a colon still comes.
    BadName(Problem),
    /// After the colon, or on a continuation line: anything goes until the
    /// line ends.
    Value,
    /// The empty line was seen: the body follows, which is not looked at.
    Done,
    Failed,
}

/// What is wrong with a name that has a bad character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    Space,
    Character,
}

/// Why a header section does not parse. Each names the line (counted from
/// 1, continuation lines included) and never quotes the client's text, so
/// it can go into a reply as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// The message starts with a continuation line.
    FirstLineContinued,
    /// A line with no colon: likely a body with no header section.
    NoColon { line: u64 },
    /// A line that starts with its colon.
    EmptyName { line: u64 },
    /// White space between the name and the colon, or inside the name.
    SpaceInName { line: u64 },
    /// A control or 8-bit character in the name.
    BadCharInName { line: u64 },
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::FirstLineContinued => {
                write!(f, "header line 1 is a continuation line")
            }
            HeaderError::NoColon { line } => write!(f, "header line {line} has no colon"),
            HeaderError::EmptyName { line } => {
                write!(f, "header line {line} has an empty field name")
            }
            HeaderError::SpaceInName { line } => {
                write!(f, "header line {line} has white space in its field name")
            }
            HeaderError::BadCharInName { line } => {
                write!(
                    f,
                    "header line {line} has an invalid character in its field name"
                )
            }
        }
    }
}

/// `received` in lower case: the name loop detection counts.
const RECEIVED: &[u8] = b"received";

/// Checks and counts the header section of a message fed in pieces of any
/// size, cut anywhere.
#[derive(Debug, Clone)]
pub struct HeaderScan {
    state: State,
    /// The line being read, from 1.
    line: u64,
    /// Bytes of the current field name so far (saturating).
    name_len: usize,
    /// Whether the current name still matches `received` so far.
    name_is_received: bool,
    received: u32,
    error: Option<HeaderError>,
}

impl Default for HeaderScan {
    fn default() -> Self {
        HeaderScan {
            state: State::LineStart,
            line: 1,
            name_len: 0,
            name_is_received: true,
            received: 0,
            error: None,
        }
    }
}

impl HeaderScan {
    /// Feeds the next bytes of the message.
    pub fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match self.state {
                State::Done | State::Failed => return,
                State::LineStart => self.line_start(b),
                State::Name => self.name(b),
                State::BadName(problem) => match b {
                    b':' => self.fail(match problem {
                        Problem::Space => HeaderError::SpaceInName { line: self.line },
                        Problem::Character => HeaderError::BadCharInName { line: self.line },
                    }),
                    // Not even a colon: the usual case of a body sent
                    // without a header section.
                    b'\r' => self.fail(HeaderError::NoColon { line: self.line }),
                    _ => {}
                },
                State::Value => {
                    if b == b'\n' {
                        self.line = self.line.saturating_add(1);
                        self.state = State::LineStart;
                    }
                }
            }
        }
    }

    fn line_start(&mut self, b: u8) {
        match b {
            // An empty line (CR, then its LF) ends the header section.
            b'\r' => self.state = State::Done,
            b' ' | b'\t' => {
                if self.line == 1 {
                    self.fail(HeaderError::FirstLineContinued);
                } else {
                    self.state = State::Value;
                }
            }
            b':' => self.fail(HeaderError::EmptyName { line: self.line }),
            _ => {
                self.name_len = 0;
                self.name_is_received = true;
                self.state = State::Name;
                self.name(b);
            }
        }
    }

    fn name(&mut self, b: u8) {
        match b {
            b':' => {
                if self.name_is_received && self.name_len == RECEIVED.len() {
                    self.received = self.received.saturating_add(1);
                }
                self.state = State::Value;
            }
            b'\r' => self.fail(HeaderError::NoColon { line: self.line }),
            33..=126 => {
                self.name_is_received = self.name_is_received
                    && RECEIVED
                        .get(self.name_len)
                        .is_some_and(|&r| r == b.to_ascii_lowercase());
                self.name_len = self.name_len.saturating_add(1);
            }
            b' ' | b'\t' => self.state = State::BadName(Problem::Space),
            _ => self.state = State::BadName(Problem::Character),
        }
    }

    fn fail(&mut self, e: HeaderError) {
        self.error = Some(e);
        self.state = State::Failed;
    }

    /// The first problem found, if any.
    pub fn error(&self) -> Option<HeaderError> {
        self.error
    }

    /// `Received:` headers seen so far.
    pub fn received(&self) -> u32 {
        self.received
    }

    /// Whether the header section is over (the empty line was seen, or it
    /// failed): nothing more will change.
    pub fn finished(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `msg` whole, then in every split into two pieces, then one
    /// byte at a time, and checks all agree.
    fn scan_all_ways(msg: &[u8]) -> (Option<HeaderError>, u32) {
        let mut whole = HeaderScan::default();
        whole.scan(msg);
        let want = (whole.error(), whole.received());
        for cut in 0..=msg.len() {
            let mut h = HeaderScan::default();
            h.scan(&msg[..cut]);
            h.scan(&msg[cut..]);
            assert_eq!((h.error(), h.received()), want, "cut at {cut}");
        }
        let mut h = HeaderScan::default();
        for b in msg {
            h.scan(std::slice::from_ref(b));
        }
        assert_eq!((h.error(), h.received()), want, "byte by byte");
        for size in [2, 3, 7] {
            let mut h = HeaderScan::default();
            for piece in msg.chunks(size) {
                h.scan(piece);
            }
            assert_eq!((h.error(), h.received()), want, "pieces of {size}");
        }
        want
    }

    fn error(msg: &[u8]) -> Option<HeaderError> {
        scan_all_ways(msg).0
    }

    #[test]
    fn good_messages() {
        for msg in [
            &b""[..],
            b"Subject: hi\r\n\r\nbody\r\n",
            b"Subject: hi\r\n",
            b"Subject:\r\n\r\n",
            b"Subject: a\r\n folded\r\n\tand again\r\nTo: b\r\n\r\n",
            b"X-Empty-Continuation: a\r\n \r\n\r\n",
            // 8-bit values (SMTPUTF8).
            "Subject: caf\u{e9} \u{1f600}\r\n\r\n".as_bytes(),
            b"Subject: \x80\xff\x00\x01\r\n\r\n",
            // Every printable character but the colon is a name character.
            b"!#$%&'*+-.^_`{|}~\"(),/;<=>?@[\\]09AZaz: v\r\n\r\n",
            // Once the headers end, the body is free.
            b"A: b\r\n\r\nno colon here\r\n : neither\r\n",
            // Only an empty line: no headers, then a body.
            b"\r\nbody\r\n",
        ] {
            assert_eq!(error(msg), None, "{:?}", String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn bad_messages() {
        use HeaderError::*;
        for (msg, want) in [
            (&b"hello\r\n"[..], NoColon { line: 1 }),
            (b"hello world\r\n", NoColon { line: 1 }),
            (
                b"Subject: a\r\nTo: b\r\nnot a header\r\n\r\n",
                NoColon { line: 3 },
            ),
            (b" Subject: a\r\n", FirstLineContinued),
            (b"\tSubject: a\r\n", FirstLineContinued),
            (b"Subject : a\r\n", SpaceInName { line: 1 }),
            (b"Subject\t: a\r\n", SpaceInName { line: 1 }),
            (b"A: b\r\nSub ject: a\r\n", SpaceInName { line: 2 }),
            (b": a\r\n", EmptyName { line: 1 }),
            (b"A: b\r\n c\r\n: d\r\n", EmptyName { line: 3 }),
            ("Sübject: a\r\n".as_bytes(), BadCharInName { line: 1 }),
            (b"Sub\x01ject: a\r\n", BadCharInName { line: 1 }),
            (b"Sub\x7fject: a\r\n", BadCharInName { line: 1 }),
            ("b\u{e9}dy\r\n".as_bytes(), NoColon { line: 1 }),
        ] {
            assert_eq!(error(msg), Some(want), "{:?}", String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn messages_say_which_line() {
        assert_eq!(
            HeaderError::NoColon { line: 3 }.to_string(),
            "header line 3 has no colon"
        );
        assert_eq!(
            HeaderError::FirstLineContinued.to_string(),
            "header line 1 is a continuation line"
        );
    }

    #[test]
    fn counts_only_received_headers() {
        let msg = b"Received: a\r\nRECEIVED: b\r\n c\r\nReceived-SPF: x\r\nReceive: y\r\nX-Received: z\r\nreceived:\r\n\r\nReceived: in body\r\n";
        assert_eq!(scan_all_ways(msg), (None, 3));
    }

    #[test]
    fn long_lines_need_no_memory() {
        let mut h = HeaderScan::default();
        h.scan(b"X-Long: ");
        for _ in 0..10_000 {
            h.scan(&[b'x'; 1000]);
        }
        h.scan(b"\r\n");
        let name = vec![b'N'; 1_000_000];
        h.scan(&name);
        h.scan(b": v\r\n\r\n");
        assert_eq!(h.error(), None);
        assert!(h.finished());
        // A long name that only resembles `received` is not counted.
        let mut h = HeaderScan::default();
        h.scan(b"receivedreceived: x\r\n");
        assert_eq!(h.received(), 0);
    }

    #[test]
    fn stops_at_the_first_problem() {
        let mut h = HeaderScan::default();
        h.scan(b"A: b\r\nbad\r\nReceived: x\r\n");
        assert_eq!(h.error(), Some(HeaderError::NoColon { line: 2 }));
        assert_eq!(h.received(), 0);
        assert!(h.finished());
    }
}
