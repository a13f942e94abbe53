//! submit.sock: one connection per SMTP session (DESIGN §2).
//!
//! The peer may be a compromised smtpd, so every request is checked here as
//! if it came from the internet: order, counts and sizes are enforced again,
//! and relay needs an [`Authenticated`] this connection cannot forge. A
//! message out of place closes the connection with one log line; queued
//! itself carries on.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use tambo_common::address;
use tambo_common::loglimit::{LogLimiter, skipped};
use tambo_proto::frame::{FrameReader, MAX_CHUNK_FRAME, MAX_SMALL_FRAME, write_frame};
use tambo_proto::identity::Identities;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{RcptVerdict, SubmitReply, SubmitRequest};
use tambo_proto::{Error, Role, hello};

use crate::policy::{Authenticated, Policy};
use crate::queue::{PutError, Queue};
use crate::spool::BodyWriter;

/// Most recipients per transaction, enforced again after smtpd.
const MAX_RCPTS: usize = 100;

/// What a body may hold beyond `max_data_size_mb`: the headers smtpd adds
/// (Received now; later Authentication-Results and DKIM signatures).
pub const HEADER_ROOM: u64 = 64 * 1024;

/// Most submit.sock connections at once; also never more than a quarter
/// of queued's descriptor limit (a session in DATA holds two: its socket
/// and its body file), so sessions can never starve the queue's own files
/// and deliver.sock.
pub const MAX_SESSIONS: usize = 2048;

/// A submit.sock connection that sends nothing for this long is closed;
/// smtpd keeps its links alive well within it, between commands and
/// inside DATA, so only a dead or hostile peer reaches it.
pub use tambo_proto::submit::IDLE_TIMEOUT;

/// How long a reply may take to write before the peer counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What every submit.sock connection shares.
pub struct Listener {
    pub queue: Arc<Queue>,
    pub ids: Identities,
    pub sessions: Arc<Semaphore>,
    pub idle_timeout: Duration,
    /// One per kind of refusal a peer can cause, so none floods the log.
    refused_stranger: LogLimiter,
    refused_full: LogLimiter,
    refused_hello: LogLimiter,
}

impl Listener {
    pub fn new(queue: Arc<Queue>, ids: Identities, nofile: u64) -> Self {
        let cap = MAX_SESSIONS.min((nofile / 4).max(1) as usize);
        let idle_timeout = queue.cfg.testing.ipc_idle_timeout.unwrap_or(IDLE_TIMEOUT);
        Self {
            queue,
            ids,
            sessions: Arc::new(Semaphore::new(cap)),
            idle_timeout,
            refused_stranger: LogLimiter::new(),
            refused_full: LogLimiter::new(),
            refused_hello: LogLimiter::new(),
        }
    }
}

/// A message being received.
struct Body {
    id: String,
    writer: BodyWriter,
    /// First error, reported at DataEnd.
    error: Option<BodyError>,
}

enum BodyError {
    /// The in-flight byte budget ran out (452 4.3.1).
    NoSpace,
    /// Anything else (451 4.3.0); the text is for the log.
    Failed(String),
}

struct Session {
    queue: Arc<Queue>,
    client: Option<String>,
    auth: Option<Authenticated>,
    from: Option<String>,
    rcpts: Vec<String>,
    body: Option<Body>,
}

/// Serves one submit.sock connection until it closes. Over the session
/// cap, the connection is closed at once, before anything is read.
pub async fn serve(l: Arc<Listener>, mut stream: UnixStream) {
    const ROLES: &[Role] = &[Role::Smtpd, Role::Ctl];
    // A stranger is turned away before it costs a slot or a hello timeout.
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    if !uid.is_some_and(|u| l.ids.allows_any(ROLES, u)) {
        metrics::inc_label(names::IPC_REFUSED, "submit");
        if let Some(n) = l.refused_stranger.allow() {
            tracing::warn!(
                "submit.sock: refused a connection: peer uid {} may not use this socket{}",
                uid.map_or("unknown".into(), |u| u.to_string()),
                skipped(n)
            );
        }
        return;
    }
    let Ok(_permit): Result<OwnedSemaphorePermit, _> = l.sessions.clone().try_acquire_owned()
    else {
        metrics::inc_label(names::IPC_REFUSED, "submit:max_sessions");
        if let Some(n) = l.refused_full.allow() {
            tracing::warn!(
                "submit.sock: refusing a connection: too many sessions{}",
                skipped(n)
            );
        }
        return;
    };
    let peer = match hello::accept(&mut stream, Role::Queued, ROLES, &l.ids).await {
        Ok(p) => p,
        Err(e) => {
            metrics::inc_label(names::IPC_REFUSED, "submit");
            if let Some(n) = l.refused_hello.allow() {
                tracing::warn!("submit.sock: refused a connection: {e}{}", skipped(n));
            }
            return;
        }
    };
    log_new_peer(&peer);
    let (r, mut writer) = stream.into_split();
    let mut reader = FrameReader::new(r);
    let mut s = Session {
        queue: l.queue.clone(),
        client: None,
        auth: None,
        from: None,
        rcpts: Vec::new(),
        body: None,
    };
    let result: Result<(), Error> = async {
        loop {
            // A body chunk is the only large request, and only inside DATA.
            let max = if s.body.is_some() {
                MAX_CHUNK_FRAME
            } else {
                MAX_SMALL_FRAME
            };
            let req = match tokio::time::timeout(l.idle_timeout, reader.read(max)).await {
                Err(_) => return Err(Error::Idle(l.idle_timeout)),
                Ok(r) => match r? {
                    Some(req) => req,
                    None => return Ok(()),
                },
            };
            if let Some(reply) = s.handle(req).await? {
                tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut writer, &reply))
                    .await
                    .map_err(|_| Error::Io(std::io::ErrorKind::TimedOut.into()))??;
            }
        }
    }
    .await;
    if let Err(e) = result {
        metrics::inc_label(names::IPC_ERRORS, "queued");
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "submit.sock: closing connection: {e}");
    }
    s.abort_body();
}

/// Logs the credentials (SO_PEERCRED) of each process the first time it
/// connects: one line per smtpd process rather than one per SMTP session.
fn log_new_peer(peer: &hello::Peer) {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    type UidPid = (u32, Option<i32>);
    static SEEN: OnceLock<Mutex<HashSet<UidPid>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if seen.len() > 1024 {
        seen.clear();
    }
    if seen.insert((peer.uid, peer.pid)) {
        tracing::info!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, "submit.sock: {} connected", peer.role.name());
    }
}

impl Session {
    async fn handle(&mut self, req: SubmitRequest) -> Result<Option<SubmitReply>, Error> {
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
            SubmitRequest::Session { client, .. } => {
                if self.client.is_some() {
                    return Err(Error::Unexpected("second Session"));
                }
                // It goes into logs and the queue item: an address, or
                // nothing.
                if client.parse::<std::net::SocketAddr>().is_err() && client != "local" {
                    return Err(Error::Unexpected("Session whose client is not an address"));
                }
                self.client = Some(client);
                SubmitReply::Ok
            }
            SubmitRequest::Ping => SubmitReply::Ok,
            SubmitRequest::Mail { from } => {
                self.reset();
                // smtpd checked the syntax already; check again, since the
                // sender ends up in logs, MDA arguments and DSN headers.
                if !from.is_empty()
                    && (!address::is_plausible(&from)
                        || address::normalize(&from).is_err()
                        || from.starts_with('-'))
                {
                    return Ok(Some(SubmitReply::BadSequence(
                        "invalid sender address".into(),
                    )));
                }
                self.from = Some(from);
                SubmitReply::Ok
            }
            SubmitRequest::Rcpt { to } => {
                if self.from.is_none() {
                    return Ok(Some(SubmitReply::BadSequence("RCPT before MAIL".into())));
                }
                if self.rcpts.len() >= MAX_RCPTS {
                    return Ok(Some(SubmitReply::Rcpt(RcptVerdict::TooMany)));
                }
                if !address::is_plausible(&to) || to.starts_with('-') {
                    return Ok(Some(SubmitReply::Rcpt(RcptVerdict::Invalid(
                        "not an address".into(),
                    ))));
                }
                let domains = self.queue.domains();
                let policy = Policy {
                    cfg: &self.queue.cfg,
                    domains: &domains,
                };
                let to = policy.qualify(&to);
                let verdict = policy.check_rcpt(&to, self.auth.as_ref());
                if verdict == RcptVerdict::Accepted {
                    self.rcpts.push(to);
                } else {
                    tracing::info!(client = ?self.client, "rejected to=<{to}>: {verdict:?}");
                }
                SubmitReply::Rcpt(verdict)
            }
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
                    if body.writer.size() + n > max {
                        body.error = Some(BodyError::Failed("message too big".into()));
                    } else if !self.queue.reserve_in_flight(n) {
                        body.error = Some(BodyError::NoSpace);
                    } else if let Err(e) = tokio::task::block_in_place(|| body.writer.write(&data))
                    {
                        self.queue.release_in_flight(n);
                        tracing::error!(id = %body.id, "queue write failed: {e}");
                        body.error = Some(BodyError::Failed(format!("queue write failed: {e}")));
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
        let spool = self.queue.spool.clone();
        let id2 = id.clone();
        match tokio::task::spawn_blocking(move || spool.create_body(&id2)).await {
            Ok(Ok(writer)) => {
                self.body = Some(Body {
                    id,
                    writer,
                    error: None,
                });
                SubmitReply::DataReady
            }
            Ok(Err(e)) => {
                tracing::error!("cannot create a queue file: {e}");
                self.queue.release_id(&id);
                SubmitReply::Failed {
                    reason: format!("queue write failed: {e}"),
                }
            }
            Err(e) => {
                self.queue.release_id(&id);
                SubmitReply::Failed {
                    reason: e.to_string(),
                }
            }
        }
    }

    async fn data_end(&mut self) -> Result<SubmitReply, Error> {
        let Some(body) = self.body.take() else {
            return Err(Error::Unexpected("DataEnd outside DATA"));
        };
        let from = self.from.take().unwrap_or_default();
        let rcpts = std::mem::take(&mut self.rcpts);
        let Body { id, writer, error } = body;
        // From here the bytes are either queued or thrown away: no longer
        // in flight.
        self.queue.release_in_flight(writer.size());
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
        let synced = tokio::task::spawn_blocking(move || writer.finish()).await;
        let synced = synced
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = synced {
            tracing::error!(%id, "cannot sync the message body: {e}");
            self.queue.release_id(&id);
            return Ok(SubmitReply::Failed {
                reason: format!("queue write failed: {e}"),
            });
        }
        let client = self.client.clone().unwrap_or_default();
        match self.queue.put(id.clone(), from, rcpts, client, false).await {
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

    fn reset(&mut self) {
        self.from = None;
        self.rcpts.clear();
        self.abort_body();
    }

    fn abort_body(&mut self) {
        if let Some(body) = self.body.take() {
            self.queue.release_in_flight(body.writer.size());
            drop(body.writer);
            self.queue.release_id(&body.id);
        }
    }
}
