//! After DATA (REFERENCE §2.8 steps 3 to 5): DKIM verification with the
//! Authentication-Results header, and `hooks/post-data`. Both run in
//! deliverd, which has the network and may exec; queued sends it the
//! spooled message as a read-only descriptor and prepends what comes back.

use tambo_proto::deliver::{
    AuthResultsRequest, Hook, HookOutcome, HookVerdict, PostData as PostDataCall,
};
use tambo_proto::metrics::{self, names};

use tambo_common::authres;

use super::Session;
use crate::hooks::{HookError, Name};

/// What the checks after DATA decided.
pub(super) enum AfterData {
    /// Queue it, with these header fields (CRLF) on top; maybe none.
    Accept(Vec<u8>),
    /// Refuse it: 554 5.7.1 if permanent, else 451 4.7.1, with the hook's
    /// text.
    Reject { permanent: bool, text: String },
}

impl Session {
    /// Whether the message needs deliverd after DATA: mail that was not
    /// authenticated gets its signatures verified (and so an
    /// Authentication-Results header), and every message goes through
    /// the post-data hook when the site has one.
    pub(super) fn needs_post_data(&self) -> bool {
        let needed = self.auth.is_none() || self.queue.hooks.exists(Name::PostData);
        if !needed {
            metrics::inc_label(names::SMTP_IN_HOOK_RESULTS, "post-data:skip");
        }
        needed
    }

    /// The authserv-id of Authentication-Results: the name smtpd answered
    /// as (a certificate's name the client asked for by SNI), or ours.
    fn authserv_id(&self) -> String {
        if self.txn.server_name.is_empty() {
            self.queue.cfg.hostname.clone()
        } else {
            self.txn.server_name.clone()
        }
    }

    /// Authentication-Results written here, without deliverd: SPF, and
    /// `dkim=none` if the message has no signature (`dkim` false:
    /// verification could not run, so no DKIM result at all).
    pub(super) fn local_auth_results(&self, dkim: bool) -> Vec<u8> {
        let none: &[authres::DkimSignature] = &[];
        authres::header(
            &self.authserv_id(),
            self.txn.spf.as_ref(),
            dkim.then_some(none),
        )
        .unwrap_or_default()
        .into_bytes()
    }

    /// Runs the checks after DATA on the spooled body `id`.
    pub(super) async fn post_data(&self, id: &str, from: &str, rcpts: &[String]) -> AfterData {
        // deliverd counts what came of the hook, `skip` included.
        let run_hook = self.queue.hooks.exists(Name::PostData);
        // Unsigned mail without a hook needs nothing deliverd does: its
        // header is written here, and the common case costs no round trip.
        if !run_hook && self.auth.is_none() {
            let path = self.queue.spool.body_path(id);
            let signed = tokio::task::spawn_blocking(move || has_dkim_signature(&path))
                .await
                .unwrap_or(Ok(true));
            match signed {
                Ok(false) => {
                    metrics::inc_label(names::SMTP_IN_HOOK_RESULTS, "post-data:skip");
                    metrics::inc(names::SMTP_IN_DKIM_VERIFY_NOT_FOUND);
                    return AfterData::Accept(self.local_auth_results(true));
                }
                Ok(true) => {}
                Err(e) => tracing::warn!(%id, "cannot read the spooled message: {e}"),
            }
        }
        // Never for authenticated mail (REFERENCE §2.8): its headers are
        // ours to vouch for, and it was signed instead.
        let auth_results = self.auth.is_none().then(|| AuthResultsRequest {
            authserv_id: self.authserv_id(),
            spf: self.txn.spf.clone(),
        });
        let call = Hook::PostData(PostDataCall {
            queue_id: id.to_string(),
            env: self.hook_env(from, rcpts.to_vec()),
            run_hook,
            auth_results,
        });
        let body = self.queue.spool.body_path(id);
        let mut trace =
            run_hook.then(|| tambo_proto::trace::Trace::new("Hook.Post-DATA", id.to_string()));
        let outcome = self.queue.hooks.call(call, Some(body)).await;
        if let Some(t) = trace.as_mut() {
            match &outcome {
                Ok(HookOutcome::PostData {
                    verdict: HookVerdict::Accept,
                    ..
                }) => t.event("accepted"),
                Ok(HookOutcome::PostData {
                    verdict: HookVerdict::Reject { permanent, text },
                    ..
                }) => t.error(format!(
                    "refused {}: {}",
                    if *permanent { "permanently" } else { "for now" },
                    text
                )),
                Ok(_) => t.error("deliverd answered something else"),
                Err(e) => t.error(format!("could not run: {e}")),
            }
        }
        match outcome {
            Ok(HookOutcome::PostData {
                headers,
                auth_results,
                verdict,
            }) => match verdict {
                HookVerdict::Accept => {
                    // REFERENCE §2.8 step 4: the hook's fields on top.
                    // deliverd checked them; a compromised one must still
                    // not be able to break the message's structure.
                    let mut prefix = Vec::new();
                    for block in [headers, auth_results] {
                        if is_header_block(block.as_bytes()) {
                            prefix.extend_from_slice(block.as_bytes());
                        } else {
                            tracing::error!(%id, "deliverd sent header fields that are not a header block; dropped");
                        }
                    }
                    AfterData::Accept(prefix)
                }
                HookVerdict::Reject { permanent, text } => {
                    tracing::info!(%id, client = ?self.client, "the post-data hook refused the message ({}): {}", if permanent { "permanently" } else { "for now" }, text.escape_debug());
                    AfterData::Reject { permanent, text }
                }
            },
            Ok(_) => self.post_data_failed(id, run_hook, HookError::WrongAnswer("post-data")),
            Err(e) => self.post_data_failed(id, run_hook, e),
        }
    }

    /// deliverd could not run the checks. With a hook, that is a
    /// temporary refusal (never an accept the site's policy did not see);
    /// without one, only the verification is lost, which never refuses
    /// mail: it is queued without Authentication-Results.
    fn post_data_failed(&self, id: &str, run_hook: bool, e: HookError) -> AfterData {
        if run_hook {
            tracing::warn!(%id, "the post-data hook could not run: {e}");
            metrics::inc_label(names::SMTP_IN_HOOK_RESULTS, "post-data:fail");
            AfterData::Reject {
                permanent: false,
                text: String::new(),
            }
        } else {
            tracing::warn!(%id, "DKIM verification could not run: {e}; accepting the message without it");
            metrics::inc_label(names::SMTP_IN_HOOK_RESULTS, "post-data:skip");
            metrics::inc(names::SMTP_IN_DKIM_VERIFY_ERRORS);
            AfterData::Accept(self.local_auth_results(false))
        }
    }
}

/// Most of a message read to look for a `DKIM-Signature` field; a header
/// section longer than this is handed to deliverd as if it had one.
pub(super) const SCAN_LIMIT: usize = 64 * 1024;

/// Whether the header section of the spooled message at `path` may hold a
/// `DKIM-Signature` field (true when it cannot tell).
fn has_dkim_signature(path: &std::path::Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)?
        .take(SCAN_LIMIT as u64)
        .read_to_end(&mut head)?;
    Ok(header_has_signature(&head, head.len() == SCAN_LIMIT))
}

/// The scan of [`has_dkim_signature`] on the first bytes of a message
/// (`cut`: there may be more).
pub(super) fn header_has_signature(head: &[u8], cut: bool) -> bool {
    const NAME: &[u8] = b"dkim-signature:";
    let named =
        |line: &[u8]| line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME);
    let mut rest = head;
    // Whole lines only: a cut right after a line end is not the blank line
    // that ends the header section.
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..end];
        rest = &rest[end + 1..];
        if line == b"\r" || line.is_empty() {
            return false;
        }
        if named(line) {
            return true;
        }
    }
    // The last, unfinished line; and a header section that goes on past
    // what was read may have one further down.
    named(rest) || cut
}

/// Whether `b` is empty or whole header fields with CRLF line ends: each
/// line a `name:` (printable ASCII name) or a continuation of one, no bare
/// CR or LF, no empty line.
fn is_header_block(b: &[u8]) -> bool {
    if b.is_empty() {
        return true;
    }
    let Some(mut rest) = b.strip_suffix(b"\r\n") else {
        return false;
    };
    let mut first = true;
    loop {
        let (line, next) = match rest.windows(2).position(|w| w == b"\r\n") {
            Some(n) => (&rest[..n], Some(&rest[n + 2..])),
            None => (rest, None),
        };
        if line.is_empty() || line.contains(&b'\r') || line.contains(&b'\n') {
            return false;
        }
        let ok = match line[0] {
            b' ' | b'\t' => !first,
            _ => line
                .iter()
                .position(|&c| c == b':')
                .is_some_and(|n| n > 0 && line[..n].iter().all(|c| (33..=126).contains(c))),
        };
        if !ok {
            return false;
        }
        first = false;
        match next {
            Some(n) => rest = n,
            None => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{header_has_signature, is_header_block};

    #[test]
    fn header_blocks_from_deliverd_are_checked() {
        assert!(is_header_block(b""));
        assert!(is_header_block(b"X-A: 1\r\n"));
        assert!(is_header_block(b"X-A: 1\r\n\tmore\r\nX-B: 2\r\n"));
        for bad in [
            &b"X-A: 1"[..],
            b"X-A: 1\n",
            b"X-A: 1\r\n\r\n",
            b" X-A: 1\r\n",
            b"no colon\r\n",
            b"X-A: 1\rX-B: 2\r\n",
            b"X-A: 1\r\nX-B: 2\n\r\n",
            b": empty name\r\n",
        ] {
            assert!(!is_header_block(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn only_the_header_section_is_searched() {
        let head = b"Received: x\r\nDKIM-Signature: v=1\r\n\r\nbody\r\n";
        assert!(header_has_signature(head, false));
        let head = b"Received: x\r\ndkim-signature:v=1\r\n\r\n";
        assert!(header_has_signature(head, false));
        let body = b"Received: x\r\nSubject: y\r\n\r\nDKIM-Signature: in the body\r\n";
        assert!(!header_has_signature(body, false));
        assert!(!header_has_signature(
            b"Subject: y\r\n X-DKIM-Signature: no\r\n",
            false
        ));
        // Cut short inside the header section: cannot tell.
        assert!(header_has_signature(b"Subject: y\r\nX-Long: aaaa", true));
        assert!(!header_has_signature(b"Subject: y\r\n\r\n", true));
    }
}
