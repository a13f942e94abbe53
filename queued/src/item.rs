//! A queue item: the envelope and per-recipient state of one message, as
//! stored in `m:<ID>` (JSON, versioned). The body lives beside it in
//! `d:<ID>`, so a state change rewrites a few hundred bytes, not the
//! message.

use serde::{Deserialize, Serialize};

/// Bumped when the stored form changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

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
}

impl Item {
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let item: Item = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if item.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not {FORMAT_VERSION}",
                item.version
            ));
        }
        Ok(item)
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
        };
        assert_eq!(Item::from_json(&item.to_json()).unwrap(), item);
        let mut old = item.clone();
        old.version = 99;
        assert!(Item::from_json(&old.to_json()).is_err());
        assert!(Item::from_json(b"{not json").is_err());
    }
}
