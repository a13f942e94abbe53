//! submit.sock: who may connect, how many at once, and what each
//! connection is — one SMTP session ([`crate::session`]) or smtpd's key
//! link ([`crate::keylink`]). A message out of place closes the connection
//! with one log line; queued itself carries on.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use tambo_common::loglimit::{LogLimiter, skipped};
use tambo_proto::frame::{FrameReader, MAX_CHUNK_FRAME, MAX_SMALL_FRAME, write_frame};
use tambo_proto::identity::Identities;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{SubmitReply, SubmitRequest};
use tambo_proto::{Error, Role, hello};

use crate::keylink::{self, KeyService};
use crate::queue::Queue;
use crate::session::Session;

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
    pub keys: Arc<KeyService>,
    pub auth: Arc<crate::auth::Service>,
    pub ids: Identities,
    pub sessions: Arc<Semaphore>,
    pub idle_timeout: Duration,
    /// One per kind of refusal a peer can cause, so none floods the log.
    refused_stranger: LogLimiter,
    refused_full: LogLimiter,
    refused_hello: LogLimiter,
}

impl Listener {
    pub fn new(
        queue: Arc<Queue>,
        keys: Arc<KeyService>,
        auth: Arc<crate::auth::Service>,
        ids: Identities,
        nofile: u64,
    ) -> Self {
        let cap = MAX_SESSIONS.min((nofile / 4).max(1) as usize);
        let idle_timeout = queue.cfg.testing.ipc_idle_timeout.unwrap_or(IDLE_TIMEOUT);
        Self {
            queue,
            keys,
            auth,
            ids,
            sessions: Arc::new(Semaphore::new(cap)),
            idle_timeout,
            refused_stranger: LogLimiter::new(),
            refused_full: LogLimiter::new(),
            refused_hello: LogLimiter::new(),
        }
    }
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
    // The first request says what the connection is: an SMTP session, or
    // smtpd's key link.
    let first = match tokio::time::timeout(l.idle_timeout, reader.read(MAX_SMALL_FRAME)).await {
        Ok(Ok(Some(req))) => req,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, "submit.sock: closing connection: {e}");
            return;
        }
        Err(_) => {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, "submit.sock: closing connection: no first request in time");
            return;
        }
    };
    if first == SubmitRequest::KeyLink {
        if peer.role != Role::Smtpd {
            tracing::warn!("submit.sock: a key link is for smtpd only; closing");
            return;
        }
        if let Err(e) = keylink::serve(&l.keys, reader, writer, l.idle_timeout, WRITE_TIMEOUT).await
        {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, "submit.sock: key link closed: {e}");
        }
        return;
    }
    if let SubmitRequest::Admin(req) = first {
        // The admin CLI: root only (the identity check made the ctl role
        // root's), one request, one answer.
        if peer.role != Role::Ctl {
            tracing::warn!("submit.sock: admin requests are for the admin CLI only; closing");
            return;
        }
        tracing::info!(uid = peer.uid, pid = ?peer.pid, "admin request: {req:?}");
        let reply = SubmitReply::Admin(crate::admin::answer(&l.queue, req).await);
        let _ = tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut writer, &reply)).await;
        return;
    }
    if first == SubmitRequest::LogLink {
        if peer.role != Role::Smtpd {
            tracing::warn!("submit.sock: a log link is for smtpd only; closing");
            return;
        }
        tracing::info!(uid = peer.uid, pid = ?peer.pid, "submit.sock: smtpd's log link is up");
        if let Err(e) = serve_log_link(reader, l.idle_timeout).await {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, "submit.sock: log link closed: {e}");
        }
        return;
    }
    let mut s = Session::new(l.queue.clone(), l.auth.clone());
    let result: Result<(), Error> = async {
        let mut first = Some(first);
        loop {
            // A body chunk is the only large request, and only inside DATA.
            let max = if s.in_body() {
                MAX_CHUNK_FRAME
            } else {
                MAX_SMALL_FRAME
            };
            let req = match first.take() {
                Some(req) => req,
                None => match tokio::time::timeout(l.idle_timeout, reader.read(max)).await {
                    Err(_) => return Err(Error::Idle(l.idle_timeout)),
                    Ok(r) => match r? {
                        Some(req) => req,
                        None => return Ok(()),
                    },
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

/// Bytes all log links together may write per second, and in a burst:
/// far more than smtpd's busiest minute needs (a line per refused
/// command), far less than a compromised smtpd, opening every link it
/// can, would need to fill the disk quickly.
const LOG_BYTES_PER_SECOND: f64 = 256.0 * 1024.0;
const LOG_BURST_BYTES: f64 = 4.0 * 1024.0 * 1024.0;

/// The log links' shared budget: (bytes left, when last refilled).
static LOG_BUDGET: std::sync::Mutex<Option<(f64, std::time::Instant)>> =
    std::sync::Mutex::new(None);

/// Takes `n` bytes from the shared budget, if there are that many.
fn log_budget_take(n: usize) -> bool {
    let mut b = LOG_BUDGET.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    let (tokens, last) = b.get_or_insert((LOG_BURST_BYTES, now));
    *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * LOG_BYTES_PER_SECOND)
        .min(LOG_BURST_BYTES);
    *last = now;
    if *tokens >= n as f64 {
        *tokens -= n as f64;
        true
    } else {
        false
    }
}

/// Serves smtpd's log link after its `LogLink` request: each event is
/// written to the mail log, within the budget all links share (over it,
/// lines are dropped and counted). Nothing is replied. An idle link is
/// closed; smtpd opens another when it has something to say.
async fn serve_log_link(
    mut reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    idle: std::time::Duration,
) -> Result<(), Error> {
    loop {
        let req = match tokio::time::timeout(idle, reader.read(MAX_SMALL_FRAME)).await {
            Err(_) => return Ok(()),
            Ok(r) => match r? {
                Some(req) => req,
                None => return Ok(()),
            },
        };
        let SubmitRequest::Log(ev) = req else {
            return Err(Error::Unexpected("not a log event on a log link"));
        };
        let line = crate::maillog::event_line(&ev);
        if log_budget_take(line.len() + 28) {
            crate::maillog::line(line);
        } else {
            metrics::inc(names::MAILLOG_DROPPED);
        }
    }
}
