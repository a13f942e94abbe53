//! Reading DATA: undoes dot-stuffing and finds the `CRLF.CRLF` terminator,
//! accepting nothing but CRLF line ends.
//!
//! A bare CR or a bare LF anywhere is an error rather than a line end: an
//! MTA that accepted `LF.LF` or `CR.CR` as an end of data where the next hop
//! does not could be used to smuggle a second message (SMTP smuggling).
//! The decoder is a pure state machine over bytes, so it never holds more
//! than what the caller passes it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line.
    LineStart,
    /// The line started with a dot, which was dropped.
    Dot,
    /// A line that is just `.` followed by CR: LF ends the data.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside or at the start of a line; only LF may follow.
    Cr,
}

/// Why DATA could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotError {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareLineEnding,
}

/// What a call to [`DotDecoder::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All input consumed; more is needed.
    More,
    /// The terminator ended at this many bytes into the input; the rest
    /// belongs to the next command.
    End(usize),
}

#[derive(Debug)]
pub struct DotDecoder {
    state: State,
    /// Unstuffed bytes produced so far (REFERENCE §2.2's message size).
    size: u64,
}

impl Default for DotDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DotDecoder {
    pub fn new() -> Self {
        Self {
            state: State::LineStart,
            size: 0,
        }
    }

    /// Size of the unstuffed message so far, CRLF line ends, without the
    /// final `.CRLF`.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Decodes `input`, appending message bytes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, DotError> {
        let start_len = out.len();
        let mut i = 0;
        let result = loop {
            if i >= input.len() {
                break Ok(Progress::More);
            }
            match self.state {
                State::Mid => {
                    // Fast path: copy up to the next CR or LF in one go.
                    let rest = &input[i..];
                    let n = rest
                        .iter()
                        .position(|&b| b == b'\r' || b == b'\n')
                        .unwrap_or(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    i += n;
                    if i < input.len() {
                        if input[i] == b'\n' {
                            break Err(DotError::BareLineEnding);
                        }
                        self.state = State::Cr;
                        i += 1;
                    }
                }
                State::LineStart => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'.' => self.state = State::Dot,
                        b'\r' => self.state = State::Cr,
                        b'\n' => break Err(DotError::BareLineEnding),
                        _ => {
                            out.push(b);
                            self.state = State::Mid;
                        }
                    }
                }
                State::Dot => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\r' => self.state = State::DotCr,
                        b'\n' => break Err(DotError::BareLineEnding),
                        _ => {
                            out.push(b);
                            self.state = State::Mid;
                        }
                    }
                }
                State::DotCr => {
                    let b = input[i];
                    i += 1;
                    if b == b'\n' {
                        self.state = State::LineStart;
                        break Ok(Progress::End(i));
                    }
                    break Err(DotError::BareLineEnding);
                }
                State::Cr => {
                    let b = input[i];
                    i += 1;
                    if b != b'\n' {
                        break Err(DotError::BareLineEnding);
                    }
                    out.extend_from_slice(b"\r\n");
                    self.state = State::LineStart;
                }
            }
        };
        self.size += (out.len() - start_len) as u64;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes.
    fn decode(input: &[u8], step: usize) -> (Result<Vec<u8>, DotError>, usize) {
        let mut d = DotDecoder::new();
        let mut out = Vec::new();
        let mut offset = 0;
        for chunk in input.chunks(step.max(1)) {
            match d.feed(chunk, &mut out) {
                Ok(Progress::More) => offset += chunk.len(),
                Ok(Progress::End(n)) => {
                    assert_eq!(d.size(), out.len() as u64);
                    return (Ok(out), offset + n);
                }
                Err(e) => return (Err(e), offset),
            }
        }
        (Err(DotError::BareLineEnding), usize::MAX)
    }

    fn all_steps(input: &[u8]) -> Result<Vec<u8>, DotError> {
        let (first, _) = decode(input, input.len());
        for step in 1..input.len().min(12) {
            assert_eq!(decode(input, step).0, first, "step {step} disagrees");
        }
        first
    }

    #[test]
    fn plain_message() {
        assert_eq!(
            all_steps(b"Subject: x\r\n\r\nbody\r\n.\r\n").unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn empty_message() {
        assert_eq!(all_steps(b".\r\n").unwrap(), b"");
    }

    #[test]
    fn unstuffs_dots() {
        assert_eq!(
            all_steps(b"..hidden\r\n...\r\n.x\r\na.b\r\n.\r\n").unwrap(),
            b".hidden\r\n..\r\nx\r\na.b\r\n"
        );
    }

    #[test]
    fn stops_at_terminator() {
        let input = b"a\r\n.\r\nQUIT\r\n";
        let (out, end) = decode(input, input.len());
        assert_eq!(out.unwrap(), b"a\r\n");
        assert_eq!(&input[end..], b"QUIT\r\n");
    }

    #[test]
    fn bare_line_endings_are_refused() {
        for bad in [
            &b"a\n.\r\n"[..],
            b"a\r\n.\n",
            b"a\rb\r\n.\r\n",
            b"a\r\n.\r.\r\n",
            b"\n.\r\n",
            b"a\r\n\r.\r\n",
            // The smuggling pattern: LF.LF or CR.CR must not end the data.
            b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n.\r\n",
        ] {
            assert_eq!(all_steps(bad), Err(DotError::BareLineEnding), "{bad:?}");
        }
    }

    #[test]
    fn size_counts_unstuffed_bytes() {
        let mut d = DotDecoder::new();
        let mut out = Vec::new();
        d.feed(b"..ab\r\n.\r\n", &mut out).unwrap();
        assert_eq!(d.size(), 5);
    }
}
