//! DATA: the body is read to its terminator and streamed to queued in
//! chunks as it arrives, so smtpd never holds more than one chunk. The
//! header section is checked on the way (`crate::headers`).

use std::time::Instant;

use tokio::io::AsyncBufReadExt;

use tambo_proto::frame::CHUNK_SIZE;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{SubmitReply, SubmitRequest};

use super::{MAX_RECEIVED, Next, Session};
use crate::dotreader::{DotDecoder, DotError, Progress};
use crate::headers::{HeaderError, HeaderScan};
use crate::received::{self, ReceivedInfo};
use crate::spf::{self, HeaderInfo};

enum BodyOutcome {
    Complete,
    TooBig,
    /// The header section does not parse.
    Unparseable(HeaderError),
    Loop,
    BareLineEnding,
    /// The whole session ran out of time.
    Lifetime,
    /// The client sent nothing for a command timeout in the middle of the
    /// body.
    Idle,
    ClientGone,
    QueueLost,
}

impl Session {
    pub(super) async fn data(&mut self) -> Next {
        if self.ehlo.is_none() {
            self.reply(503, "5.5.1", "Invalid command: say hello first");
            return Next::Continue;
        }
        let Some(from) = self.mail_from.clone() else {
            self.reply(503, "5.5.1", "Invalid command: sender not given yet");
            return Next::Continue;
        };
        if self.rcpts == 0 {
            self.reply(503, "5.5.1", "Invalid command: no valid recipients");
            return Next::Continue;
        }
        let Some(queue) = self.queue.as_mut() else {
            return self.queue_lost();
        };
        // Asked now and answered while the 354 goes out: queued's answer
        // is back before the client's first bytes, so a message costs one
        // wait for queued fewer. The price: a refusal (queue full, too
        // much in flight) is given once the body has been read, as a
        // refusal at its end is.
        if let Err(e) = queue.send(&SubmitRequest::DataBegin).await {
            tracing::error!(peer = %self.peer, "queued link failed at DATA: {e}");
            return self.queue_lost();
        }
        self.reply(354, "", "Go ahead; end data with <CR><LF>.<CR><LF>");
        let flushed = self.flush().await;
        let Some(queue) = self.queue.as_mut() else {
            return self.queue_lost();
        };
        let refused = match queue.reply().await {
            Ok(SubmitReply::DataReady) => None,
            Ok(reply) => Some(reply),
            Err(e) => {
                tracing::error!(peer = %self.peer, "queued link failed at DATA: {e}");
                return self.queue_lost();
            }
        };
        if flushed.is_err() {
            if refused.is_none() {
                let _ = queue.send(&SubmitRequest::DataAbort).await;
            }
            return Next::Close;
        }
        let received = received::header(&ReceivedInfo {
            ehlo: self.ehlo.as_deref().unwrap_or("unknown"),
            esmtp: self.esmtp,
            client: self.peer,
            hostname: &self.hostname,
            mode: self.cfg.mode,
            from: &from,
            tls: self
                .tls
                .as_ref()
                .map(|t| (t.version.as_str(), t.cipher.as_str())),
            authenticated: self.auth.is_some(),
        });
        // Received-SPF goes directly above Received (REFERENCE §2.8 step
        // 4); queued adds what goes above both.
        let mut headers = match &self.spf {
            Some(report) => spf::received_spf(
                report,
                &HeaderInfo {
                    client: self.peer.ip(),
                    sender: &from,
                    helo: self.ehlo.as_deref(),
                    receiver: &self.hostname,
                },
            ),
            None => String::new(),
        };
        headers.push_str(&received);
        let deadline = self.started + self.cfg.lifetime;
        let outcome = self
            .stream_body(headers.into_bytes(), deadline, refused.is_none())
            .await;
        // The final reply to message content clears the envelope, whatever
        // it was (REFERENCE §2.3); the mail log still names it.
        self.answered = (self.mail_from.take(), std::mem::take(&mut self.accepted));
        self.rcpts = 0;
        self.spf = None;
        match (outcome, refused) {
            // Read whole, for nothing: queued refused it at its start.
            (BodyOutcome::Complete, Some(reply)) => {
                self.refused_by_queue(&reply, "DATA");
                Next::Continue
            }
            (outcome, _) => self.body_read(outcome).await,
        }
    }

    /// Answers a body read to its end (or not), which queued was told
    /// about as it came.
    async fn body_read(&mut self, outcome: BodyOutcome) -> Next {
        match outcome {
            BodyOutcome::Complete => {
                let Some(queue) = self.queue.as_mut() else {
                    return self.queue_lost();
                };
                match queue.call(&SubmitRequest::DataEnd).await {
                    Ok(SubmitReply::Queued { id }) => {
                        let text = format!("Queued as {id}");
                        self.reply(250, "2.0.0", &text);
                        Next::Continue
                    }
                    Ok(reply) => {
                        self.refused_by_queue(&reply, "end of DATA");
                        Next::Continue
                    }
                    Err(e) => {
                        tracing::error!(peer = %self.peer, "queued link failed at end of DATA: {e}");
                        self.queue_lost()
                    }
                }
            }
            BodyOutcome::TooBig => {
                self.reply(552, "5.3.4", "Message too big");
                Next::Continue
            }
            BodyOutcome::Unparseable(e) => {
                tracing::info!(peer = %self.peer, "refused an unparseable message: {e}");
                let text = format!("Unparseable message: {e}");
                self.reply(554, "5.6.0", &text);
                Next::Continue
            }
            BodyOutcome::Loop => {
                metrics::inc(names::SMTP_IN_LOOPS_DETECTED);
                self.reply(554, "5.4.6", "Loop detected (too many Received headers)");
                Next::Continue
            }
            BodyOutcome::BareLineEnding => {
                self.reply(
                    521,
                    "5.5.2",
                    "Invalid line ending: only CRLF is accepted, closing",
                );
                Next::Close
            }
            BodyOutcome::Lifetime => {
                self.reply(
                    421,
                    "4.4.2",
                    "Connection lifetime exceeded during DATA, closing",
                );
                Next::Close
            }
            BodyOutcome::Idle => {
                self.reply(421, "4.4.2", "Timed out waiting for data, closing");
                Next::Close
            }
            BodyOutcome::ClientGone => Next::Close,
            BodyOutcome::QueueLost => self.queue_lost(),
        }
    }

    /// Answers a queue refusal at DATA or its end. The reason is logged;
    /// the client gets a fixed text, never queued's internal details.
    fn refused_by_queue(&mut self, reply: &SubmitReply, stage: &str) {
        match reply {
            SubmitReply::NoSpace { reason } => {
                tracing::warn!(peer = %self.peer, "queue refused the message at {stage}: {reason}");
                self.reply(
                    452,
                    "4.3.1",
                    "Too much mail being received right now, try again later",
                );
            }
            SubmitReply::HookRejected { permanent, text } => {
                tracing::info!(peer = %self.peer, "the post-data hook refused the message at {stage}");
                let (code, enhanced) = if *permanent {
                    (554, "5.7.1")
                } else {
                    (451, "4.7.1")
                };
                self.hook_reply(code, enhanced, text);
            }
            SubmitReply::Failed { reason } => {
                tracing::warn!(peer = %self.peer, "queue refused the message at {stage}: {reason}");
                self.reply(451, "4.3.0", "Could not queue the message, try again later");
            }
            other => {
                tracing::warn!(peer = %self.peer, "queued answered {stage} with {other:?}");
                self.reply(451, "4.3.0", "Temporary error, try again later");
            }
        }
    }

    /// Reads the message to its terminator, sending it to queued in chunks
    /// as it arrives (unless `forward` is false: queued refused it, and it
    /// is only read, to stay in step with the client); smtpd never holds
    /// more than a chunk. Each read must make progress within the command
    /// timeout, and the whole body arrive before the session's `deadline`.
    /// Only reads are timed, never a write to queued, so a frame is never
    /// cut in half.
    async fn stream_body(
        &mut self,
        first: Vec<u8>,
        deadline: Instant,
        forward: bool,
    ) -> BodyOutcome {
        let idle = self.cfg.command_timeout;
        let every = self.cfg.link_keepalive;
        let mut dec = DotDecoder::new();
        let mut headers = HeaderScan::default();
        let mut chunk = first;
        let mut sending = forward;
        let mut result = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                result = Some(BodyOutcome::Lifetime);
                break;
            }
            let limit = now + idle.min(deadline - now);
            // While the client is slow, keep the link alive with what has
            // been decoded so far (possibly nothing): queued closes links
            // that stay quiet for long.
            let queue = &mut self.queue;
            let Some(q) = queue.as_mut() else {
                return BodyOutcome::QueueLost;
            };
            // A client that trickles a few bytes at a time keeps smtpd
            // reading but may leave the link to queued quiet for long: what
            // was decoded so far goes out whenever the link is due, and the
            // timer is the link's, not reset by each read.
            if q.quiet_for() >= every
                && q.keep_alive_in_data(due(sending, forward, &mut chunk))
                    .await
                    .is_err()
            {
                return BodyOutcome::QueueLost;
            }
            let read = tokio::time::timeout_at(limit.into(), self.conn.fill_buf());
            tokio::pin!(read);
            let got = loop {
                tokio::select! {
                    r = &mut read => break r,
                    _ = tokio::time::sleep_until(q.keepalive_due(every)) => {
                        let data = due(sending, forward, &mut chunk);
                        if q.keep_alive_in_data(data).await.is_err() {
                            return BodyOutcome::QueueLost;
                        }
                    }
                }
            };
            let buf = match got {
                Err(_) => {
                    result = Some(if Instant::now() >= deadline {
                        BodyOutcome::Lifetime
                    } else {
                        BodyOutcome::Idle
                    });
                    break;
                }
                Ok(Ok([])) | Ok(Err(_)) => {
                    result = Some(BodyOutcome::ClientGone);
                    break;
                }
                Ok(Ok(b)) => b,
            };
            let before = chunk.len();
            let progress = dec.feed(buf, &mut chunk);
            headers.scan(&chunk[before..]);
            let (consumed, done) = match progress {
                Ok(Progress::More) => (buf.len(), false),
                Ok(Progress::End(n)) => (n, true),
                Err(DotError::BareLineEnding) => {
                    result = Some(BodyOutcome::BareLineEnding);
                    break;
                }
            };
            self.conn.consume(consumed);
            if sending && dec.size() > self.cfg.max_data_size {
                // Over the limit: stop forwarding but read on to the real
                // terminator, so the session stays in sync.
                sending = false;
                result = Some(BodyOutcome::TooBig);
            }
            if sending && let Some(e) = headers.error() {
                // Like an oversized message: read on to the terminator.
                sending = false;
                result = Some(BodyOutcome::Unparseable(e));
            }
            if sending && headers.received() > MAX_RECEIVED {
                sending = false;
                result = Some(BodyOutcome::Loop);
            }
            if !sending {
                chunk.clear();
            }
            // Chunks of exactly CHUNK_SIZE (the last one shorter): queued
            // refuses larger frames.
            while chunk.len() >= CHUNK_SIZE || (done && !chunk.is_empty()) {
                let rest = if chunk.len() > CHUNK_SIZE {
                    chunk.split_off(CHUNK_SIZE)
                } else {
                    Vec::new()
                };
                let data = std::mem::replace(&mut chunk, rest);
                let Some(q) = self.queue.as_mut() else {
                    return BodyOutcome::QueueLost;
                };
                let req = SubmitRequest::DataChunk(data);
                // The last one goes with what follows it (its end, or an
                // abort), which is sent next whatever happens.
                let sent = if done && chunk.is_empty() {
                    q.hold(&req)
                } else {
                    q.send(&req).await
                };
                if sent.is_err() {
                    return BodyOutcome::QueueLost;
                }
            }
            if done {
                break;
            }
        }
        match result {
            None => BodyOutcome::Complete,
            Some(r) if !forward => r,
            Some(r) => {
                let Some(q) = self.queue.as_mut() else {
                    return BodyOutcome::QueueLost;
                };
                if q.send(&SubmitRequest::DataAbort).await.is_err() {
                    return BodyOutcome::QueueLost;
                }
                r
            }
        }
    }
}

/// What a keepalive inside DATA carries: the body decoded so far while it
/// goes to queued, nothing once it stopped going (too big, bad headers),
/// and no chunk at all (a ping) if queued refused it at its start.
fn due(sending: bool, forward: bool, chunk: &mut Vec<u8>) -> Option<Vec<u8>> {
    match (sending, forward) {
        (true, _) => Some(std::mem::take(chunk)),
        (false, true) => Some(Vec::new()),
        (false, false) => None,
    }
}
