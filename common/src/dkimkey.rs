//! DKIM private keys as tambo reads them (REFERENCE §4.9): the selector
//! rule and the key file format, shared by queued (which signs) and the
//! `tambo dkim-*` commands (which write and publish keys), so both accept
//! and refuse exactly the same files. Behind the `dkim` feature: only
//! those two link ring's key code through here.

use ring::signature::{Ed25519KeyPair, RsaKeyPair};
use rustls_pki_types::pem::{PemObject, SectionKind};

/// A DKIM signing key.
pub enum DkimKey {
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl DkimKey {
    /// The `a=` tag's value.
    pub fn algorithm(&self) -> &'static str {
        match self {
            DkimKey::Rsa(_) => "rsa-sha256",
            DkimKey::Ed25519(_) => "ed25519-sha256",
        }
    }

    /// Signs what RFC 6376 §3.7 says to sign (`tbs`).
    pub fn sign(
        &self,
        tbs: &[u8],
        rng: &ring::rand::SystemRandom,
    ) -> Result<Vec<u8>, ring::error::Unspecified> {
        match self {
            DkimKey::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&ring::signature::RSA_PKCS1_SHA256, rng, tbs, &mut sig)?;
                Ok(sig)
            }
            // RFC 8463 §3: Ed25519 (pure) over the SHA-256 hash of the data.
            DkimKey::Ed25519(k) => {
                let hash = ring::digest::digest(&ring::digest::SHA256, tbs);
                Ok(k.sign(hash.as_ref()).as_ref().to_vec())
            }
        }
    }
}

/// The selector of a key file named `dkim:<selector>.pem`, unchecked.
pub fn selector_of(file_name: &str) -> Option<&str> {
    file_name.strip_prefix("dkim:")?.strip_suffix(".pem")
}

/// Whether `s` can be a selector: it goes into `s=` and into a DNS name,
/// so it is dot-separated labels (RFC 6376 §3.1: letters, digits, '-').
/// '_' is accepted too, as DNS and verifiers take it and existing setups
/// use it; nothing that could end a tag (';', '=', spaces) gets through.
pub fn valid_selector(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses a PEM `PRIVATE KEY` (PKCS#8) block holding an RSA or Ed25519
/// key; the error is the reason, for a one-line message.
pub fn parse(pem: &[u8]) -> Result<DkimKey, String> {
    // The first PEM block must be the key (as in chasquid); blocks with
    // labels rustls-pki-types does not know (e.g. "ENCRYPTED PRIVATE KEY",
    // "OPENSSH PRIVATE KEY") are skipped, so those files find no block.
    let (kind, der) = match <(SectionKind, Vec<u8>)>::pem_slice_iter(pem).next() {
        None => {
            return Err("no PEM key block: a DKIM key must be an unencrypted PEM \
                        \"PRIVATE KEY\" (PKCS#8)"
                .into());
        }
        Some(Err(e)) => return Err(format!("bad PEM: {e}")),
        Some(Ok(block)) => block,
    };
    match kind {
        SectionKind::PrivateKey => {}
        SectionKind::RsaPrivateKey => {
            return Err(
                "the PEM block is \"RSA PRIVATE KEY\" (PKCS#1), but DKIM keys must \
                        be \"PRIVATE KEY\" (PKCS#8): convert it with \
                        `openssl pkcs8 -topk8 -nocrypt`"
                    .into(),
            );
        }
        SectionKind::EcPrivateKey => {
            return Err(
                "the PEM block is \"EC PRIVATE KEY\": DKIM keys must be RSA or \
                        Ed25519, in a \"PRIVATE KEY\" (PKCS#8) block"
                    .into(),
            );
        }
        other => {
            return Err(format!(
                "the first PEM block is {other:?}, not a \"PRIVATE KEY\" (PKCS#8)"
            ));
        }
    }
    parse_pkcs8(&der)
}

/// Parses PKCS#8 DER holding an RSA or Ed25519 key.
pub fn parse_pkcs8(der: &[u8]) -> Result<DkimKey, String> {
    // ring tells the key types apart by the PKCS#8 algorithm identifier:
    // "WrongAlgorithm" means "not this type" (ring's KeyRejected is only a
    // reason string). from_pkcs8_maybe_unchecked takes PKCS#8 v1, which
    // OpenSSL and Go (chasquid-util) write; a v2 key's public half is still
    // checked against the private one.
    match Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| e.to_string()) {
        Ok(k) => return Ok(DkimKey::Ed25519(k)),
        Err(e) if e == "WrongAlgorithm" => {}
        // Not even PKCS#8's outer structure, so no type to name.
        Err(e) if e == "InvalidEncoding" => return Err(format!("invalid PKCS#8 key: {e}")),
        Err(e) => return Err(format!("invalid Ed25519 key: {e}")),
    }
    RsaKeyPair::from_pkcs8(der)
        .map(DkimKey::Rsa)
        .map_err(|e| match e.to_string().as_str() {
            "WrongAlgorithm" => "unsupported key type: DKIM keys must be RSA or Ed25519".into(),
            "TooSmall" => "RSA key too small: the modulus needs at least 2048 bits \
                           (and the public exponent at least 65537)"
                .into(),
            "TooLarge" => "RSA key too large: at most 4096 bits are supported".into(),
            other => format!("invalid RSA key: {other}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_dns_labels() {
        for good in ["20261201", "sel-1", "a_b.c", "x"] {
            assert!(valid_selector(good), "{good:?}");
        }
        for bad in [
            "",
            "a;b",
            "a=b",
            "a b",
            "a..b",
            ".a",
            "a/b",
            &"x".repeat(64),
        ] {
            assert!(!valid_selector(bad), "{bad:?}");
        }
        assert_eq!(selector_of("dkim:sel.pem"), Some("sel"));
        assert_eq!(selector_of("dkim:sel.key"), None);
        assert_eq!(selector_of("other.pem"), None);
    }

    #[test]
    fn wrong_blocks_are_refused_with_the_reason() {
        let e = parse(b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n")
            .err()
            .unwrap();
        assert!(e.contains("PKCS#1"), "{e}");
        assert!(
            parse(b"no pem here")
                .err()
                .unwrap()
                .contains("no PEM key block")
        );
        let rng = ring::rand::SystemRandom::new();
        let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        assert!(matches!(parse_pkcs8(ed.as_ref()), Ok(DkimKey::Ed25519(_))));
    }
}
