//! A queue item: the envelope and per-recipient state of one message, as
//! stored in `m:<ID>` (JSON, versioned). The body lives beside it in
//! `d:<ID>`, so a state change rewrites a few hundred bytes, not the
//! message.

use serde::{Deserialize, Serialize};

/// Bumped when the stored form changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// Why an item file could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum FileError {
    /// Whole, but not an item this version reads: kept for the operator.
    Bad(String),
    /// The start of a new item whose write a crash interrupted: its
    /// message was never acknowledged (the item is written only once the
    /// body is durable, and the reply waits for the item's fsync), so it
    /// and its body are removed.
    Torn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Pending,
    Sent,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// An address: local user or remote mailbox.
    Email,
    /// A pipe alias; `address` is the command line.
    Pipe,
    /// Forward through `via` servers.
    Forward { via: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// Final address (clean form for local users), or the pipe's command.
    pub address: String,
    pub kind: Kind,
    /// Whether `address` is in a local domain (decided at put time).
    pub local: bool,
    pub status: Status,
    /// The last failure text, for the DSN.
    pub last_failure: String,
    /// Whether the last failure was permanent.
    pub permanent: bool,
    /// The RCPT this recipient came from.
    pub original_address: String,
    /// Whether an attempt may have delivered to it without this process
    /// learning it: the last attempt failed temporarily (deliverd may have
    /// died after writing), or the item was read from disk (queued may
    /// have died after the delivery, before recording it). In memory
    /// only: read back from disk, it is true.
    #[serde(skip, default = "read_from_disk")]
    pub uncertain: bool,
}

fn read_from_disk() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub version: u32,
    pub id: String,
    /// Envelope sender; empty for `<>`.
    pub from: String,
    /// The RCPTs as accepted.
    pub rcpt_to: Vec<String>,
    /// Creation time, Unix milliseconds; the give-up deadline counts from
    /// here and survives restarts.
    pub created_ms: i64,
    /// Where the message came from, for logs (`ip:port`, or `local`).
    pub client: String,
    pub recipients: Vec<Recipient>,
    /// The body's size in bytes when the item was written. The item and
    /// its body are fsync'd at the same time, so a crash can leave a
    /// whole item beside a body that is missing or short: at startup
    /// such an item is a put that never got its 250 ([`crate::spool`]).
    /// Absent from items written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_len: Option<u64>,
    /// Whether this is a rewrite after a delivery attempt (an `m:` file
    /// written by [`crate::spool::Spool::stage_item`]), not the item as
    /// its put wrote it: a short body under a rewrite is damage, not a
    /// put that never got its 250.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rewritten: bool,
}

impl Item {
    /// As an `m:` file: indented, for the operator's eyes.
    pub fn to_json(&self) -> std::io::Result<Vec<u8>> {
        // Plain structs of strings: never fails, but an empty item
        // written in its place would read as a crash's leftover.
        serde_json::to_vec_pretty(self).map_err(std::io::Error::other)
    }

    /// As an attribute of its body ([`crate::spool::ITEM_XATTR`]): it must
    /// fit in a few KiB, which a line does better.
    pub fn to_compact_json(&self) -> std::io::Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(std::io::Error::other)
    }

    /// Reads an item file. A new item is written under its own name, not
    /// renamed into place, so a crash can leave the start of one: a JSON
    /// object cut anywhere is incomplete (only the whole object closes
    /// its outer brace), and so is an empty file. Nothing else is taken
    /// for a cut: a whole file that is not an item this version reads is
    /// [`FileError::Bad`], kept for the operator.
    pub fn from_file(bytes: &[u8]) -> Result<Self, FileError> {
        // JSON's whitespace, not form feeds and the like.
        let start = bytes
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        let Some(start) = start else {
            return Err(FileError::Torn);
        };
        match serde_json::from_slice::<Item>(bytes) {
            // Only an object can be the start of an item.
            Err(e) if e.is_eof() && bytes[start] == b'{' => Err(FileError::Torn),
            Err(e) => Err(FileError::Bad(e.to_string())),
            Ok(item) if item.version != FORMAT_VERSION => Err(FileError::Bad(format!(
                "format version {} is not {FORMAT_VERSION}",
                item.version
            ))),
            Ok(item) => Ok(item),
        }
    }

    pub fn pending(&self) -> impl Iterator<Item = (usize, &Recipient)> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == Status::Pending)
    }
}

/// A new queue ID: 8 random bytes, URL-safe base64 without padding. Never
/// starting with `-`, so an ID on a command line (`rm m:…` is fine, but a
/// bare ID in a tool's arguments) is never taken for an option.
pub fn new_id() -> std::io::Result<String> {
    loop {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b)
            .map_err(|e| std::io::Error::other(format!("no random source: {e}")))?;
        let id = encode_id(b);
        if !id.starts_with('-') {
            return Ok(id);
        }
    }
}

fn encode_id(b: [u8; 8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_11_url_safe_chars() {
        let id = new_id().unwrap();
        assert_eq!(id.len(), 11);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(new_id().unwrap(), id);
    }

    #[test]
    fn ids_never_start_with_a_dash() {
        // 0xF8 in the first byte's top six bits encodes as '-'.
        assert!(encode_id([0xF8, 0, 0, 0, 0, 0, 0, 0]).starts_with('-'));
        for _ in 0..20_000 {
            assert!(!new_id().unwrap().starts_with('-'));
        }
    }

    #[test]
    fn json_round_trip_and_version_check() {
        let item = Item {
            version: FORMAT_VERSION,
            id: "abc".into(),
            from: "".into(),
            rcpt_to: vec!["a@b".into()],
            created_ms: 1,
            client: "local".into(),
            recipients: vec![],
            body_len: None,
            rewritten: false,
        };
        assert_eq!(Item::from_file(&item.to_json().unwrap()).unwrap(), item);
        let mut old = item.clone();
        old.version = 99;
        assert!(Item::from_file(&old.to_json().unwrap()).is_err());
        assert!(Item::from_file(b"{not json").is_err());
    }

    #[test]
    fn only_a_cut_object_or_an_empty_file_is_a_cut_write() {
        // Every kind of value an item holds, so that cuts land in each:
        // strings with escapes and multi-byte UTF-8, numbers, booleans,
        // each enum and the variant with a field.
        let rcpt = |address: &str, kind: Kind, status: Status| Recipient {
            address: address.into(),
            kind,
            local: true,
            status,
            last_failure: "4.4.1 \"quoted\" \\ tab\t ctrl\u{1} ñandú 📬".into(),
            permanent: false,
            original_address: "ann+tag@example.org".into(),
            uncertain: true,
        };
        let item = Item {
            version: FORMAT_VERSION,
            id: "abc".into(),
            from: "jürgen@bücher.example".into(),
            rcpt_to: vec!["c@d".into(), "e@f".into()],
            created_ms: 1_733_000_000_123,
            client: "[2001:db8::1]:25".into(),
            recipients: vec![
                rcpt("ann@example.org", Kind::Email, Status::Pending),
                rcpt("/usr/bin/x --y", Kind::Pipe, Status::Sent),
                rcpt(
                    "bob@example.net",
                    Kind::Forward {
                        via: vec!["mx1.example.net".into(), "[192.0.2.1]:2525".into()],
                    },
                    Status::Failed,
                ),
            ],
            body_len: Some(1234),
            rewritten: true,
        };
        let file = item.to_json().unwrap();
        assert_eq!(Item::from_file(&file).unwrap(), item);
        // Every cut a crash could leave is recognised as one.
        for cut in 0..file.len() {
            assert_eq!(
                Item::from_file(&file[..cut]),
                Err(FileError::Torn),
                "cut at {cut}"
            );
        }
        // Whole but not an item this version reads, hand-edited or
        // damaged: kept, never taken for a cut.
        let mut old = item.clone();
        old.version = 0;
        for whole in [
            old.to_json().unwrap(),
            b"{ not json".to_vec(),
            b"{}".to_vec(),
            b"[".to_vec(),
            b"\"unterminated".to_vec(),
            b"\x0c".to_vec(),
            [file.as_slice(), b"\n#trailing"].concat(),
            [&file[..file.len() / 2], &[0u8; 16][..]].concat(),
        ] {
            assert!(
                matches!(Item::from_file(&whole), Err(FileError::Bad(_))),
                "{}",
                String::from_utf8_lossy(&whole)
            );
        }
    }
}
