//! The start of an unauthenticated message, held until its header section
//! ends, so that its Authentication-Results field goes on top as the body
//! is spooled rather than in a rewrite after DATA (a second file, a copy
//! of the message and the creation of an inode, for every message).
//!
//! Held only where that field is all the checks after DATA would add: the
//! message is not authenticated (authenticated mail is signed, which needs
//! the whole message) and the site has no post-data hook. Once the header
//! section is complete the field is known: SPF came at MAIL, and without a
//! DKIM-Signature field there is nothing for deliverd to verify. A signed
//! message, or a header section over [`SCAN_LIMIT`], is spooled as it came
//! and takes the usual path after DATA.
//!
//! What is held counts in the in-flight byte budget like any other
//! received byte, and is at most [`SCAN_LIMIT`] plus one chunk.

use super::postdata::{SCAN_LIMIT, header_has_signature};

pub(super) struct Head {
    /// The message so far.
    held: Vec<u8>,
    /// The Authentication-Results field to put on top if it is unsigned.
    field: Vec<u8>,
}

/// What to spool once the start of a message is decided.
pub(super) struct Decided {
    /// The bytes to write, the field on top if it went there.
    pub bytes: Vec<u8>,
    /// Whether the field went on top (the checks after DATA are done).
    pub prefixed: bool,
}

impl Head {
    pub fn new(field: Vec<u8>) -> Self {
        Self {
            held: Vec::new(),
            field,
        }
    }

    /// Adds a chunk; `Some` once the start of the message is decided.
    pub fn push(&mut self, chunk: &[u8]) -> Option<Decided> {
        // Only the new bytes (and the three before them) can complete the
        // blank line that ends the header section.
        let from = self.held.len().saturating_sub(3);
        self.held.extend_from_slice(chunk);
        let ended = self.held.starts_with(b"\r\n")
            || self.held[from..].windows(4).any(|w| w == b"\r\n\r\n");
        if ended {
            Some(self.decide(false))
        } else if self.held.len() >= SCAN_LIMIT {
            Some(self.decide(true))
        } else {
            None
        }
    }

    /// The message ended while held: all of it is the header section.
    pub fn finish(mut self) -> Decided {
        self.decide(false)
    }

    fn decide(&mut self, cut: bool) -> Decided {
        let held = std::mem::take(&mut self.held);
        if header_has_signature(&held, cut) || self.field.is_empty() {
            return Decided {
                bytes: held,
                prefixed: false,
            };
        }
        let mut bytes = std::mem::take(&mut self.field);
        bytes.extend_from_slice(&held);
        Decided {
            bytes,
            prefixed: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELD: &[u8] = b"Authentication-Results: mx; dkim=none\r\n";

    #[test]
    fn an_unsigned_message_gets_the_field_on_top_whatever_the_cuts() {
        let msg = b"Received: by mx\r\nSubject: hi\r\n\r\nbody\r\n";
        for cut in 1..msg.len() {
            let mut h = Head::new(FIELD.to_vec());
            let mut out = Vec::new();
            let mut done = false;
            for piece in msg.chunks(cut) {
                if done {
                    out.extend_from_slice(piece);
                } else if let Some(d) = h.push(piece) {
                    assert!(d.prefixed);
                    out.extend_from_slice(&d.bytes);
                    done = true;
                }
            }
            assert!(done, "cut {cut}: decided once the header section ended");
            assert_eq!(out, [FIELD, msg].concat(), "cut {cut}");
        }
    }

    #[test]
    fn a_signed_message_is_left_alone() {
        let mut h = Head::new(FIELD.to_vec());
        let msg = b"DKIM-Signature: v=1; d=x\r\nSubject: hi\r\n\r\nbody\r\n";
        let d = h.push(msg).unwrap();
        assert!(!d.prefixed);
        assert_eq!(d.bytes, msg);
    }

    #[test]
    fn a_header_section_that_never_ends_is_left_alone() {
        let mut h = Head::new(FIELD.to_vec());
        let line = b"X-Filler: 0123456789abcdef0123456789abcdef\r\n";
        let mut decided = None;
        while decided.is_none() {
            decided = h.push(line);
        }
        let d = decided.unwrap();
        assert!(
            !d.prefixed,
            "past the scan limit it may be signed further on"
        );
        assert!(d.bytes.len() >= SCAN_LIMIT);
    }

    #[test]
    fn a_message_that_is_all_header_is_decided_at_its_end() {
        let mut h = Head::new(FIELD.to_vec());
        assert!(h.push(b"Subject: no body\r\n").is_none());
        let d = h.finish();
        assert!(d.prefixed);
        assert_eq!(d.bytes, [FIELD, b"Subject: no body\r\n"].concat());
    }
}
