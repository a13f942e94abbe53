//! MAIL (with its SPF check), RCPT and RSET, and the link to queued they
//! need.

use tambo_common::address;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{Mode, RcptVerdict, SpfResult, SubmitReply, SubmitRequest};

use super::{MAX_RCPTS, Next, Session};
use crate::command::{self, PathError};
use crate::queue::QueueLink;
use crate::spf::{self, Checked};

impl Session {
    pub(super) async fn mail(&mut self, arg: &[u8]) -> Next {
        let path = match command::parse_path(arg, "FROM:") {
            Ok(p) => p,
            Err(e) => {
                match e {
                    PathError::NoKeyword => {
                        self.reply(500, "5.5.2", "Syntax error: expected MAIL FROM:<address>")
                    }
                    PathError::Empty => {
                        self.reply(500, "5.5.4", "Malformed command: missing sender")
                    }
                    PathError::TooLong => self.reply(501, "5.1.7", "Sender address too long"),
                    PathError::Malformed(why) => {
                        let t = format!("Malformed sender address: {why}");
                        self.reply(501, "5.1.7", &t)
                    }
                    PathError::NoDomain | PathError::BadDomain => {
                        self.reply(501, "5.1.8", "Sender address needs a valid domain")
                    }
                }
                return Next::Continue;
            }
        };
        if !path.address.is_empty() && !path.address.contains('@') {
            self.reply(501, "5.1.8", "Sender address needs a valid domain");
            return Next::Continue;
        }
        if path.size.is_some_and(|s| s > self.cfg.max_data_size) {
            self.reply(552, "5.3.4", "Message too big");
            return Next::Continue;
        }
        // Submission needs AUTH first; queued decides it again.
        if self.cfg.mode != Mode::Smtp && self.auth.is_none() {
            self.reply(550, "5.7.9", "Authentication required");
            return Next::Continue;
        }
        // A second MAIL starts over (no 503).
        self.mail_from = None;
        self.accepted.clear();
        self.rcpts = 0;
        self.spf = None;
        // REFERENCE §2.6: not for `<>`, nor for authenticated sessions
        // (they may send as anyone, by design), nor for the clients of
        // `relay_networks` (which relay as if authenticated).
        let trusted = self
            .cfg
            .relay_networks
            .iter()
            .any(|n| n.contains(self.peer.ip()));
        let spf = if path.address.is_empty() || self.auth.is_some() || trusted {
            None
        } else {
            self.check_spf(&path.address).await
        };
        if let Some(c) = spf.as_ref().filter(|c| c.report.result == SpfResult::Fail) {
            tracing::info!(
                peer = %self.peer,
                "rejected from={:?}: failed SPF: {}",
                path.address,
                c.report.reason
            );
            // queued may still hold the envelope of an earlier MAIL.
            if !self.reset_envelope().await {
                return self.queue_lost();
            }
            let text = spf::fail_text(c);
            self.reply(550, "5.7.23", &text);
            return Next::Continue;
        }
        if !self.open_link().await {
            return self.queue_lost();
        }
        let Some(queue) = self.queue.as_mut() else {
            return self.queue_lost();
        };
        let req = SubmitRequest::Mail {
            from: path.address.clone(),
            ehlo: self.ehlo.clone().unwrap_or_default(),
            server_name: self.hostname.clone(),
            spf: spf.as_ref().map(|c| c.report.clone()),
        };
        // Where queued's Ok is certain, the 250 goes out without waiting
        // for it (the link reads it, and breaks on anything else, before
        // the next reply): the usual transaction of inbound mail waits on
        // queued twice, not three times.
        let foreseen = address::mail_answer_is_certain(
            self.cfg.mode,
            self.auth.is_some(),
            &path.address,
            spf.as_ref().map(|c| &c.report),
        );
        if foreseen {
            if let Err(e) = queue.send_foreseen(&req).await {
                tracing::error!(peer = %self.peer, "queued link failed at MAIL: {e}");
                return self.queue_lost();
            }
            self.mail_from = Some(path.address);
            self.spf = spf.map(|c| c.report);
            self.reply(250, "2.1.5", "Ok");
            return Next::Continue;
        }
        match queue.call(&req).await {
            Ok(SubmitReply::Ok) => {
                self.mail_from = Some(path.address);
                self.spf = spf.map(|c| c.report);
                self.reply(250, "2.1.5", "Ok");
            }
            Ok(SubmitReply::SecurityLevelTooLow) => {
                // The sender's domain came over TLS before (queued's
                // domaininfo, REFERENCE §2.6).
                self.reply(550, "5.7.3", "Security level check failed");
            }
            Ok(SubmitReply::BadSequence(why)) => {
                tracing::info!(peer = %self.peer, "queued refused the sender: {why}");
                self.reply(501, "5.1.7", "Malformed sender address");
            }
            Ok(SubmitReply::AuthRequired) => {
                self.reply(550, "5.7.9", "Authentication required");
            }
            Ok(SubmitReply::SenderNotAllowed) => {
                self.reply(
                    550,
                    "5.7.1",
                    "Sender address not owned by the authenticated user",
                );
            }
            Ok(other) => {
                tracing::warn!(peer = %self.peer, "queued answered MAIL with {other:?}");
                self.reply(451, "4.3.0", "Temporary error, try again later");
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, "queued link failed at MAIL: {e}");
                return self.queue_lost();
            }
        }
        Next::Continue
    }

    pub(super) async fn rcpt(&mut self, arg: &[u8]) -> Next {
        if self.mail_from.is_none() {
            self.reply(503, "5.5.1", "Sender not given yet");
            return Next::Continue;
        }
        let path = match command::parse_path(arg, "TO:") {
            Ok(p) if p.address.is_empty() => {
                self.reply(501, "5.1.3", "Malformed recipient address");
                return Next::Continue;
            }
            Ok(p) => p,
            Err(e) => {
                match e {
                    PathError::NoKeyword => {
                        self.reply(500, "5.5.2", "Syntax error: expected RCPT TO:<address>")
                    }
                    PathError::Empty => {
                        self.reply(500, "5.5.4", "Malformed command: missing recipient")
                    }
                    PathError::TooLong => self.reply(501, "5.1.3", "Recipient address too long"),
                    PathError::Malformed(_) | PathError::NoDomain => {
                        self.reply(501, "5.1.3", "Malformed recipient address")
                    }
                    PathError::BadDomain => self.reply(501, "5.1.2", "Malformed recipient domain"),
                }
                return Next::Continue;
            }
        };
        if self.rcpts >= MAX_RCPTS {
            self.reply(452, "4.5.3", "Too many recipients");
            return Next::Continue;
        }
        // MAIL succeeded, so the link is open.
        let Some(queue) = self.queue.as_mut() else {
            return self.queue_lost();
        };
        let verdict = match queue
            .call(&SubmitRequest::Rcpt {
                to: path.address.clone(),
            })
            .await
        {
            Ok(SubmitReply::Rcpt(v)) => v,
            Ok(other) => {
                tracing::warn!(peer = %self.peer, "queued answered RCPT with {other:?}");
                RcptVerdict::TempError("unexpected answer from the queue".into())
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, "queued link failed at RCPT: {e}");
                return self.queue_lost();
            }
        };
        match verdict {
            RcptVerdict::Accepted => {
                self.rcpts += 1;
                self.accepted_rcpt();
                self.reply(250, "2.1.5", "Ok")
            }
            RcptVerdict::NoSuchUser => self.reply(
                550,
                "5.1.1",
                "Destination address is unknown (user does not exist)",
            ),
            RcptVerdict::RelayDenied => self.reply(503, "5.7.1", "Relaying not allowed"),
            RcptVerdict::Invalid(why) => {
                tracing::debug!(peer = %self.peer, "invalid recipient: {why}");
                self.reply(550, "5.1.3", "Destination address is invalid")
            }
            RcptVerdict::TempError(why) => {
                tracing::warn!(peer = %self.peer, "error checking recipient: {why}");
                self.reply(451, "4.4.3", "Temporary error checking address")
            }
            RcptVerdict::TooMany => self.reply(452, "4.5.3", "Too many recipients"),
            RcptVerdict::HookRejected { permanent, text } => {
                let (code, enh) = if permanent {
                    (550, "5.7.1")
                } else {
                    (451, "4.7.1")
                };
                self.hook_reply(code, enh, &text)
            }
        }
        Next::Continue
    }

    /// Checks the sender's SPF from the client's address and counts the
    /// result. None when this smtpd has no checker.
    async fn check_spf(&self, sender: &str) -> Option<Checked> {
        let checker = self.cfg.spf.as_ref()?;
        let mut trace =
            tambo_proto::trace::Trace::new("SPF", format!("{} from {}", sender, self.peer.ip()));
        let c = checker.check(self.peer.ip(), sender, &self.hostname).await;
        let what = format!("{}: {}", c.report.result.name(), c.report.reason);
        match c.report.result {
            SpfResult::TempError | SpfResult::PermError => trace.error(what),
            _ => trace.event(what),
        }
        metrics::inc_label(names::SMTP_IN_SPF_RESULT_COUNT, c.report.result.name());
        tracing::debug!(
            peer = %self.peer,
            "SPF for {sender:?}: {} ({})",
            c.report.result.name(),
            c.report.reason
        );
        Some(c)
    }

    /// Opens the link to queued if this session has none yet. False (and
    /// one log line) if queued cannot be reached or is not who answers.
    pub(super) async fn open_link(&mut self) -> bool {
        if self.queue.is_some() {
            return true;
        }
        let connect = QueueLink::connect(
            &self.cfg.submit_socket,
            self.peer.to_string(),
            self.cfg.mode,
            self.tls.is_some(),
            &self.cfg.ids,
        );
        match tokio::time::timeout(self.cfg.command_timeout, connect).await {
            Ok(Ok(link)) => {
                self.queue = Some(link);
                true
            }
            Ok(Err(e)) => {
                tracing::error!(peer = %self.peer, "cannot reach queued at {}: {e}", self.cfg.submit_socket.display());
                false
            }
            Err(_) => {
                tracing::error!(peer = %self.peer, "queued did not answer in time");
                false
            }
        }
    }

    /// Forgets the envelope here and in queued (if the link is open).
    /// False if queued is gone.
    pub(super) async fn reset_envelope(&mut self) -> bool {
        self.mail_from = None;
        self.accepted.clear();
        self.rcpts = 0;
        self.spf = None;
        match self.queue.as_mut() {
            None => true,
            Some(q) => matches!(q.call(&SubmitRequest::Rset).await, Ok(SubmitReply::Ok)),
        }
    }

    /// queued went away or cannot be reached: the session's state there is
    /// gone, so end it.
    pub(super) fn queue_lost(&mut self) -> Next {
        self.queue = None;
        self.reply(421, "4.3.0", "Temporary queue error, closing");
        Next::Close
    }
}
