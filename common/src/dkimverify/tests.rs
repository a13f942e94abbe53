//! Verification end to end, but for DNS: messages signed here with
//! mail-auth's signer (an Ed25519 key made for the run, and a fixed RSA
//! test key in testdata/), keys served by a fake [`KeySource`]. The e2e
//! tests sign with another implementation (python3-dkim) and serve the
//! keys from a DNS server.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use mail_auth::MessageAuthenticator;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner};

use crate::authres::{DkimResult, DkimSignature};

use super::*;

/// A 2048-bit RSA key made for these tests only (`openssl genpkey`).
const RSA_PEM: &str = include_str!("testdata/rsa2048.pem");
const RSA_PUB: &str = include_str!("testdata/rsa2048.pub.b64");
/// A 512-bit RSA public key: under RFC 8301's minimum.
const RSA512_PUB: &str = include_str!("testdata/rsa512.pub.b64");

const MSG: &[u8] = b"From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nHi Bob,\r\n  see you   soon.\r\n";

/// What a lookup of a name gives.
type Answer = Result<Vec<Vec<u8>>, KeyError>;

#[derive(Clone, Default)]
struct Keys(Arc<HashMap<String, Answer>>);

impl Keys {
    fn with(records: &[(&str, Result<Vec<String>, KeyError>)]) -> Self {
        Keys(Arc::new(
            records
                .iter()
                .map(|(n, r)| {
                    let r = r
                        .clone()
                        .map(|v| v.into_iter().map(String::into_bytes).collect());
                    (n.to_string(), r)
                })
                .collect(),
        ))
    }
}

impl KeySource for Keys {
    async fn txt(&self, name: String) -> Result<Vec<Vec<u8>>, KeyError> {
        self.0
            .get(&name)
            .cloned()
            .unwrap_or(Err(KeyError::NotFound))
    }
}

/// A verifier whose resolver points at a closed port: every key must come
/// from the fake source.
fn auth() -> MessageAuthenticator {
    let mut cfg = crate::config::Config::defaults(Path::new("/nonexistent"));
    cfg.testing.dns_server = Some("127.0.0.1:9".parse().unwrap());
    MessageAuthenticator(crate::dns::resolver(&cfg).unwrap())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

struct Ed {
    pkcs8: Vec<u8>,
    record: String,
}

fn ed25519() -> Ed {
    let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&pkcs8).unwrap();
    let record = format!("v=DKIM1; k=ed25519; p={}", b64(&key.public_key()));
    Ed { pkcs8, record }
}

fn rsa_record() -> String {
    format!("v=DKIM1; k=rsa; p={}", RSA_PUB.trim())
}

/// `msg` with a DKIM-Signature on top, made by `signer`.
fn signed<K: SigningKey>(signer: DkimSigner<K, mail_auth::dkim::Done>, msg: &[u8]) -> Vec<u8> {
    let sig = signer.sign(msg).unwrap();
    let mut out = sig.to_header().into_bytes();
    out.extend_from_slice(msg);
    out
}

fn ed_signer(ed: &Ed, domain: &str) -> DkimSigner<Ed25519Key, mail_auth::dkim::Done> {
    DkimSigner::from_key(Ed25519Key::from_pkcs8_der(&ed.pkcs8).unwrap())
        .domain(domain)
        .selector("sel")
        .headers(["From", "To", "Subject"])
}

fn rsa_signer() -> DkimSigner<RsaKey<Sha256>, mail_auth::dkim::Done> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let der = PrivateKeyDer::from_pem_slice(RSA_PEM.as_bytes()).unwrap();
    DkimSigner::from_key(RsaKey::<Sha256>::from_key_der(der).unwrap())
        .domain("example.com")
        .selector("rsa")
        .headers(["From", "Subject"])
}

async fn check(keys: &Keys, msg: &[u8]) -> Verified {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(msg).unwrap();
    verify(&auth(), keys, Arc::new(f)).await
}

fn results(v: Verified) -> Vec<DkimResult> {
    v.unwrap().into_iter().map(|s| s.result).collect()
}

#[tokio::test]
async fn good_signatures_pass() {
    let ed = ed25519();
    let keys = Keys::with(&[
        ("sel._domainkey.example.com.", Ok(vec![ed.record.clone()])),
        ("rsa._domainkey.example.com.", Ok(vec![rsa_record()])),
    ]);
    let msg = signed(ed_signer(&ed, "example.com"), MSG);
    let got = check(&keys, &msg).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].result, DkimResult::Pass);
    assert_eq!(got[0].domain, "example.com");
    assert!(got[0].b.len() > 40, "the whole b=, for the header to cut");
    let header = String::from_utf8_lossy(&msg);
    assert!(
        header
            .replace(['\r', '\n', '\t', ' '], "")
            .contains(&format!("b={}", got[0].b))
    );

    for (ch, cb) in [
        (Canonicalization::Relaxed, Canonicalization::Relaxed),
        (Canonicalization::Simple, Canonicalization::Simple),
    ] {
        let s = rsa_signer()
            .header_canonicalization(ch)
            .body_canonicalization(cb);
        let msg = signed(s, MSG);
        assert_eq!(
            results(check(&keys, &msg).await),
            [DkimResult::Pass],
            "{ch:?}/{cb:?}"
        );
    }
}

#[tokio::test]
async fn tampering_fails() {
    let ed = ed25519();
    let keys = Keys::with(&[("sel._domainkey.example.com.", Ok(vec![ed.record.clone()]))]);
    let msg = signed(ed_signer(&ed, "example.com"), MSG);
    let body = String::from_utf8(msg.clone())
        .unwrap()
        .replace("see you", "pay me");
    assert_eq!(
        results(check(&keys, body.as_bytes()).await),
        [DkimResult::Fail("body hash mismatch".into())]
    );
    let subject = String::from_utf8(msg)
        .unwrap()
        .replace("Subject: hello", "Subject: urgent");
    assert_eq!(
        results(check(&keys, subject.as_bytes()).await),
        [DkimResult::Fail("signature did not verify".into())]
    );
}

#[tokio::test]
async fn no_signature_is_none() {
    assert_eq!(check(&Keys::default(), MSG).await, Ok(vec![]));
    assert_eq!(
        check(&Keys::default(), b"\r\nbody only\r\n").await,
        Ok(vec![])
    );
}

#[tokio::test]
async fn key_lookup_failures() {
    let ed = ed25519();
    let msg = signed(ed_signer(&ed, "example.com"), MSG);
    assert_eq!(
        results(check(&Keys::default(), &msg).await),
        [DkimResult::PermError("no key in the DNS".into())]
    );
    let keys = Keys::with(&[(
        "sel._domainkey.example.com.",
        Err(KeyError::Temporary("SERVFAIL".into())),
    )]);
    assert_eq!(
        results(check(&keys, &msg).await),
        [DkimResult::TempError("key lookup failed: SERVFAIL".into())]
    );
    let keys = Keys::with(&[(
        "sel._domainkey.example.com.",
        Ok(vec!["v=DKIM1; p=".into()]),
    )]);
    assert_eq!(
        results(check(&keys, &msg).await),
        [DkimResult::PermError("the key was revoked".into())]
    );
}

#[tokio::test]
async fn every_record_that_is_a_key_is_tried() {
    let ed = ed25519();
    let other = ed25519();
    let keys = Keys::with(&[(
        "sel._domainkey.example.com.",
        Ok(vec![
            "v=spf1 -all".into(),
            other.record,
            rsa_record(),
            ed.record.clone(),
        ]),
    )]);
    let msg = signed(ed_signer(&ed, "example.com"), MSG);
    assert_eq!(results(check(&keys, &msg).await), [DkimResult::Pass]);
    // Without the right one: the wrong Ed25519 key makes it a fail.
    let keys = Keys::with(&[(
        "sel._domainkey.example.com.",
        Ok(vec![ed25519().record, rsa_record()]),
    )]);
    assert_eq!(
        results(check(&keys, &msg).await),
        [DkimResult::Fail("signature did not verify".into())]
    );
    // Only an RSA key for an Ed25519 signature: it cannot be used.
    let keys = Keys::with(&[("sel._domainkey.example.com.", Ok(vec![rsa_record()]))]);
    assert_eq!(
        results(check(&keys, &msg).await),
        [DkimResult::PermError(
            "the key's type does not match a=".into()
        )]
    );
}

#[tokio::test]
async fn weak_algorithms_and_keys_are_refused() {
    let msg = signed(rsa_signer(), MSG);
    let small = format!("v=DKIM1; k=rsa; p={}", RSA512_PUB.trim());
    let keys = Keys::with(&[("rsa._domainkey.example.com.", Ok(vec![small]))]);
    assert_eq!(
        results(check(&keys, &msg).await),
        [DkimResult::PermError(
            "RSA key under 1024 bits (RFC 8301)".into()
        )]
    );
    let keys = Keys::with(&[("rsa._domainkey.example.com.", Ok(vec![rsa_record()]))]);
    let sha1 = String::from_utf8(msg)
        .unwrap()
        .replace("a=rsa-sha256", "a=rsa-sha1");
    assert!(sha1.contains("a=rsa-sha1"));
    assert_eq!(
        results(check(&keys, sha1.as_bytes()).await),
        [DkimResult::PermError(
            "rsa-sha1 is not accepted (RFC 8301)".into()
        )]
    );
}

#[tokio::test]
async fn at_most_five_signatures_in_message_order() {
    let ed = ed25519();
    let keys = Keys::with(&[("sel._domainkey.example.com.", Ok(vec![ed.record.clone()]))]);
    let mut msg = MSG.to_vec();
    for _ in 0..3 {
        msg = signed(ed_signer(&ed, "example.com"), &msg);
    }
    // A malformed one second from the top, another unrelated one below.
    let mut top = b"DKIM-Signature: v=1; d=bad.example; b=QUJD; garbage\r\n".to_vec();
    top.extend_from_slice(&msg);
    let mut msg = signed(ed_signer(&ed, "example.com"), &top);
    msg.splice(
        msg.len() - MSG.len()..msg.len() - MSG.len(),
        b"DKIM-Signature: v=1; a=ed25519-sha256; d=late.example; s=sel; h=from; bh=QUJD; b=QUJD\r\n"
            .iter()
            .copied(),
    );
    let got: Vec<DkimSignature> = check(&keys, &msg).await.unwrap();
    assert_eq!(got.len(), MAX_SIGNATURES);
    assert_eq!(got[0].result, DkimResult::Pass);
    assert!(
        matches!(&got[1].result, DkimResult::PermError(w) if w.starts_with("malformed signature")),
        "{:?}",
        got[1]
    );
    assert_eq!(
        (got[1].domain.as_str(), got[1].b.as_str()),
        ("bad.example", "QUJD")
    );
    // The signatures under the newer ones still verify: they do not sign
    // what was added above them.
    for g in &got[2..5] {
        assert_eq!(g.result, DkimResult::Pass);
    }
}

#[tokio::test]
async fn body_length_is_honoured() {
    let ed = ed25519();
    let keys = Keys::with(&[("sel._domainkey.example.com.", Ok(vec![ed.record.clone()]))]);
    let s = ed_signer(&ed, "example.com")
        .body_canonicalization(Canonicalization::Simple)
        .body_length(true);
    let msg = signed(s, MSG);
    let text = String::from_utf8(msg.clone()).unwrap();
    assert!(text.contains("l="), "{text}");
    let mut longer = msg.clone();
    longer.extend_from_slice(b"P.S. added by a list\r\n");
    assert_eq!(results(check(&keys, &longer).await), [DkimResult::Pass]);
    let shorter = &msg[..msg.len() - 8];
    assert_eq!(
        results(check(&keys, shorter).await),
        [DkimResult::PermError("l= is longer than the body".into())]
    );
}

#[tokio::test]
async fn identity_outside_the_domain_is_refused() {
    let ed = ed25519();
    let keys = Keys::with(&[("sel._domainkey.example.com.", Ok(vec![ed.record.clone()]))]);
    let s = ed_signer(&ed, "example.com").agent_user_identifier("ann@other.example");
    assert_eq!(
        results(check(&keys, &signed(s, MSG)).await),
        [DkimResult::PermError("i= is not within d=".into())]
    );
    let s = ed_signer(&ed, "example.com").agent_user_identifier("ann@mail.example.com");
    assert_eq!(
        results(check(&keys, &signed(s, MSG)).await),
        [DkimResult::Pass]
    );
}

#[tokio::test]
async fn a_huge_header_section_is_an_error() {
    let mut msg = Vec::new();
    while msg.len() <= MAX_HEADER_SECTION {
        msg.extend_from_slice(
            b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        );
    }
    msg.extend_from_slice(b"\r\nbody\r\n");
    assert!(check(&Keys::default(), &msg).await.is_err());
}

#[tokio::test]
async fn a_signature_listing_too_many_fields_is_refused_before_any_work() {
    // mail-auth matches each name of h= against every field: a signature
    // naming thousands of absent fields over thousands of fields would
    // cost seconds of CPU per key. It is refused unread.
    let ed = ed25519();
    let names: Vec<String> = (0..=MAX_SIGNED_FIELDS).map(|i| format!("X-F{i}")).collect();
    let mut all = vec!["From".to_string()];
    all.extend(names);
    let signer = DkimSigner::from_key(Ed25519Key::from_pkcs8_der(&ed.pkcs8).unwrap())
        .domain("example.com")
        .selector("sel")
        .headers(all);
    let msg = signed(signer, MSG);
    let keys = Keys::with(&[("sel._domainkey.example.com.", Ok(vec![ed.record.clone()]))]);
    assert_eq!(
        results(check(&keys, &msg).await),
        [DkimResult::PermError("h= lists too many fields".into())]
    );
}
