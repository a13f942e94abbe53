//! submit.sock: one connection per SMTP session (DESIGN §2).
//!
//! The peer may be a compromised smtpd, so every request is checked here as
//! if it came from the internet: order, counts and sizes are enforced again,
//! and relay needs an [`Authenticated`] this connection cannot forge. A
//! message out of place closes the connection with one log line; queued
//! itself carries on.

use std::sync::Arc;

use tokio::io::{BufReader, BufWriter};
use tokio::net::UnixStream;

use tambo_common::address;
use tambo_proto::frame::{read_frame, write_frame};
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{RcptVerdict, SubmitReply, SubmitRequest};
use tambo_proto::{Error, Role, hello};

use crate::policy::{Authenticated, Policy};
use crate::queue::{PutError, Queue};
use crate::spool::BodyWriter;

/// Most recipients per transaction, enforced again after smtpd.
const MAX_RCPTS: usize = 100;

/// A message being received.
struct Body {
    id: String,
    writer: BodyWriter,
    /// First write error, reported at DataEnd.
    error: Option<String>,
}

struct Session {
    queue: Arc<Queue>,
    client: Option<String>,
    auth: Option<Authenticated>,
    from: Option<String>,
    rcpts: Vec<String>,
    body: Option<Body>,
}

/// Serves one submit.sock connection until it closes.
pub async fn serve(queue: Arc<Queue>, mut stream: UnixStream) {
    let peer = match hello::accept(&mut stream, Role::Queued, &[Role::Smtpd, Role::Ctl]).await {
        Ok(p) => p,
        Err(e) => {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!("submit.sock: refused a connection: {e}");
            return;
        }
    };
    log_new_peer(&peer);
    let (r, w) = stream.into_split();
    let mut reader = BufReader::with_capacity(128 * 1024, r);
    let mut writer = BufWriter::new(w);
    let mut s = Session {
        queue,
        client: None,
        auth: None,
        from: None,
        rcpts: Vec::new(),
        body: None,
    };
    let result: Result<(), Error> = async {
        while let Some(req) = read_frame::<_, SubmitRequest>(&mut reader).await? {
            if let Some(reply) = s.handle(req).await? {
                write_frame(&mut writer, &reply).await?;
            }
        }
        Ok(())
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
                self.client = Some(client);
                SubmitReply::Ok
            }
            SubmitRequest::Mail { from } => {
                self.reset();
                // smtpd checked the syntax already; check again, since the
                // sender ends up in logs, MDA arguments and DSN headers.
                if !from.is_empty()
                    && (!address::is_plausible(&from) || address::normalize(&from).is_err())
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
                if !address::is_plausible(&to) {
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
                let max = self.queue.cfg.max_data_size() + 64 * 1024;
                let Some(body) = self.body.as_mut() else {
                    return Err(Error::Unexpected("DataChunk outside DATA"));
                };
                if body.error.is_none() {
                    if body.writer.size() + data.len() as u64 > max {
                        body.error = Some("message too big".into());
                    } else if let Err(e) = tokio::task::block_in_place(|| body.writer.write(&data))
                    {
                        tracing::error!(id = %body.id, "queue write failed: {e}");
                        body.error = Some(format!("queue write failed: {e}"));
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
        if let Some(reason) = error {
            self.queue.release_id(&id);
            return Ok(SubmitReply::Failed { reason });
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
            drop(body.writer);
            self.queue.release_id(&body.id);
        }
    }
}
