//! The put: a received message becomes a queued one, durably, before its
//! 250.

use std::sync::Arc;

use tambo_proto::metrics::{self, names};

use super::{Answers, FromSession, Origin, PutError, Queue, now_ms};
use crate::item::{FORMAT_VERSION, Item};
use crate::policy::Policy;

impl Queue {
    /// Turns a fully received body ([`FromSession::body`], or its `d:`
    /// file) into a queued message: resolves the recipients, writes the
    /// body and its item durably ([`Spool::write_new`]) and starts its
    /// send loop. When this returns Ok the message survives a crash.
    pub async fn put(
        self: &Arc<Self>,
        id: String,
        from: String,
        rcpts: Vec<String>,
        client: String,
        bypass_limit: bool,
        session: FromSession,
    ) -> Result<(), PutError> {
        let mut trace = tambo_proto::trace::Trace::new("Queue.Put", format!("{id} from=<{from}>"));
        trace.event(format!("{} recipients, from {client}", rcpts.len()));
        let r = self
            .put_traced(id, from, rcpts, client, bypass_limit, session, &mut trace)
            .await;
        match &r {
            Ok(()) => trace.event("queued"),
            Err(e) => trace.error(format!("refused: {e}")),
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn put_traced(
        self: &Arc<Self>,
        id: String,
        from: String,
        rcpts: Vec<String>,
        client: String,
        bypass_limit: bool,
        session: FromSession,
        trace: &mut tambo_proto::trace::Trace,
    ) -> Result<(), PutError> {
        // Checked again now that the body is in: DATA transfers that ran
        // concurrently must not push the queue past its limit.
        if !bypass_limit && self.ids().items.len() as u64 >= self.cfg.max_queue_items {
            return Err(PutError::Full);
        }
        let domains = self.domains();
        let policy = Policy {
            cfg: &self.cfg,
            domains: &domains,
        };
        // Internal mail (DSNs) passes the same existence rule as an RCPT:
        // it never creates a mailbox for an address nobody configured.
        let rcpts: Vec<String> = if bypass_limit {
            let mut kept = Vec::with_capacity(rcpts.len());
            for r in rcpts {
                let what = format!("{id}: internal message to <{r}>");
                let ok = self.lookup(policy.deliverable(&r), &what).await?;
                if ok {
                    kept.push(r);
                } else {
                    tracing::warn!(%id, "internal message to <{r}> dropped: no such local address");
                }
            }
            kept
        } else {
            rcpts
        };
        if rcpts.is_empty() {
            return Err(PutError::NoRecipients);
        }
        let mut recipients = Vec::new();
        let mut answers = Answers {
            hook: session.hook_answers,
            deadline: session.deadline,
            ..Answers::default()
        };
        for r in &rcpts {
            recipients.extend(self.resolve(&policy, r, &mut answers).await?);
        }
        trace.event(format!("resolved to {} recipients", recipients.len()));
        let item = Item {
            version: FORMAT_VERSION,
            id: id.clone(),
            from,
            rcpt_to: rcpts,
            created_ms: now_ms(),
            client,
            recipients,
            // Set as it is written.
            body_len: None,
            rewritten: false,
        };
        // Past this, smtpd may have given up waiting and told the client
        // to try again: a message queued now would arrive twice.
        if session
            .deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
        {
            return Err(PutError::TooLate);
        }
        let spool = self.spool.clone();
        let dirsync = self.dirsync.clone();
        let body = session.body;
        let deadline = session.deadline;
        // The message's file (body and item: `Spool::write_new`) and, if
        // a name was made, the directory are fsync'd at once, each on its
        // own thread, so they share one journal commit. Nobody is told
        // before both are done; a crash before that leaves a body shorter
        // than its item records (removed at the next start) or without
        // its item (set aside then).
        let mut item = item;
        let written = tokio::task::spawn_blocking(move || -> Result<Item, PutError> {
            let late = || deadline.is_some_and(|d| std::time::Instant::now() >= d);
            let done = spool
                .write_new(body, &mut item, || dirsync.request())
                .map_err(PutError::from)
                .and_then(|dir| {
                    match dir {
                        Some(dir) => dir.wait()?,
                        // A ready file's name was durable before; but once
                        // a directory fsync has failed, nothing new is
                        // acknowledged until queued restarts.
                        None if dirsync.has_failed() => return Err(PutError::Unsynced),
                        None => {}
                    }
                    // The fsyncs may have been slow: checked again, for
                    // the same reason as above.
                    if late() {
                        return Err(PutError::TooLate);
                    }
                    Ok(())
                });
            if done.is_err() {
                // Possibly whole on disk, and nobody will be told: removed
                // (made durable below) so that it cannot come back.
                if let Err(e) = spool.unlink(&item.id) {
                    tracing::error!(id = %item.id, "cannot remove a message whose put failed (it may be delivered although the client was told to retry): {e}");
                }
            }
            done.map(|()| item)
        })
        .await
        .map_err(|e| PutError::from(std::io::Error::other(e.to_string())))
        .and_then(|r| r);
        let item = match written {
            Ok(item) => item,
            Err(e) => {
                // What a failed or late write left was removed: durably,
                // or the queue stops taking mail (a failed directory
                // fsync).
                let _ = self.dirsync.sync().await;
                return Err(e);
            }
        };
        metrics::inc(names::QUEUE_ITEMS_WRITTEN);
        metrics::inc(names::QUEUE_PUT_COUNT);
        crate::maillog::queued(&item.id, &item.from, &item.client, &item.rcpt_to);
        let origin = if bypass_limit {
            Origin::Internal
        } else {
            Origin::Received
        };
        self.start(item, origin);
        Ok(())
    }
}
