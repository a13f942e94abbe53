//! One signature: what identifies it, the checks it must pass before any
//! key is fetched (RFC 6376 §6.1.1, RFC 8301), and the verification with
//! each key, mail-auth's results mapped to RFC 8601's.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;

use mail_auth::common::crypto::{Algorithm, CryptoError, HashAlgorithm};
use mail_auth::common::headers::Header;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::{DkimError, Signature};
use mail_auth::{AuthenticatedMessage, MessageAuthenticator, Parameters, ResolverCache, Txt};

use crate::authres::DkimResult;

/// The tags of a `DKIM-Signature` value (RFC 6376 §3.2) that mail-auth
/// does not give back for every signature: `d=` and `b=` name it in
/// Authentication-Results even when it does not parse; `q=` is not
/// checked by mail-auth at all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tags {
    pub d: String,
    /// Folding white space removed.
    pub b: String,
    pub q: Option<String>,
}

/// Reads the tags of a signature's value. The first of repeated tags
/// counts.
pub fn tags(value: &[u8]) -> Tags {
    let text = String::from_utf8_lossy(value);
    let mut tags = Tags::default();
    let (mut d, mut b) = (false, false);
    for spec in text.split(';') {
        let Some((name, value)) = spec.split_once('=') else {
            continue;
        };
        let value = value.trim_matches(|c: char| c.is_ascii_whitespace());
        match name.trim_matches(|c: char| c.is_ascii_whitespace()) {
            "d" if !d => {
                d = true;
                tags.d = value.to_string();
            }
            "b" if !b => {
                b = true;
                tags.b = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            }
            "q" if tags.q.is_none() => tags.q = Some(value.to_string()),
            _ => {}
        }
    }
    tags
}

/// The checks that need no key. `Err` is the signature's result.
pub fn precheck(sig: &Signature, tags: &Tags) -> Result<(), DkimResult> {
    let perm = |why: &str| Err(DkimResult::PermError(why.to_string()));
    if sig.v != 1 {
        return perm("v= is missing");
    }
    if sig.a == Algorithm::RsaSha1 {
        return perm("rsa-sha1 is not accepted (RFC 8301)");
    }
    if sig.h.len() > super::MAX_SIGNED_FIELDS {
        return perm("h= lists too many fields");
    }
    if !sig.h.iter().any(|h| h.trim().eq_ignore_ascii_case("from")) {
        return perm("From is not signed");
    }
    if !sig.i.is_empty() && !within(&sig.i, &sig.d) {
        return perm("i= is not within d=");
    }
    if let Some(q) = &tags.q
        && !q
            .split(':')
            .any(|m| m.trim().eq_ignore_ascii_case("dns/txt"))
    {
        return perm("q= does not allow dns/txt");
    }
    Ok(())
}

/// Whether the domain of the identity `i` is `d` or a subdomain of it
/// (RFC 6376 §3.5, `i=`).
fn within(i: &str, d: &str) -> bool {
    let Some((_, domain)) = i.rsplit_once('@') else {
        return false;
    };
    let (domain, d) = (domain.to_ascii_lowercase(), d.to_ascii_lowercase());
    let d = d.trim_end_matches('.');
    let domain = domain.trim_end_matches('.');
    !d.is_empty() && (domain == d || domain.ends_with(&format!(".{d}")))
}

/// The message as mail-auth verifies one signature: only that signature,
/// its body hash (computed by the caller, already compared), and none of
/// the extras that would cost DNS queries a sender chooses (`r=` reports,
/// `atps=`) or that tambo does not enforce (`x=`, REFERENCE §4.9).
pub fn alone<'x>(
    parsed: &AuthenticatedMessage<'x>,
    header: &Header<'x, Signature>,
) -> AuthenticatedMessage<'x> {
    let mut h = header.clone();
    h.header.x = 0;
    h.header.r = false;
    h.header.atps = None;
    h.header.atpsh = None;
    AuthenticatedMessage {
        headers: parsed.headers.clone(),
        raw_message: parsed.raw_message,
        body_offset: parsed.body_offset,
        // mail-auth looks this entry up (and panics without it) by the
        // signature's own algorithm.
        body_hashes: vec![(
            h.header.cb,
            HashAlgorithm::from(h.header.a),
            h.header.l,
            h.header.bh.clone(),
        )],
        dkim_headers: vec![h],
        ..Default::default()
    }
}

/// What one key said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Pass,
    /// The signature does not verify with this key.
    BadSignature,
    /// The key cannot be used for this signature.
    Unusable(String),
}

/// Answers every TXT lookup with one key: mail-auth then verifies with
/// that key and asks no DNS server.
struct OneKey(Txt);

impl ResolverCache<Box<str>, Txt> for OneKey {
    fn get<Q>(&self, _: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        Some(self.0.clone())
    }

    fn remove<Q>(&self, _: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _: Box<str>, _: Txt, _: std::time::Instant) {}
}

/// Verifies `one` (from [`alone`]) with `key`.
pub async fn with_key(
    auth: &MessageAuthenticator,
    one: &AuthenticatedMessage<'_>,
    key: Arc<DomainKey>,
) -> Attempt {
    let cache = OneKey(Txt::DomainKey(key));
    let out = auth
        .verify_dkim(Parameters::new(one).with_txt_cache(&cache))
        .await;
    match out.first().map(|o| o.result()) {
        Some(mail_auth::DkimResult::Pass) => Attempt::Pass,
        Some(mail_auth::DkimResult::Fail(e)) => attempt_failed(e),
        Some(other) => Attempt::Unusable(other.to_string()),
        None => Attempt::Unusable("no result".into()),
    }
}

fn attempt_failed(e: &mail_auth::Error) -> Attempt {
    match e {
        // mail-auth reports a bad Ed25519 signature as ring's error, a bad
        // RSA one as FailedVerification: at this point (the key parsed)
        // both mean the signature does not verify.
        mail_auth::Error::Crypto(CryptoError::FailedVerification | CryptoError::Library(_)) => {
            Attempt::BadSignature
        }
        mail_auth::Error::Crypto(CryptoError::IncompatibleAlgorithms) => {
            Attempt::Unusable("the key's type does not match a=".into())
        }
        mail_auth::Error::Dkim(DkimError::FailedAuidMatch) => {
            Attempt::Unusable("i= is not d= exactly, and the key has t=s".into())
        }
        e => Attempt::Unusable(e.to_string()),
    }
}

/// The signature's result from what every key said: a pass if any key
/// verifies it; a fail if one could be used and did not; else a permanent
/// error saying why the last one could not be used.
pub fn conclude(attempts: &[Attempt]) -> DkimResult {
    if attempts.contains(&Attempt::Pass) {
        return DkimResult::Pass;
    }
    if attempts.contains(&Attempt::BadSignature) {
        return DkimResult::Fail("signature did not verify".into());
    }
    let why = attempts.iter().rev().find_map(|a| match a {
        Attempt::Unusable(why) => Some(why.clone()),
        _ => None,
    });
    DkimResult::PermError(why.unwrap_or_else(|| "no usable key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_read_as_written() {
        let t = tags(b" v=1; a=rsa-sha256; d = Example.com ;\r\n\tq=dns/txt; b=abc\r\n\t def/+=\r\n ; d=second");
        assert_eq!(t.d, "Example.com");
        assert_eq!(t.b, "abcdef/+=");
        assert_eq!(t.q.as_deref(), Some("dns/txt"));
        assert_eq!(tags(b"garbage"), Tags::default());
    }

    fn sig(f: impl FnOnce(&mut Signature)) -> Signature {
        let mut s = Signature {
            v: 1,
            a: Algorithm::RsaSha256,
            d: "example.com".into(),
            s: "sel".into(),
            h: vec!["From".into(), "Subject".into()],
            ..Default::default()
        };
        f(&mut s);
        s
    }

    fn perm(why: &str) -> Result<(), DkimResult> {
        Err(DkimResult::PermError(why.into()))
    }

    #[test]
    fn prechecks() {
        let none = Tags::default();
        assert_eq!(precheck(&sig(|_| {}), &none), Ok(()));
        assert_eq!(precheck(&sig(|s| s.v = 0), &none), perm("v= is missing"));
        assert_eq!(
            precheck(&sig(|s| s.a = Algorithm::RsaSha1), &none),
            perm("rsa-sha1 is not accepted (RFC 8301)")
        );
        assert_eq!(
            precheck(&sig(|s| s.h = vec!["Subject".into()]), &none),
            perm("From is not signed")
        );
        for (i, ok) in [
            ("@example.com", true),
            ("user@Mail.Example.COM", true),
            ("user@badexample.com", false),
            ("user@example.com.evil", false),
            ("no-at-sign", false),
        ] {
            let got = precheck(&sig(|s| s.i = i.into()), &none);
            assert_eq!(got.is_ok(), ok, "{i}");
        }
        let q = |q: &str| Tags {
            q: Some(q.into()),
            ..Default::default()
        };
        assert_eq!(precheck(&sig(|_| {}), &q("dns/txt")), Ok(()));
        assert_eq!(precheck(&sig(|_| {}), &q("other:DNS/TXT")), Ok(()));
        assert_eq!(
            precheck(&sig(|_| {}), &q("http/well-known")),
            perm("q= does not allow dns/txt")
        );
    }

    #[test]
    fn conclusions() {
        use Attempt::*;
        let un = |s: &str| Unusable(s.into());
        assert_eq!(conclude(&[un("x"), Pass]), DkimResult::Pass);
        assert_eq!(
            conclude(&[BadSignature, un("x")]),
            DkimResult::Fail("signature did not verify".into())
        );
        assert_eq!(
            conclude(&[un("a"), un("b")]),
            DkimResult::PermError("b".into())
        );
        assert_eq!(conclude(&[]), DkimResult::PermError("no usable key".into()));
        assert_eq!(
            attempt_failed(&mail_auth::Error::Crypto(CryptoError::FailedVerification)),
            BadSignature
        );
        assert_eq!(
            attempt_failed(&mail_auth::Error::Dkim(DkimError::FailedAuidMatch)),
            un("i= is not d= exactly, and the key has t=s")
        );
    }
}
