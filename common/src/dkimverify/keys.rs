//! Signers' public keys: the TXT records at `<s>._domainkey.<d>`, and
//! which of them may be used.
//!
//! The lookup is behind [`KeySource`] so the tests can serve keys without
//! a DNS server; deliverd's is the shared resolver inside the
//! [`MessageAuthenticator`].

use std::future::Future;
use std::sync::Arc;

use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{Name, RData};
use mail_auth::MessageAuthenticator;
use mail_auth::common::crypto::HashAlgorithm;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::DkimError;

/// Most keys tried for one signature (REFERENCE §4.9: every TXT record
/// that parses as a key), so a name with a hundred records cannot make a
/// hundred RSA verifications.
pub const MAX_KEYS: usize = 5;

/// RFC 8301 §3.2: verifiers must not accept RSA keys under this size.
pub const MIN_RSA_BITS: usize = 1024;

/// Why there are no records to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// NXDOMAIN, or no TXT records: the signer has no such key.
    NotFound,
    /// `s=` and `d=` do not make a domain name.
    BadName,
    /// Anything else (SERVFAIL, a timeout, no server): try again later.
    Temporary(String),
}

/// Where keys come from.
pub trait KeySource: Clone + Send + Sync + 'static {
    /// The TXT records at `name` (fully qualified, ASCII), each one's
    /// strings joined.
    fn txt(&self, name: String) -> impl Future<Output = Result<Vec<Vec<u8>>, KeyError>> + Send;
}

impl KeySource for Arc<MessageAuthenticator> {
    async fn txt(&self, name: String) -> Result<Vec<Vec<u8>>, KeyError> {
        let name = Name::from_ascii(&name).map_err(|_| KeyError::BadName)?;
        match self.0.txt_lookup(name).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    // A CNAME chain leaves its CNAMEs among the answers.
                    RData::TXT(t) => Some(t.txt_data.concat()),
                    _ => None,
                })
                .collect()),
            Err(e) => Err(classify(&e)),
        }
    }
}

/// As MX lookups do (remote/mx.rs): only an answer that proves the name
/// absent or empty is final; a referral and every other failure say
/// nothing about the key, and are temporary.
fn classify(e: &NetError) -> KeyError {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) if nr.soa.is_none() && nr.ns.is_some() => {
            KeyError::Temporary("a referral instead of an answer".into())
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => KeyError::NotFound,
        e => KeyError::Temporary(e.to_string()),
    }
}

/// The name a signature's key is at: `<s>._domainkey.<d>.`, `d=` in its
/// ASCII form (RFC 8616 §4 allows U-labels in `d=`).
pub fn key_name(selector: &str, domain: &str) -> Option<String> {
    let domain = idna::domain_to_ascii(domain.trim_end_matches('.')).ok()?;
    if selector.is_empty() || domain.is_empty() || !selector.is_ascii() {
        return None;
    }
    Some(format!("{selector}._domainkey.{domain}."))
}

/// The records that are keys this verifier may use, at most [`MAX_KEYS`],
/// and why the last one that was not, was not.
pub fn usable(records: &[Vec<u8>]) -> (Vec<Arc<DomainKey>>, Option<&'static str>) {
    let mut keys = Vec::new();
    let mut refused = None;
    for record in records {
        if keys.len() == MAX_KEYS {
            break;
        }
        match DomainKey::parse(record) {
            Ok(key) if key.p.public_key_bits() < MIN_RSA_BITS => {
                refused = Some("RSA key under 1024 bits (RFC 8301)");
            }
            // A key that lists its hashes (h=) must allow sha256, the
            // only one accepted here.
            Ok(key)
                if (key.has_flag(HashAlgorithm::Sha1) || key.has_flag(HashAlgorithm::Sha256))
                    && !key.has_flag(HashAlgorithm::Sha256) =>
            {
                refused = Some("the key does not allow sha256");
            }
            Ok(key) => keys.push(Arc::new(key)),
            Err(mail_auth::Error::Dkim(DkimError::RevokedPublicKey)) => {
                refused = Some("the key was revoked");
            }
            Err(_) => refused = Some("no valid key in the DNS record"),
        }
    }
    (keys, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        assert_eq!(
            key_name("sel", "Example.COM").as_deref(),
            Some("sel._domainkey.example.com.")
        );
        assert_eq!(
            key_name("a.b", "bücher.example.").as_deref(),
            Some("a.b._domainkey.xn--bcher-kva.example.")
        );
        assert_eq!(key_name("", "example.com"), None);
        assert_eq!(key_name("sel", ""), None);
    }

    #[test]
    fn which_records_are_usable() {
        let ed = b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".to_vec();
        let (keys, why) = usable(&[b"v=spf1 -all".to_vec(), ed.clone()]);
        assert_eq!(
            (keys.len(), why),
            (1, Some("no valid key in the DNS record"))
        );
        let (keys, why) = usable(&[b"v=DKIM1; p=".to_vec()]);
        assert_eq!((keys.len(), why), (0, Some("the key was revoked")));
        let sha1 = b"v=DKIM1; k=ed25519; h=sha1; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        let (keys, why) = usable(&[sha1.to_vec()]);
        assert_eq!(
            (keys.len(), why),
            (0, Some("the key does not allow sha256"))
        );
        let many: Vec<Vec<u8>> = (0..20).map(|_| ed.clone()).collect();
        assert_eq!(usable(&many).0.len(), MAX_KEYS);
    }
}
