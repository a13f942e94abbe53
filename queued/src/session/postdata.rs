//! After DATA (REFERENCE §2.8 steps 3 to 5): DKIM verification with the
//! Authentication-Results header, and `hooks/post-data`. Both run in
//! deliverd, which has the network and may exec; queued sends it the
//! spooled message as a read-only descriptor and prepends what comes back.

use tambo_proto::deliver::{
    AuthResultsRequest, Hook, HookOutcome, HookVerdict, PostData as PostDataCall,
};
use tambo_proto::metrics::{self, names};

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

    /// Runs the checks after DATA on the spooled body `id`.
    pub(super) async fn post_data(&self, id: &str, rcpts: &[String]) -> AfterData {
        // deliverd counts what came of the hook, `skip` included.
        let run_hook = self.queue.hooks.exists(Name::PostData);
        // Never for authenticated mail (REFERENCE §2.8): its headers are
        // ours to vouch for, and it was signed instead.
        let auth_results = self.auth.is_none().then(|| AuthResultsRequest {
            authserv_id: self.txn.server_name.clone(),
            spf: self.txn.spf.clone(),
        });
        let call = Hook::PostData(PostDataCall {
            queue_id: id.to_string(),
            env: self.hook_env(rcpts.to_vec()),
            run_hook,
            auth_results,
        });
        let body = self.queue.spool.body_path(id);
        match self.queue.hooks.call(call, Some(body)).await {
            Ok(HookOutcome::PostData {
                headers,
                auth_results,
                verdict,
            }) => match verdict {
                HookVerdict::Accept => {
                    // REFERENCE §2.8 step 4: the hook's fields on top.
                    let mut prefix = headers.into_bytes();
                    prefix.extend_from_slice(auth_results.as_bytes());
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
            metrics::inc(names::SMTP_IN_DKIM_VERIFY_ERRORS);
            AfterData::Accept(Vec::new())
        }
    }
}
