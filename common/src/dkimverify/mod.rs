//! DKIM verification of unauthenticated incoming mail (REFERENCE §4.9),
//! for its Authentication-Results header. It never rejects anything.
//! (Feature `dkimverify`: deliverd, and `tambo dkim-verify`.)
//!
//! deliverd runs it rather than smtpd (DESIGN's table): smtpd streams the
//! body to queued and never holds the message, while deliverd already
//! gets it as a descriptor for the post-data hook, and already resolves.
//!
//! mail-auth does the parsing and the cryptography; this module decides
//! what it is given, to keep work and memory bounded whatever the
//! message holds:
//! - only the header section is read into memory (capped); the body is
//!   hashed in one streamed pass ([`body`]), for at most
//!   [`MAX_SIGNATURES`] signatures, the first in the message;
//! - each signature passes the key-free checks first ([`signature`]):
//!   rsa-sha1, `q=`, `i=`, `l=` longer than the body...;
//! - keys are fetched concurrently, each lookup bounded ([`keys`]), and
//!   every record that is a usable key is tried, up to a limit.
//!
//! - [`body`]: reading the header section; streaming the body hashes.
//! - [`keys`]: the key lookup and which records are usable keys.
//! - [`signature`]: one signature's checks and verification.

mod body;
mod keys;
mod signature;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::headers::Header;
use mail_auth::dkim::Signature;
use mail_auth::{AuthenticatedMessage, MessageAuthenticator};
use tokio::task::JoinSet;

use crate::authres::{DkimResult, DkimSignature};
use tambo_proto::metrics::{self, names};

pub use keys::{KeyError, KeySource};

/// Most signatures evaluated (REFERENCE §4.9), the first ones in the
/// message; more are ignored, as in chasquid.
pub const MAX_SIGNATURES: usize = 5;
/// Longest header section read. Over any real one (Postfix's
/// `header_size_limit` is 100 KiB), and small enough that every hook slot
/// verifying at once stays within a few MiB, and that matching `h=`
/// against the fields (mail-auth scans every field for each name, work
/// that grows with both) stays in milliseconds.
pub const MAX_HEADER_SECTION: usize = 256 * 1024;
/// Most field names a signature's `h=` may list: real signers list a few
/// dozen (REFERENCE §4.9's own list, over-signed, is 26). More is refused
/// as a permerror before any work is done for it.
pub const MAX_SIGNED_FIELDS: usize = 100;
/// Longest wait for one key lookup; lookups run concurrently, so this
/// bounds them all together.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// One result per signature evaluated (none: the message has none), or
/// why the message could not be checked at all (unreadable, or a header
/// section over [`MAX_HEADER_SECTION`]).
pub type Verified = Result<Vec<DkimSignature>, String>;

/// Counts a verification as chasquid does: per message, `dkimVerifyFound`
/// if it has any signature, else `dkimVerifyNotFound`; `dkimVerifyValid`
/// if any verified; `dkimVerifyErrors` if it could not be checked.
pub fn count(v: &Verified) {
    match v {
        Ok(sigs) => {
            metrics::inc(if sigs.is_empty() {
                names::SMTP_IN_DKIM_VERIFY_NOT_FOUND
            } else {
                names::SMTP_IN_DKIM_VERIFY_FOUND
            });
            if sigs.iter().any(|s| s.result == DkimResult::Pass) {
                metrics::inc(names::SMTP_IN_DKIM_VERIFY_VALID);
            }
        }
        Err(_) => metrics::inc(names::SMTP_IN_DKIM_VERIFY_ERRORS),
    }
}

/// A signature found in the message.
enum Found<'x> {
    Parsed(&'x Header<'x, Signature>),
    /// It does not parse; mail-auth's reason.
    Malformed(String),
}

/// Verifies the DKIM signatures of the message in `file`.
pub async fn verify<S: KeySource>(
    auth: &MessageAuthenticator,
    keys: &S,
    file: Arc<File>,
) -> Verified {
    let f = file.clone();
    let head = tokio::task::spawn_blocking(move || body::header_section(&f, MAX_HEADER_SECTION))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read the message: {e}"))?;
    // Not strict: a signature with l= is evaluated (REFERENCE §4.9), not
    // refused.
    let Some(parsed) = AuthenticatedMessage::parse_with_opts(&head, None, false) else {
        return Ok(Vec::new());
    };
    let found = first_signatures(&parsed, &head);
    let mut tags = Vec::with_capacity(found.len());
    let mut results: Vec<Option<DkimResult>> = Vec::with_capacity(found.len());
    for (value, f) in &found {
        let t = signature::tags(value);
        results.push(match f {
            Found::Malformed(why) => {
                Some(DkimResult::PermError(format!("malformed signature: {why}")))
            }
            Found::Parsed(h) => signature::precheck(&h.header, &t).err(),
        });
        tags.push(t);
    }
    let parsed_sigs: Vec<Option<&Header<'_, Signature>>> = found
        .iter()
        .map(|(_, f)| match f {
            Found::Parsed(h) => Some(*h),
            Found::Malformed(_) => None,
        })
        .collect();

    check_body_hashes(
        &file,
        u64::from(parsed.body_offset),
        &parsed_sigs,
        &mut results,
    )
    .await?;
    let records = fetch_keys(keys, &parsed_sigs, &mut results).await;
    for (i, recs) in records.into_iter().enumerate() {
        let (Some(recs), Some(h), None) = (recs, parsed_sigs[i], &results[i]) else {
            continue;
        };
        let (usable, refused) = keys::usable(&recs);
        if usable.is_empty() {
            let why = refused.unwrap_or("no valid key in the DNS record");
            results[i] = Some(DkimResult::PermError(why.into()));
            continue;
        }
        let one = signature::alone(&parsed, h);
        let mut attempts = Vec::with_capacity(usable.len());
        for key in usable {
            let a = signature::with_key(auth, &one, key).await;
            let pass = a == signature::Attempt::Pass;
            attempts.push(a);
            if pass {
                break;
            }
        }
        results[i] = Some(signature::conclude(&attempts));
    }
    Ok(results
        .into_iter()
        .zip(tags)
        .map(|(r, t)| DkimSignature {
            result: r.unwrap_or_else(|| DkimResult::PermError("not evaluated".into())),
            domain: t.d,
            b: t.b,
        })
        .collect())
}

/// The first [`MAX_SIGNATURES`] `DKIM-Signature` fields in message order,
/// each with its raw value. mail-auth keeps those that parse and those
/// that do not in two lists; their place in `head` gives the order back.
fn first_signatures<'x>(
    parsed: &'x AuthenticatedMessage<'x>,
    head: &[u8],
) -> Vec<(&'x [u8], Found<'x>)> {
    let offset = |name: &[u8]| (name.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
    let mut all: Vec<(usize, &'x [u8], Found<'x>)> = parsed
        .dkim_headers
        .iter()
        .map(|h| (offset(h.name), h.value, Found::Parsed(h)))
        .chain(
            parsed
                .errors
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(b"DKIM-Signature"))
                .map(|h| {
                    (
                        offset(h.name),
                        h.value,
                        Found::Malformed(h.header.to_string()),
                    )
                }),
        )
        .collect();
    all.sort_by_key(|(at, _, _)| *at);
    all.into_iter()
        .take(MAX_SIGNATURES)
        .map(|(_, v, f)| (v, f))
        .collect()
}

/// Computes, in one pass over the body, the body hash of every signature
/// still undecided, and decides those whose hash differs (fail) or whose
/// `l=` is longer than the body (permerror).
async fn check_body_hashes(
    file: &Arc<File>,
    body_offset: u64,
    sigs: &[Option<&Header<'_, Signature>>],
    results: &mut [Option<DkimResult>],
) -> Result<(), String> {
    let mut specs: Vec<body::HashSpec> = Vec::new();
    for (h, r) in sigs.iter().zip(results.iter()) {
        if let (Some(h), None) = (h, r) {
            let spec = (h.header.cb, h.header.l);
            if !specs.contains(&spec) {
                specs.push(spec);
            }
        }
    }
    if specs.is_empty() {
        return Ok(());
    }
    let (f, s) = (file.clone(), specs.clone());
    let hashes = tokio::task::spawn_blocking(move || body::hashes(&f, body_offset, &s))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read the message: {e}"))?;
    for (h, r) in sigs.iter().zip(results.iter_mut()) {
        let (Some(h), None) = (h, &r) else { continue };
        let Some(at) = specs.iter().position(|s| *s == (h.header.cb, h.header.l)) else {
            continue;
        };
        let got = &hashes[at];
        *r = if h.header.l > 0 && got.canonical_len < h.header.l {
            Some(DkimResult::PermError("l= is longer than the body".into()))
        } else if got.hash != h.header.bh {
            Some(DkimResult::Fail("body hash mismatch".into()))
        } else {
            None
        };
    }
    Ok(())
}

/// Looks up, concurrently, the keys of every signature still undecided;
/// decides those whose lookup failed. The records of the others, by
/// index.
async fn fetch_keys<S: KeySource>(
    keys: &S,
    sigs: &[Option<&Header<'_, Signature>>],
    results: &mut [Option<DkimResult>],
) -> Vec<Option<Vec<Vec<u8>>>> {
    let mut lookups = JoinSet::new();
    for (i, (h, r)) in sigs.iter().zip(results.iter_mut()).enumerate() {
        let (Some(h), None) = (h, &r) else { continue };
        let Some(name) = keys::key_name(&h.header.s, &h.header.d) else {
            *r = Some(bad_name());
            continue;
        };
        let keys = keys.clone();
        lookups.spawn(async move {
            let got = tokio::time::timeout(LOOKUP_TIMEOUT, keys.txt(name)).await;
            (i, got)
        });
    }
    let mut records = vec![None; sigs.len()];
    while let Some(done) = lookups.join_next().await {
        let Ok((i, got)) = done else { continue };
        match got {
            Ok(Ok(recs)) => records[i] = Some(recs),
            Ok(Err(KeyError::NotFound)) => {
                results[i] = Some(DkimResult::PermError("no key in the DNS".into()))
            }
            Ok(Err(KeyError::BadName)) => results[i] = Some(bad_name()),
            Ok(Err(KeyError::Temporary(e))) => {
                results[i] = Some(DkimResult::TempError(format!("key lookup failed: {e}")))
            }
            Err(_) => results[i] = Some(DkimResult::TempError("key lookup timed out".into())),
        }
    }
    records
}

fn bad_name() -> DkimResult {
    DkimResult::PermError("s= and d= do not make a domain name".into())
}
