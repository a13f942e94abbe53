//! DKIM-signing a spooled message (REFERENCE §2.8 step 3, §4.9).
//!
//! Authenticated mail is signed with every key of its MAIL FROM domain
//! after its body is in the spool and before it becomes a queue item; a
//! failure refuses the message (451), so nothing leaves unsigned that
//! should have been signed. The signature covers the message as the
//! client sent it: the `Received` header smtpd put on top stays above the
//! `DKIM-Signature` fields (the order of §2.8 step 4), outside what is
//! signed.

use std::fs::File;
use std::io::{self, Read, Write};

use tambo_common::safeio;

use crate::dkim::{DkimError, DkimKeys};
use crate::spool::Spool;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read or rewrite the message: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Dkim(#[from] DkimError),
}

/// Where the client's message starts in a spooled body: after the first
/// header field if it is the `Received` smtpd adds (with its folded
/// lines), else at 0.
pub fn original_start(body: &[u8]) -> usize {
    const NAME: &[u8] = b"received:";
    if body.len() < NAME.len() || !body[..NAME.len()].eq_ignore_ascii_case(NAME) {
        return 0;
    }
    let mut pos = 0;
    loop {
        match body[pos..].windows(2).position(|w| w == b"\r\n") {
            Some(i) => pos += i + 2,
            None => return 0,
        }
        // A folded line continues the field.
        if !matches!(body.get(pos), Some(b' ' | b'\t')) {
            return pos;
        }
    }
}

/// Signs the body `id` with the keys of `domain`, rewriting it atomically
/// (temp file, fsync, rename; the caller's directory fsync makes the
/// rename durable). Returns how many signatures were added (0: the domain
/// has no keys, and the body is untouched).
pub fn sign_spooled(
    spool: &Spool,
    id: &str,
    keys: &DkimKeys,
    domain: &str,
) -> Result<usize, SignError> {
    let n = keys.count(domain);
    if n == 0 {
        return Ok(0);
    }
    let path = spool.body_path(id);
    let mut body = Vec::new();
    File::open(&path)?.read_to_end(&mut body)?;
    let split = original_start(&body);
    let signatures = keys.sign(domain, &body[split..])?;
    let tmp = safeio::temp_path(&path)?;
    let written = (|| {
        let mut f = crate::spool::create_private(&tmp)?;
        f.write_all(&body[..split])?;
        f.write_all(&signatures)?;
        f.write_all(&body[split..])?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_starts_after_smtpds_received() {
        let body = b"Received: from a\r\n\tby b; date\r\nFrom: x\r\n\r\nhi\r\n";
        assert_eq!(&body[original_start(body)..], b"From: x\r\n\r\nhi\r\n");
        let body = b"RECEIVED: one line\r\nSubject: s\r\n\r\n";
        assert_eq!(&body[original_start(body)..], b"Subject: s\r\n\r\n");
        // Nothing added: all of it is the original.
        assert_eq!(original_start(b"From: x\r\n\r\nbody\r\n"), 0);
        assert_eq!(original_start(b"Received: unterminated"), 0);
        assert_eq!(original_start(b""), 0);
    }
}
