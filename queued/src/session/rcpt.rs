//! RCPT: the recipient policy (REFERENCE §2.7, §5.3), with the hooks
//! that extend it — alias-resolve and alias-exists for addresses the files
//! do not know, and `hooks/rcpt` for every recipient accepted.

use tambo_common::address;
use tambo_proto::deliver::{Hook, HookEnv, HookOutcome, HookVerdict};
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{RcptVerdict, SubmitReply};

use super::{MAX_RCPTS, Session};
use crate::hooks::{HookError, Hooks, Name};
use crate::policy::{Policy, RcptCheck};
use crate::queue::dovecot_knows;

impl Session {
    pub(super) async fn rcpt(&mut self, to: String) -> SubmitReply {
        if self.from.is_none() {
            return SubmitReply::BadSequence("RCPT before MAIL".into());
        }
        if self.rcpts.len() >= MAX_RCPTS {
            return SubmitReply::Rcpt(RcptVerdict::TooMany);
        }
        if !address::is_plausible(&to) || to.starts_with('-') {
            return SubmitReply::Rcpt(RcptVerdict::Invalid("not an address".into()));
        }
        let domains = self.queue.domains();
        let policy = Policy {
            cfg: &self.queue.cfg,
            domains: &domains,
        };
        let to = policy.qualify(&to);
        let check = policy.check_rcpt(&to, self.auth.as_ref(), self.trusted_network());
        let mut verdict = match check {
            RcptCheck::Done(v) => v,
            RcptCheck::Unknown {
                exact,
                clean,
                dovecot,
            } => match self.known_beyond_the_files(&exact, &clean, dovecot).await {
                Ok(true) => RcptVerdict::Accepted,
                Ok(false) => RcptVerdict::NoSuchUser,
                // smtpd logs the verdict; the details stay here.
                Err(e) => {
                    tracing::warn!(client = ?self.client, "cannot check whether {} exists: {e}", to.escape_debug());
                    RcptVerdict::TempError("the existence check failed".into())
                }
            },
        };
        if verdict == RcptVerdict::Accepted {
            verdict = self.rcpt_hook(&to).await;
        }
        if verdict == RcptVerdict::Accepted {
            self.rcpts.push(to);
        } else {
            tracing::info!(client = ?self.client, "rejected to=<{}>: {verdict:?}", to.escape_debug());
        }
        SubmitReply::Rcpt(verdict)
    }

    /// Whether the client is in `relay_networks`. The address is smtpd's
    /// word: with the list set, a compromised smtpd could claim one
    /// (docs/design-notes.md); with it empty (the default), relay needs a
    /// password queued checked.
    fn trusted_network(&self) -> bool {
        let nets = &self.queue.cfg.tambo.relay_networks;
        !nets.is_empty()
            && self
                .client
                .as_deref()
                .and_then(|c| c.parse::<std::net::SocketAddr>().ok())
                .is_some_and(|a| nets.iter().any(|n| n.contains(a.ip())))
    }

    /// REFERENCE §5.3 Exists, past the files: an alias-resolve entry for
    /// the exact then the clean form, alias-exists for the clean form,
    /// then Dovecot. Err if one of them could not answer.
    async fn known_beyond_the_files(
        &mut self,
        exact: &str,
        clean: &str,
        dovecot: Option<String>,
    ) -> Result<bool, String> {
        let hooks = self.queue.hooks.clone();
        for (i, addr) in [exact, clean].into_iter().enumerate() {
            if i == 1 && addr == exact {
                break;
            }
            let Some(targets) = hooks.alias_resolve(addr).await? else {
                break;
            };
            let found = !targets.is_empty();
            self.alias_answers.insert(addr.to_string(), targets);
            if found {
                return Ok(true);
            }
        }
        if alias_exists(&hooks, clean).await? {
            return Ok(true);
        }
        match dovecot {
            None => Ok(false),
            Some(id) => dovecot_knows(self.queue.dovecot.as_deref(), &id)
                .await
                .map_err(|e| format!("Dovecot: {e}")),
        }
    }

    /// `hooks/rcpt` on an accepted recipient (tambo's own; chasquid #53):
    /// greylisting and DNSBL checks plug in here.
    async fn rcpt_hook(&self, to: &str) -> RcptVerdict {
        let hooks = &self.queue.hooks;
        if !hooks.exists(Name::Rcpt) {
            metrics::inc_label(names::SMTP_IN_RCPT_HOOK_RESULTS, "skip");
            return RcptVerdict::Accepted;
        }
        let from = self.from.clone().unwrap_or_default();
        let env = self.hook_env(&from, vec![to.to_string()]);
        match hooks.call(Hook::Rcpt(env), None).await {
            Ok(HookOutcome::Rcpt(HookVerdict::Accept)) => RcptVerdict::Accepted,
            Ok(HookOutcome::Rcpt(HookVerdict::Reject { permanent, text })) => {
                RcptVerdict::HookRejected { permanent, text }
            }
            Ok(_) => hook_failed(HookError::WrongAnswer("rcpt")),
            Err(e) => hook_failed(e),
        }
    }

    /// What a hook learns of this transaction (REFERENCE §6).
    pub(super) fn hook_env(&self, from: &str, rcpt_to: Vec<String>) -> HookEnv {
        let from_local_domain = !from.is_empty()
            && address::normalize_domain(address::split(from).1)
                .is_ok_and(|d| self.queue.domains().is_local(&d));
        HookEnv {
            remote_addr: self.client.clone().unwrap_or_default(),
            ehlo: self.txn.ehlo.clone(),
            mail_from: from.to_string(),
            rcpt_to,
            auth_as: self
                .auth
                .as_ref()
                .map(|a| a.user().to_string())
                .unwrap_or_default(),
            on_tls: self.tls,
            from_local_domain,
            spf: self.txn.spf.as_ref().map(|s| s.result),
        }
    }
}

/// A hook that could not be asked: a temporary refusal, never an accept.
fn hook_failed(e: HookError) -> RcptVerdict {
    tracing::warn!("the rcpt hook failed: {e}");
    metrics::inc_label(names::SMTP_IN_RCPT_HOOK_RESULTS, "fail");
    RcptVerdict::HookRejected {
        permanent: false,
        text: String::new(),
    }
}

/// Whether `hooks/alias-exists` says `addr` exists (exit 0); false without
/// the hook. Err only if deliverd could not be asked.
async fn alias_exists(hooks: &Hooks, addr: &str) -> Result<bool, String> {
    if !hooks.exists(Name::AliasExists) {
        metrics::inc_label(names::ALIASES_HOOK_RESULTS, "exists:skip");
        return Ok(false);
    }
    let hook = Hook::AliasExists {
        address: addr.to_string(),
    };
    match hooks.call(hook, None).await {
        Ok(HookOutcome::Exists(yes)) => Ok(yes),
        Ok(_) => Err(HookError::WrongAnswer("alias-exists").to_string()),
        Err(e) => Err(e.to_string()),
    }
}
