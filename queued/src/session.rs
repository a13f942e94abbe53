//! One SMTP session's state in queued, tied to its submit.sock
//! connection (DESIGN §2): the envelope, the body being received, and the
//! authentication. The peer may be a compromised smtpd, so every request
//! is checked here as if it came from the internet: order, counts and
//! sizes are enforced again, and relay needs an [`Authenticated`] that only
//! a successful password check makes. A message out of place is an error
//! that closes the connection.

mod head;
mod postdata;
mod rcpt;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use tambo_common::address;
use tambo_proto::Error;
use tambo_proto::deliver::SecLevel;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{AuthVerdict, Mode, SpfReport, SpfResult, SubmitReply, SubmitRequest};

use crate::auth;
use crate::domaininfo::Direction;
use crate::hooks;
use crate::policy::{Authenticated, Policy};
use crate::queue::{FromSession, HookAnswers, PutError, Queue};
use crate::signing;
use crate::spool::BodyWriter;

/// Most recipients per transaction, enforced again after smtpd.
const MAX_RCPTS: usize = 100;

/// What a body may hold beyond `max_data_size_mb`: the headers smtpd adds
/// (Received now; later Authentication-Results and DKIM signatures).
pub const HEADER_ROOM: u64 = 64 * 1024;

/// A message being received.
struct Body {
    id: String,
    writer: BodyWriter,
    /// First error, reported at DataEnd.
    error: Option<BodyError>,
    /// Bytes received, counted in the in-flight budget (what the body
    /// file holds may have more: a field put on top).
    received: u64,
    /// The start of the message while it is held ([`head`]).
    head: Option<head::Head>,
    /// Whether its Authentication-Results went on top as it was spooled.
    prefixed: bool,
}

enum BodyError {
    /// The in-flight byte budget ran out (452 4.3.1).
    NoSpace,
    /// Anything else (451 4.3.0); the text is for the log.
    Failed(String),
}

/// Longest the end of DATA may take here, the checks and hooks after it
/// included: smtpd waits 120 s for the answer, then tells the client to
/// retry, so a message must not become an item later than this.
const DATA_END_BUDGET: std::time::Duration = std::time::Duration::from_secs(100);

/// AUTH failures one session may have; smtpd closes the session at its
/// third error of any kind (REFERENCE §2.2), so a fourth AUTH can only come
/// from an smtpd that does not.
const MAX_AUTH_FAILURES: u32 = 3;

pub struct Session {
    queue: Arc<Queue>,
    auth_service: Arc<auth::Service>,
    client: Option<String>,
    mode: Mode,
    /// Whether smtpd says the SMTP session is on TLS.
    tls: bool,
    auth: Option<Authenticated>,
    /// AUTH attempts refused in this session.
    auth_failures: u32,
    from: Option<String>,
    /// What smtpd told of the transaction at MAIL.
    txn: Txn,
    rcpts: Vec<String>,
    /// The alias-resolve hook's answers at RCPT, reused when the message
    /// is queued: one run per address per transaction (REFERENCE §6).
    alias_answers: HookAnswers,
    body: Option<Body>,
}

/// What smtpd said at MAIL, for the hooks and Authentication-Results.
#[derive(Default)]
struct Txn {
    ehlo: String,
    server_name: String,
    spf: Option<SpfReport>,
}

impl Session {
    pub fn new(queue: Arc<Queue>, auth_service: Arc<auth::Service>) -> Self {
        Self {
            queue,
            auth_service,
            client: None,
            mode: Mode::Smtp,
            tls: false,
            auth: None,
            auth_failures: 0,
            from: None,
            txn: Txn::default(),
            rcpts: Vec::new(),
            alias_answers: HookAnswers::new(),
            body: None,
        }
    }

    /// A local user's session (local.sock): authenticated as `login` by
    /// the connection's credentials, under submission's rules.
    pub fn local(queue: Arc<Queue>, auth_service: Arc<auth::Service>, login: String) -> Self {
        let mut s = Self::new(queue, auth_service);
        s.client = Some("local".into());
        s.mode = Mode::Submission;
        // As private as TLS: it never leaves the machine.
        s.tls = true;
        s.auth = Some(Authenticated::after_check(login));
        s
    }

    /// The queue ID of the message being received, if any.
    pub fn body_id(&self) -> Option<&str> {
        self.body.as_ref().map(|b| b.id.as_str())
    }

    /// Whether a message body is being received (only then may a large
    /// frame come).
    pub fn in_body(&self) -> bool {
        self.body.is_some()
    }

    pub async fn handle(&mut self, req: SubmitRequest) -> Result<Option<SubmitReply>, Error> {
        if self.client.is_none() && !matches!(req, SubmitRequest::Session { .. }) {
            return Err(Error::Unexpected("request before Session"));
        }
        if self.body.is_some()
            && !matches!(
                req,
                SubmitRequest::DataChunk(_) | SubmitRequest::DataEnd | SubmitRequest::DataAbort
            )
        {
            return Err(Error::Unexpected("command in the middle of a message body"));
        }
        let reply = match req {
            SubmitRequest::Session { client, mode, tls } => {
                if self.client.is_some() {
                    return Err(Error::Unexpected("second Session"));
                }
                self.mode = mode;
                self.tls = tls;
                // It goes into logs and the queue item: an address, or
                // nothing.
                if client.parse::<std::net::SocketAddr>().is_err() && client != "local" {
                    return Err(Error::Unexpected("Session whose client is not an address"));
                }
                self.client = Some(client);
                SubmitReply::Ok
            }
            SubmitRequest::Ping => SubmitReply::Ok,
            SubmitRequest::KeyLink | SubmitRequest::Certificates | SubmitRequest::Sign { .. } => {
                return Err(Error::Unexpected("a key-link request in an SMTP session"));
            }
            SubmitRequest::LogLink | SubmitRequest::Log(_) => {
                return Err(Error::Unexpected("a log-link request in an SMTP session"));
            }
            SubmitRequest::Admin(_) => {
                return Err(Error::Unexpected("an admin request in an SMTP session"));
            }
            SubmitRequest::Auth { identity, password } => {
                SubmitReply::Auth(self.authenticate(identity, password).await)
            }
            SubmitRequest::Mail {
                from,
                ehlo,
                server_name,
                spf,
            } => {
                // smtpd gives its 250 before this answer where
                // common::address::mail_answer_is_certain says it is Ok:
                // a refusal added here must be added there too (the tests
                // check the two agree).
                self.reset();
                // Submission ports need AUTH before MAIL (REFERENCE §2.1).
                if self.mode != Mode::Smtp && self.auth.is_none() {
                    return Ok(Some(SubmitReply::AuthRequired));
                }
                // An authenticated user sends as themselves (unless the
                // site turned that off; a local user always does: the
                // setting is chasquid's, for AUTH).
                if let Some(auth) = &self.auth
                    && (self.queue.cfg.tambo.sender_bound_to_login
                        || self.client.as_deref() == Some("local"))
                {
                    let domains = self.queue.domains();
                    let policy = Policy {
                        cfg: &self.queue.cfg,
                        domains: &domains,
                    };
                    if !policy.may_send_as(&from, auth) {
                        tracing::info!(client = ?self.client, "{} may not send as <{}>", auth.user(), from.escape_debug());
                        return Ok(Some(SubmitReply::SenderNotAllowed));
                    }
                }
                // smtpd checked the syntax already; check again, since the
                // sender ends up in logs, MDA arguments and DSN headers.
                if !address::is_acceptable_sender(&from) {
                    return Ok(Some(SubmitReply::BadSequence(
                        "invalid sender address".into(),
                    )));
                }
                if !from.is_empty() && !self.security_level_ok(&from, spf.as_ref()).await {
                    return Ok(Some(SubmitReply::SecurityLevelTooLow));
                }
                self.from = Some(from);
                self.txn = Txn {
                    ehlo,
                    server_name,
                    // An authenticated session is not checked (REFERENCE
                    // §2.6); smtpd says so too, but it is not believed.
                    spf: spf.filter(|_| self.auth.is_none()),
                };
                SubmitReply::Ok
            }
            SubmitRequest::Rcpt { to } => self.rcpt(to).await,
            SubmitRequest::Rset => {
                self.reset();
                SubmitReply::Ok
            }
            SubmitRequest::DataBegin => self.data_begin().await,
            SubmitRequest::DataChunk(data) => {
                let max = self.queue.cfg.max_data_size() + HEADER_ROOM;
                let Some(body) = self.body.as_mut() else {
                    return Err(Error::Unexpected("DataChunk outside DATA"));
                };
                let n = data.len() as u64;
                if body.error.is_none() {
                    if body.received + n > max {
                        body.error = Some(BodyError::Failed("message too big".into()));
                    } else if !self.queue.reserve_in_flight(n) {
                        body.error = Some(BodyError::NoSpace);
                    } else {
                        body.received += n;
                        let data = match body.head.as_mut() {
                            None => Some(data),
                            Some(h) => h.push(&data).map(|d| {
                                body.head = None;
                                body.prefixed = d.prefixed;
                                d.bytes
                            }),
                        };
                        if let Some(data) = data {
                            body.spool(&data);
                        }
                    }
                }
                return Ok(None);
            }
            SubmitRequest::DataAbort => {
                if self.body.is_none() {
                    return Err(Error::Unexpected("DataAbort outside DATA"));
                }
                self.reset();
                return Ok(None);
            }
            SubmitRequest::DataEnd => self.data_end().await?,
        };
        Ok(Some(reply))
    }

    async fn data_begin(&mut self) -> SubmitReply {
        if self.from.is_none() || self.rcpts.is_empty() {
            return SubmitReply::BadSequence("DATA without sender or recipients".into());
        }
        if self.queue.in_flight_full() {
            return SubmitReply::NoSpace {
                reason: format!(
                    "{} MiB of messages are being received already ([tambo] max_data_in_flight_mb)",
                    self.queue.cfg.tambo.max_data_in_flight_mb
                ),
            };
        }
        let id = match self.queue.reserve_id(false) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("refusing a message: {e}");
                return SubmitReply::Failed {
                    reason: e.to_string(),
                };
            }
        };
        // Nothing touches the disk yet: a small body stays in memory until
        // its end (spool::BODY_IN_MEMORY).
        match self.queue.body_writer(&id) {
            Ok(writer) => {
                // The checks after DATA would only add this field: put it
                // on top as the message is spooled, once its header section
                // shows it unsigned.
                let head = (self.auth.is_none() && !self.queue.hooks.exists(hooks::Name::PostData))
                    .then(|| head::Head::new(self.local_auth_results(true)));
                self.body = Some(Body {
                    id,
                    writer,
                    error: None,
                    received: 0,
                    head,
                    prefixed: false,
                });
                SubmitReply::DataReady
            }
            Err(e) => {
                tracing::error!("cannot create a queue file: {e}");
                self.queue.release_id(&id);
                SubmitReply::Failed {
                    reason: format!("queue write failed: {e}"),
                }
            }
        }
    }

    async fn data_end(&mut self) -> Result<SubmitReply, Error> {
        let deadline = std::time::Instant::now() + DATA_END_BUDGET;
        let Some(mut body) = self.body.take() else {
            return Err(Error::Unexpected("DataEnd outside DATA"));
        };
        if let Some(h) = body.head.take()
            && body.error.is_none()
        {
            let d = h.finish();
            body.prefixed = d.prefixed;
            body.spool(&d.bytes);
        }
        let from = self.from.take().unwrap_or_default();
        let rcpts = std::mem::take(&mut self.rcpts);
        let Body {
            id,
            writer,
            error,
            received,
            prefixed,
            ..
        } = body;
        // From here the bytes are either queued or thrown away: no longer
        // in flight.
        self.queue.release_in_flight(received);
        match error {
            Some(BodyError::Failed(reason)) => {
                self.queue.release_id(&id);
                return Ok(SubmitReply::Failed { reason });
            }
            Some(BodyError::NoSpace) => {
                self.queue.release_id(&id);
                return Ok(SubmitReply::NoSpace {
                    reason: format!(
                        "over {} MiB of messages being received at once ([tambo] max_data_in_flight_mb)",
                        self.queue.cfg.tambo.max_data_in_flight_mb
                    ),
                });
            }
            None => {}
        }
        let signing = self.auth.is_some() && self.signs_for(&from);
        let checking = if prefixed {
            // Done as it was spooled: what the local path below counts.
            metrics::inc_label(names::SMTP_IN_HOOK_RESULTS, "post-data:skip");
            metrics::inc(names::SMTP_IN_DKIM_VERIFY_NOT_FOUND);
            false
        } else {
            self.needs_post_data()
        };
        // The put writes out and syncs the body with its item; only the
        // steps that read it back by path need it in its file first.
        let mut body = Some(writer);
        if (signing || checking)
            && let Some(writer) = body.take()
        {
            let close = move || writer.close();
            if let Err(reply) = self.spool_io(&id, "write the message body", close).await {
                return Ok(reply);
            }
        }
        // Authenticated mail is signed with its sender domain's keys before
        // it becomes an item (REFERENCE §2.8 step 3): a failure is a 451.
        if signing && let Err(reason) = self.sign(&id, &from).await {
            self.queue.release_id(&id);
            return Ok(SubmitReply::Failed { reason });
        }
        if checking {
            match self.post_data(&id, &from, &rcpts).await {
                postdata::AfterData::Reject { permanent, text } => {
                    self.queue.release_id(&id);
                    return Ok(SubmitReply::HookRejected { permanent, text });
                }
                postdata::AfterData::Accept(prefix) if !prefix.is_empty() => {
                    let (spool, id2) = (self.queue.spool.clone(), id.clone());
                    let add = move || spool.prepend(&id2, &prefix);
                    if let Err(reply) = self
                        .spool_io(&id, "add the checks' headers to the message", add)
                        .await
                    {
                        return Ok(reply);
                    }
                }
                postdata::AfterData::Accept(_) => {}
            }
        }
        let client = self.client.clone().unwrap_or_default();
        let session = FromSession {
            hook_answers: std::mem::take(&mut self.alias_answers),
            deadline: Some(deadline),
            body,
        };
        match self
            .queue
            .put(id.clone(), from, rcpts, client, false, session)
            .await
        {
            Ok(()) => Ok(SubmitReply::Queued { id }),
            Err(e) => {
                if let PutError::Io(io) = &e {
                    tracing::error!(%id, "cannot write the queue item: {io}");
                }
                self.queue.release_id(&id);
                Ok(SubmitReply::Failed {
                    reason: e.to_string(),
                })
            }
        }
    }

    /// The incoming security level check (REFERENCE §2.6, §4.6), only
    /// after an SPF pass: a sender domain once seen over TLS may not come
    /// back in plain text. Without a pass it is skipped: anyone could
    /// otherwise raise the level of any domain and lock its mail out.
    async fn security_level_ok(&self, from: &str, spf: Option<&SpfReport>) -> bool {
        if self.auth.is_some() || spf.is_none_or(|s| s.result != SpfResult::Pass) {
            metrics::inc_label(names::SMTP_IN_SECURITY_LEVEL_CHECKS, "skip");
            return true;
        }
        let Ok(domain) = address::normalize_domain(address::split(from).1) else {
            metrics::inc_label(names::SMTP_IN_SECURITY_LEVEL_CHECKS, "skip");
            return true;
        };
        let seen = if self.tls {
            SecLevel::TlsClient
        } else {
            SecLevel::Plain
        };
        let (info, d) = (self.queue.domaininfo.clone(), domain.clone());
        // A raise writes and fsyncs the record.
        let ok = tokio::task::spawn_blocking(move || info.check(&d, Direction::Incoming, seen))
            .await
            .unwrap_or(true);
        if ok {
            metrics::inc_label(names::SMTP_IN_SECURITY_LEVEL_CHECKS, "pass");
        } else {
            metrics::inc_label(names::SMTP_IN_SECURITY_LEVEL_CHECKS, "fail");
            tracing::info!(client = ?self.client, "security level check failed for {domain}: {} in plain text after TLS", from.escape_debug());
        }
        ok
    }

    /// Runs a blocking write to the spooled message `id`. On failure: one
    /// log line saying what could not be done, the ID given back, and the
    /// reply for smtpd (451 4.3.0).
    async fn spool_io(
        &self,
        id: &str,
        what: &str,
        io: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), SubmitReply> {
        let r = tokio::task::spawn_blocking(io)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        r.map_err(|e| {
            tracing::error!(%id, "cannot {what}: {e}");
            self.queue.release_id(id);
            SubmitReply::Failed {
                reason: format!("queue write failed: {e}"),
            }
        })
    }

    /// Whether mail from `from` gets signed: its domain has keys.
    fn signs_for(&self, from: &str) -> bool {
        address::normalize_domain(address::split(from).1)
            .is_ok_and(|d| self.queue.dkim.count(&d) > 0)
    }

    /// DKIM-signs the spooled body `id` with every key of the domain of
    /// `from` (none: nothing to do).
    async fn sign(&self, id: &str, from: &str) -> Result<(), String> {
        let Ok(domain) = address::normalize_domain(address::split(from).1) else {
            return Ok(());
        };
        if self.queue.dkim.count(&domain) == 0 {
            return Ok(());
        }
        let mut trace = tambo_proto::trace::Trace::new("DKIM.Sign", id.to_string());
        trace.event(format!(
            "{} key(s) of {domain}",
            self.queue.dkim.count(&domain)
        ));
        let (spool, keys, id2, d) = (
            self.queue.spool.clone(),
            self.queue.dkim.clone(),
            id.to_string(),
            domain.clone(),
        );
        let signed =
            tokio::task::spawn_blocking(move || signing::sign_spooled(&spool, &id2, &keys, &d))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        match signed {
            Ok(_) => {
                trace.event("signed");
                metrics::inc(names::SMTP_IN_DKIM_SIGNED);
                Ok(())
            }
            Err(e) => {
                trace.error(format!("failed: {e}"));
                metrics::inc(names::SMTP_IN_DKIM_SIGN_ERRORS);
                tracing::error!(%id, "DKIM signing for {domain} failed: {e}");
                Err(format!("DKIM signing failed: {e}"))
            }
        }
    }

    /// Checks an AUTH attempt: the client's failure budget first, then the
    /// domain's users file, on the bounded pool, then Dovecot for a user
    /// the file does not have (REFERENCE §5.4, §5.5), the whole answer
    /// padded to the same duration whatever it is (REFERENCE §2.2, §2.5).
    /// A success binds this session to the user; only then may it relay.
    async fn authenticate(&mut self, identity: String, password: Vec<u8>) -> AuthVerdict {
        // The identity only: never the password.
        let mut trace = tambo_proto::trace::Trace::new("Authentication", identity.clone());
        if let Some(c) = &self.client {
            trace.event(format!("client {c}"));
        }
        let start = std::time::Instant::now();
        let verdict = self.check_password(identity, password, start).await;
        match verdict {
            AuthVerdict::Accepted => trace.event("accepted"),
            AuthVerdict::Invalid => trace.error("refused: no such user, or a wrong password"),
            AuthVerdict::Blocked => trace.error("refused: too many failures"),
            AuthVerdict::TempError => trace.error("temporary error"),
        }
        auth::equalise(start).await;
        verdict
    }

    async fn check_password(
        &mut self,
        identity: String,
        password: Vec<u8>,
        start: std::time::Instant,
    ) -> AuthVerdict {
        // AUTH is only for TLS sessions, and once; smtpd says so too.
        if !self.tls || self.auth.is_some() {
            return AuthVerdict::Invalid;
        }
        // smtpd closes a session at its third error; queued does not take
        // its word for it.
        if self.auth_failures >= MAX_AUTH_FAILURES {
            return AuthVerdict::Blocked;
        }
        // Only a client with an address can be held to the budget.
        let Some(ip) = self
            .client
            .as_deref()
            .and_then(|c| c.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
        else {
            return AuthVerdict::Invalid;
        };
        let service = self.auth_service.clone();
        let budget = &service.budget;
        // The attempt counts as a failure from here until it succeeds.
        if !budget.try_begin(ip, start) {
            tracing::info!(client = ?self.client, "AUTH refused without a check: too many failures");
            return AuthVerdict::Blocked;
        }
        let verdict = self.check_identity(identity, password).await;
        match verdict {
            AuthVerdict::Accepted | AuthVerdict::TempError => budget.forgive(ip, start),
            AuthVerdict::Invalid | AuthVerdict::Blocked => self.auth_failures += 1,
        }
        verdict
    }

    /// The check itself, once the budget allowed it.
    async fn check_identity(&mut self, identity: String, password: Vec<u8>) -> AuthVerdict {
        let Ok((user, domain)) = auth::split_identity(&identity) else {
            return AuthVerdict::Invalid;
        };
        let who = if domain.is_empty() {
            user.clone()
        } else {
            format!("{user}@{domain}")
        };
        let domains = self.queue.domains();
        let (u, d) = (user, domain);
        let checked = self
            .auth_service
            .pool
            .run(move || {
                let verdict = match domains.get(&d) {
                    Some(dom) => auth::check(&dom.users, &u, &password),
                    // A bare user, or a domain without a users file: only
                    // Dovecot could know them.
                    None => Ok(None),
                };
                // Handed back for Dovecot, so it is never copied.
                (verdict, password)
            })
            .await;
        // Ok(Some(by)): accepted, and who said so; Ok(None): refused.
        let accepted: Result<Option<&str>, String> = match checked {
            Ok((Ok(Some(auth::Verdict::Accepted)), _)) => Ok(Some("the users file")),
            // A known user with the wrong password, or a receive-only
            // one: the file said no, and Dovecot is not asked.
            Ok((Ok(Some(_)), _)) => Ok(None),
            Ok((Ok(None), password)) => match &self.queue.dovecot {
                None => Ok(None),
                Some(_) if password.len() > auth::MAX_PASSWORD_LEN => Ok(None),
                Some(dovecot) => match dovecot.authenticate(&who, &password).await {
                    Ok(true) => Ok(Some("Dovecot")),
                    Ok(false) => Ok(None),
                    Err(e) => Err(format!("Dovecot: {e}")),
                },
            },
            Ok((Err(e), _)) | Err(e) => Err(e),
        };
        match accepted {
            Ok(Some(by)) => {
                tracing::info!(client = ?self.client, "authenticated as {who} (checked by {by})");
                self.auth = Some(Authenticated::after_check(who));
                AuthVerdict::Accepted
            }
            Ok(None) => AuthVerdict::Invalid,
            Err(e) => {
                tracing::error!("cannot check a password for {who}: {e}");
                AuthVerdict::TempError
            }
        }
    }

    pub fn reset(&mut self) {
        self.from = None;
        self.txn = Txn::default();
        self.alias_answers.clear();
        self.rcpts.clear();
        self.abort_body();
    }

    pub fn abort_body(&mut self) {
        if let Some(body) = self.body.take() {
            self.queue.release_in_flight(body.received);
            drop(body.writer);
            self.queue.release_id(&body.id);
        }
    }
}

impl Body {
    /// Writes to the body file; the first failure is kept for DataEnd.
    fn spool(&mut self, data: &[u8]) {
        let written = if self.writer.hold(data) {
            Ok(())
        } else {
            tokio::task::block_in_place(|| self.writer.write(data))
        };
        if let Err(e) = written {
            tracing::error!(id = %self.id, "queue write failed: {e}");
            self.error = Some(BodyError::Failed(format!("queue write failed: {e}")));
        }
    }
}
