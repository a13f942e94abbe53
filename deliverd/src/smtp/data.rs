//! The message after DATA: dot-stuffed, CRLF line ends, then `.` CRLF,
//! streamed from the queued file through a small buffer.
//!
//! The queue holds messages with CRLF line ends (smtpd refuses bare CR and
//! LF, queued writes its DSNs with CRLF). The encoder still turns any bare
//! CR or LF into CRLF: what goes out is then never ambiguous to the next
//! hop, whatever reached the queue (SMTP smuggling works by sending line
//! ends that two servers read differently).

use std::io::SeekFrom;

use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::conn::{Conn, ConnError};

/// Bytes read from the message at a time.
const CHUNK: usize = 64 * 1024;

/// The dot-stuffing state machine: feed it the message in pieces of any
/// size, then call [`DotStuffer::finish`].
#[derive(Debug)]
pub struct DotStuffer {
    /// The next byte starts a line.
    line_start: bool,
    /// The last byte was a CR whose LF has not been seen yet.
    cr: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            line_start: true,
            cr: false,
        }
    }
}

impl DotStuffer {
    /// Appends the encoding of `input` to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 8 + 4);
        for &b in input {
            if self.cr {
                self.cr = false;
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                }
                _ => {
                    if self.line_start && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    self.line_start = false;
                }
            }
        }
    }

    /// Ends the last line if the message did not, then the terminator.
    pub fn finish(self, out: &mut Vec<u8>) {
        if self.cr || !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// Sends the whole message from its start, and the terminator. Holds at
/// most [`CHUNK`] bytes of it (and their encoding) at a time.
pub async fn send_message(conn: &mut Conn, message: &mut File) -> Result<(), ConnError> {
    message
        .seek(SeekFrom::Start(0))
        .await
        .map_err(ConnError::Message)?;
    let mut stuffer = DotStuffer::default();
    let mut input = vec![0; CHUNK];
    let mut out = Vec::with_capacity(CHUNK + CHUNK / 8 + 8);
    loop {
        // The wait limit bounds a stuck disk as much as a stuck peer.
        let n = conn
            .within(message.read(&mut input))
            .await
            .map_err(|e| match e {
                ConnError::Io(e) => ConnError::Message(e),
                e => e,
            })?;
        if n == 0 {
            break;
        }
        out.clear();
        stuffer.feed(&input[..n], &mut out);
        conn.write_all(&out).await?;
    }
    out.clear();
    stuffer.finish(&mut out);
    conn.write_all(&out).await?;
    conn.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(pieces: &[&[u8]]) -> Vec<u8> {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        for p in pieces {
            s.feed(p, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn dots_at_line_starts_are_doubled() {
        assert_eq!(
            encode(&[b".a\r\nb.\r\n..c\r\n.\r\n"]),
            b"..a\r\nb.\r\n...c\r\n..\r\n.\r\n"
        );
    }

    #[test]
    fn split_anywhere_gives_the_same_bytes() {
        let msg: &[u8] = b"Subject: x\r\n\r\n.dot\r\nmid.dle\r\n.\r\nend";
        let whole = encode(&[msg]);
        for i in 0..=msg.len() {
            for j in i..=msg.len() {
                assert_eq!(
                    encode(&[&msg[..i], &msg[i..j], &msg[j..]]),
                    whole,
                    "{i} {j}"
                );
            }
        }
        assert_eq!(
            whole,
            b"Subject: x\r\n\r\n..dot\r\nmid.dle\r\n..\r\nend\r\n.\r\n".to_vec()
        );
    }

    #[test]
    fn the_last_line_is_ended() {
        assert_eq!(encode(&[b"a"]), b"a\r\n.\r\n");
        assert_eq!(encode(&[b"a\r\n"]), b"a\r\n.\r\n");
        assert_eq!(encode(&[b"a\r"]), b"a\r\n.\r\n");
        assert_eq!(encode(&[b""]), b".\r\n");
    }

    #[test]
    fn bare_line_ends_become_crlf() {
        // A bare LF or CR never reaches the next hop: "\n.\n" must not end
        // the data there, nor "\r.\r".
        assert_eq!(encode(&[b"a\n.\nb"]), b"a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(encode(&[b"a\r.\rb"]), b"a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(encode(&[b"a\r\r\nb"]), b"a\r\n\r\nb\r\n.\r\n");
    }
}
