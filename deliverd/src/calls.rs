//! What each hook call from queued does, and what it counts.
//!
//! A post-data call verifies the message's DKIM signatures and writes the
//! Authentication-Results header when queued asks for it (unauthenticated
//! mail), then runs `hooks/post-data` on the message with that header on
//! top. The outcome holds both; queued prepends them (hook output first,
//! REFERENCE §2.8 step 4), or refuses the message with the verdict.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use mail_auth::MessageAuthenticator;

use tambo_common::authres;
use tambo_proto::deliver::{
    FromDeliverd, Hook, HookEnv, HookOutcome, HookVerdict, MAX_HOOK_RESULT_FRAME, PostData,
};
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::MAX_HOOK_TEXT;

use crate::dkim;
use crate::hooks::{self, Hooks, PostDataRun};

/// What every call may need, made once.
pub struct Ctx {
    pub hooks: Hooks,
    /// The one DKIM verifier (and its resolver) of the process.
    pub auth: Arc<MessageAuthenticator>,
}

/// A call as it may arrive: post-data with the message, the others
/// without a descriptor.
pub enum Call {
    PostData(Box<PostData>, File),
    Resolve(String),
    Exists(String),
    Rcpt(HookEnv),
}

impl Call {
    /// Pairs a hook with the descriptor that came with it; `Err` names the
    /// protocol error.
    pub fn new(hook: Hook, fd: Option<OwnedFd>) -> Result<Call, &'static str> {
        match (hook, fd) {
            (Hook::PostData(pd), Some(fd)) => Ok(Call::PostData(Box::new(pd), File::from(fd))),
            (Hook::PostData(_), None) => Err("a post-data call without its message descriptor"),
            (_, Some(_)) => Err("a descriptor with a hook call that takes none"),
            (Hook::AliasResolve { address }, None) => Ok(Call::Resolve(address)),
            (Hook::AliasExists { address }, None) => Ok(Call::Exists(address)),
            (Hook::Rcpt(env), None) => Ok(Call::Rcpt(env)),
        }
    }

    /// What to answer if the call cannot finish (its task panicked): a
    /// temporary failure of its kind, never an accept.
    pub fn failure(&self) -> HookOutcome {
        let reject = HookVerdict::Reject {
            permanent: false,
            text: String::new(),
        };
        match self {
            Call::PostData(..) => HookOutcome::PostData {
                headers: String::new(),
                auth_results: String::new(),
                verdict: reject,
            },
            Call::Resolve(_) => HookOutcome::Resolve(Err("internal error in deliverd".into())),
            Call::Exists(_) => HookOutcome::Exists(false),
            Call::Rcpt(_) => HookOutcome::Rcpt(reject),
        }
    }
}

/// Runs one call to its outcome, counting it.
pub async fn run(ctx: &Ctx, call: Call) -> HookOutcome {
    let outcome = match call {
        Call::PostData(pd, file) => post_data(ctx, &pd, file).await,
        Call::Resolve(address) => {
            let mut r = ctx.hooks.alias_resolve(&address).await;
            // Parsed here too (queued parses it again to use it), so
            // `resolve:parse_err` and `resolve:success` stay exclusive,
            // as in chasquid.
            if let Ok(out) = &r.result {
                let domain = tambo_common::address::split(&address).1;
                if let Err(e) = tambo_common::aliases::parse_rhs(out.trim(), domain) {
                    r.label = "resolve:parse_err";
                    r.result = Err(format!("its output does not parse: {e}"));
                }
            }
            metrics::inc_label(names::ALIASES_HOOK_RESULTS, r.label);
            if let Err(why) = &r.result {
                tracing::info!(address = %address.escape_debug(), "alias-resolve: {why}");
            }
            HookOutcome::Resolve(r.result)
        }
        Call::Exists(address) => {
            let r = ctx.hooks.alias_exists(&address).await;
            metrics::inc_label(names::ALIASES_HOOK_RESULTS, r.label);
            HookOutcome::Exists(r.exists)
        }
        Call::Rcpt(env) => {
            let r = ctx.hooks.rcpt(&env).await;
            metrics::inc_label(names::SMTP_IN_RCPT_HOOK_RESULTS, r.label);
            if let HookVerdict::Reject { permanent, text } = &r.verdict {
                tracing::info!(
                    to = %env.rcpt_to.join(" ").escape_debug(),
                    "hooks/rcpt refused ({}): {:?}",
                    if *permanent { "permanent" } else { "temporary" },
                    text
                );
            }
            HookOutcome::Rcpt(r.verdict)
        }
    };
    bounded(outcome)
}

async fn post_data(ctx: &Ctx, pd: &PostData, file: File) -> HookOutcome {
    let file = Arc::new(file);
    let id = &pd.queue_id;
    let auth_results = match &pd.auth_results {
        None => String::new(),
        Some(req) => {
            let verified = verify_dkim(ctx.auth.clone(), file.clone(), id).await;
            dkim::count(&verified);
            let sigs = match &verified {
                Ok(sigs) => {
                    let results: Vec<&str> = sigs.iter().map(|s| s.result.name()).collect();
                    tracing::info!(%id, "DKIM: [{}]", results.join(", "));
                    Some(sigs.as_slice())
                }
                Err(e) => {
                    tracing::info!(%id, "DKIM: not verified: {e}");
                    None
                }
            };
            authres::header(&req.authserv_id, req.spf.as_ref(), sigs).unwrap_or_default()
        }
    };
    let run = if pd.run_hook {
        let top = hooks::to_lf(auth_results.as_bytes());
        ctx.hooks.post_data(&pd.env, &top, file).await
    } else {
        PostDataRun::Skipped
    };
    metrics::inc_label(names::SMTP_IN_HOOK_RESULTS, run.label());
    if let PostDataRun::Rejected { permanent, text } = &run {
        tracing::info!(
            %id,
            "hooks/post-data refused the message ({}): {text:?}",
            if *permanent { "permanent" } else { "temporary" }
        );
    }
    let (headers, verdict) = run.into_parts();
    HookOutcome::PostData {
        headers,
        auth_results,
        verdict,
    }
}

/// [`dkim::verify`] in a task of its own: should mail-auth panic on some
/// message, that message goes on without its DKIM results rather than
/// without an answer. The set aborts the task if the call is abandoned.
async fn verify_dkim(auth: Arc<MessageAuthenticator>, file: Arc<File>, id: &str) -> dkim::Verified {
    let mut trace = tambo_proto::trace::Trace::new("DKIM.Verify", id.to_string());
    let mut task = tokio::task::JoinSet::new();
    task.spawn(async move { dkim::verify(&auth, &auth, file).await });
    let verified = match task.join_next().await {
        Some(Ok(v)) => v,
        Some(Err(e)) => Err(format!("verification failed: {e}")),
        None => Err("verification did not run".into()),
    };
    match &verified {
        Ok(sigs) if sigs.is_empty() => trace.event("no signature"),
        Ok(sigs) => {
            for s in sigs {
                trace.event(format!("d={}: {}", s.domain, s.result.name()));
            }
        }
        Err(e) => trace.error(e.clone()),
    }
    verified
}

/// The outcome cut so its frame fits [`MAX_HOOK_RESULT_FRAME`], whatever
/// the hook printed: texts to [`MAX_HOOK_TEXT`]; then, should the frame
/// still be too big (it cannot be, by the output and header caps, but
/// queued would drop the connection over it), the hook's headers and the
/// Authentication-Results header are left out, in that order.
pub fn bounded(outcome: HookOutcome) -> HookOutcome {
    let cut = |v: HookVerdict| match v {
        HookVerdict::Reject { permanent, text } => HookVerdict::Reject {
            permanent,
            text: hooks::one_line(&text, MAX_HOOK_TEXT),
        },
        v => v,
    };
    let mut outcome = match outcome {
        HookOutcome::PostData {
            headers,
            auth_results,
            verdict,
        } => HookOutcome::PostData {
            headers,
            auth_results,
            verdict: cut(verdict),
        },
        HookOutcome::Rcpt(v) => HookOutcome::Rcpt(cut(v)),
        HookOutcome::Resolve(Err(why)) => {
            HookOutcome::Resolve(Err(hooks::one_line(&why, MAX_HOOK_TEXT)))
        }
        o => o,
    };
    for _ in 0..3 {
        if fits(&outcome) {
            break;
        }
        outcome = match outcome {
            HookOutcome::PostData {
                headers,
                auth_results,
                verdict,
            } if !headers.is_empty() => {
                tracing::warn!("hook output too long for its result frame; left out");
                HookOutcome::PostData {
                    headers: String::new(),
                    auth_results,
                    verdict,
                }
            }
            HookOutcome::PostData { verdict, .. } => {
                tracing::warn!("Authentication-Results too long for its result frame; left out");
                HookOutcome::PostData {
                    headers: String::new(),
                    auth_results: String::new(),
                    verdict,
                }
            }
            HookOutcome::Resolve(Ok(_)) => {
                HookOutcome::Resolve(Err("hooks/alias-resolve printed too much".into()))
            }
            o => o,
        };
    }
    outcome
}

fn fits(outcome: &HookOutcome) -> bool {
    let msg = FromDeliverd::HookDone {
        call: u64::MAX,
        outcome: outcome.clone(),
    };
    tambo_proto::frame::encode(&msg)
        .is_ok_and(|f| f.len().saturating_sub(4) <= MAX_HOOK_RESULT_FRAME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tambo_proto::deliver::MAX_HOOK_OUTPUT;

    #[test]
    fn the_worst_outcomes_fit_their_frame() {
        // The output that grows most in CRLF form: one header, then the
        // shortest continuation lines (" x": white space alone is not
        // valid), each growing by a CR.
        let mut out = String::from("a:\n");
        while out.len() + 3 <= MAX_HOOK_OUTPUT {
            out.push_str(" x\n");
        }
        let headers = out.replace('\n', "\r\n");
        assert!(headers.len() > MAX_HOOK_OUTPUT * 4 / 3 - 4);
        let long = "é".repeat(10_000);
        let sigs: Vec<authres::DkimSignature> = (0..dkim::MAX_SIGNATURES)
            .map(|_| authres::DkimSignature {
                result: authres::DkimResult::PermError(long.clone()),
                domain: long.clone(),
                b: long.clone(),
            })
            .collect();
        let spf = tambo_proto::submit::SpfReport {
            result: tambo_proto::submit::SpfResult::Fail,
            domain: long.clone(),
            reason: long.clone(),
        };
        let ar = authres::header(&long, Some(&spf), Some(&sigs)).unwrap();
        let outcome = HookOutcome::PostData {
            headers: headers.clone(),
            auth_results: ar.clone(),
            verdict: HookVerdict::Reject {
                permanent: true,
                text: long.clone(),
            },
        };
        assert!(fits(&bounded(outcome.clone())));
        let HookOutcome::PostData {
            headers: h,
            auth_results: a,
            verdict: HookVerdict::Reject { text, .. },
        } = bounded(outcome)
        else {
            panic!()
        };
        assert_eq!((h, a), (headers, ar), "nothing needed leaving out");
        assert!(text.len() <= MAX_HOOK_TEXT);
    }

    #[test]
    fn an_oversized_outcome_is_cut_down() {
        let huge = "x".repeat(MAX_HOOK_RESULT_FRAME);
        let o = bounded(HookOutcome::PostData {
            headers: huge.clone(),
            auth_results: "Authentication-Results: x;\r\n\tdkim=none\r\n".into(),
            verdict: HookVerdict::Accept,
        });
        assert!(fits(&o));
        assert!(
            matches!(&o, HookOutcome::PostData { headers, auth_results, .. }
            if headers.is_empty() && !auth_results.is_empty())
        );
        let o = bounded(HookOutcome::Resolve(Ok(huge)));
        assert!(matches!(o, HookOutcome::Resolve(Err(_))));
    }

    #[test]
    fn descriptors_go_with_post_data_only() {
        let fd = || Some(OwnedFd::from(tempfile::tempfile().unwrap()));
        let env = HookEnv {
            remote_addr: String::new(),
            ehlo: String::new(),
            mail_from: String::new(),
            rcpt_to: vec![],
            auth_as: String::new(),
            on_tls: false,
            from_local_domain: false,
            spf: None,
        };
        let pd = Hook::PostData(PostData {
            queue_id: "q".into(),
            env: env.clone(),
            run_hook: true,
            auth_results: None,
        });
        assert!(matches!(
            Call::new(pd.clone(), fd()),
            Ok(Call::PostData(..))
        ));
        assert!(Call::new(pd, None).is_err());
        let resolve = Hook::AliasResolve {
            address: "a@b".into(),
        };
        assert!(matches!(
            Call::new(resolve.clone(), None),
            Ok(Call::Resolve(_))
        ));
        assert!(Call::new(resolve, fd()).is_err());
        assert!(Call::new(Hook::Rcpt(env), fd()).is_err());
    }
}
