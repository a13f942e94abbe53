//! The two passes over the message file: the header section, read whole
//! (it is small, and capped); then the body, streamed once through every
//! body hash the signatures need, never held whole in memory.
//!
//! Both read with positional reads, leaving the descriptor's offset
//! (which another holder may share) alone.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use mail_auth::common::crypto::{HashContext, HashImpl, HashOutput, Sha256};
use mail_auth::common::headers::Writer;
use mail_auth::dkim::Canonicalization;
use mail_auth::dkim::canonicalize::BodyHasher;

/// Bytes read at a time.
const CHUNK: usize = 64 * 1024;

/// Reads the header section: everything up to and including the empty
/// line that ends it (the whole file if there is none). More than `max`
/// bytes without an end is an error: no header section is that long.
pub fn header_section(file: &File, max: usize) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    loop {
        let searched_from = buf.len().saturating_sub(3);
        let old = buf.len();
        let want = CHUNK.min(max + 1 - old.min(max));
        buf.resize(old + want, 0);
        let n = read_at(file, &mut buf[old..], old as u64)?;
        buf.truncate(old + n);
        if buf.starts_with(b"\r\n") {
            // No header at all: the empty line comes first.
            buf.truncate(2);
            return Ok(buf);
        }
        if let Some(i) = find(&buf[searched_from..], b"\r\n\r\n") {
            buf.truncate(searched_from + i + 4);
            return Ok(buf);
        }
        if n == 0 {
            return Ok(buf);
        }
        if buf.len() > max {
            return Err(io::Error::other(format!(
                "the header section is over {} KiB",
                max / 1024
            )));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    loop {
        match file.read_at(buf, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// A body hash to compute: the body canonicalization and `l=` (0: all).
pub type HashSpec = (Canonicalization, u64);

/// A computed body hash, and how many canonicalized body bytes there were
/// (to tell an `l=` longer than the body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyHash {
    pub hash: Vec<u8>,
    pub canonical_len: u64,
}

/// SHA-256 body hashes (the only kind accepted) for every spec, in one
/// pass over the body, which starts at `offset` in the file.
pub fn hashes(file: &File, offset: u64, specs: &[HashSpec]) -> io::Result<Vec<BodyHash>> {
    let mut hashers: Vec<BodyHasher<Limited>> = specs
        .iter()
        .map(|&(c, l)| BodyHasher::new(Limited::new(l), c, 0))
        .collect();
    if !hashers.is_empty() {
        let mut buf = vec![0u8; CHUNK];
        let mut at = offset;
        loop {
            let n = read_at(file, &mut buf, at)?;
            if n == 0 {
                break;
            }
            at += n as u64;
            for h in &mut hashers {
                h.write(&buf[..n]);
            }
        }
    }
    Ok(hashers
        .into_iter()
        .map(|h| {
            let (limited, _) = h.finish();
            let canonical_len = limited.seen;
            BodyHash {
                hash: limited.complete().as_ref().to_vec(),
                canonical_len,
            }
        })
        .collect())
}

/// A SHA-256 context that hashes only the first `l` canonicalized bytes
/// (all if `l` is 0) and counts them all. `l=` counts canonicalized
/// octets (RFC 6376 §3.5); mail-auth cuts the raw body instead, which
/// differs for relaxed canonicalization, so the cut is made here.
struct Limited {
    ctx: <Sha256 as HashImpl>::Context,
    left: Option<u64>,
    seen: u64,
}

impl Limited {
    fn new(l: u64) -> Self {
        Limited {
            ctx: Sha256::hasher(),
            left: (l > 0).then_some(l),
            seen: 0,
        }
    }
}

impl Writer for Limited {
    fn write(&mut self, buf: &[u8]) {
        self.seen += buf.len() as u64;
        let take = match &mut self.left {
            None => buf.len(),
            Some(left) => {
                let take = (*left).min(buf.len() as u64);
                *left -= take;
                take as usize
            }
        };
        self.ctx.write(&buf[..take]);
    }
}

impl HashContext for Limited {
    fn complete(self) -> HashOutput {
        self.ctx.complete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn the_header_section_ends_at_the_empty_line() {
        let f = file(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n");
        assert_eq!(header_section(&f, 1024).unwrap(), b"A: 1\r\nB: 2\r\n\r\n");
        let f = file(b"\r\nbody only\r\n");
        assert_eq!(header_section(&f, 1024).unwrap(), b"\r\n");
        let f = file(b"A: 1\r\nno end");
        assert_eq!(header_section(&f, 1024).unwrap(), b"A: 1\r\nno end");
        let big = format!("A: {}\r\n\r\nbody", "x".repeat(3 * CHUNK));
        let f = file(big.as_bytes());
        assert_eq!(header_section(&f, 4 * CHUNK).unwrap().len(), 3 * CHUNK + 7);
        assert!(header_section(&f, CHUNK).is_err());
        // The end straddling two reads is found.
        let edge = format!("A: {}\r\n\r\nbody", "x".repeat(CHUNK - 6));
        let f = file(edge.as_bytes());
        assert_eq!(header_section(&f, 4 * CHUNK).unwrap().len(), CHUNK + 1);
    }

    #[test]
    fn body_hashes_follow_rfc_6376() {
        // RFC 6376 §3.4.3 and §3.4.4: an empty body is a single CRLF in
        // simple canonicalization, and nothing at all in relaxed.
        let f = file(b"H: v\r\n\r\n");
        let got = hashes(
            &f,
            8,
            &[
                (Canonicalization::Simple, 0),
                (Canonicalization::Relaxed, 0),
            ],
        )
        .unwrap();
        let sha = |b: &[u8]| {
            let mut c = Sha256::hasher();
            c.write(b);
            c.complete().as_ref().to_vec()
        };
        assert_eq!(got[0].hash, sha(b"\r\n"));
        assert_eq!(got[1].hash, sha(b""));
        // Relaxed: trailing space dropped, runs of WSP made one, trailing
        // empty lines dropped; l= counts canonicalized bytes.
        let f = file(b"H: v\r\n\r\na  b \r\nc\r\n\r\n\r\n");
        let got = hashes(
            &f,
            8,
            &[
                (Canonicalization::Relaxed, 0),
                (Canonicalization::Relaxed, 4),
                (Canonicalization::Simple, 0),
            ],
        )
        .unwrap();
        assert_eq!(got[0].hash, sha(b"a b\r\nc\r\n"));
        assert_eq!(got[0].canonical_len, 8);
        assert_eq!(got[1].hash, sha(b"a b\r"), "cut after 4 canonical bytes");
        assert_eq!(got[2].hash, sha(b"a  b \r\nc\r\n"));
    }
}
