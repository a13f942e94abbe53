//! Finishing an item: the DSN when something failed (durably, before the
//! item goes), then the item's removal (REFERENCE §3.4).

use std::sync::Arc;
use std::time::Duration;

use tambo_common::duration;
use tambo_proto::metrics::{self, names};

use super::{FromSession, PutError, Queue};
use crate::dsn;
use crate::item::{Item, Status};
use crate::policy::Policy;
use crate::spool::BodyWriter;

impl Queue {
    /// Sends the DSN if needed and `dsn` (false only for a silent
    /// `tambo queue remove`), durably, before anything is removed; then
    /// deletes the item.
    pub(super) async fn finish(self: &Arc<Self>, item: Item, dsn: bool) {
        let needs_dsn = dsn
            && !item.from.is_empty()
            && item.recipients.iter().any(|r| r.status != Status::Sent);
        if needs_dsn {
            // Until the DSN is safely queued, the original stays.
            let mut wait = Duration::from_secs(1);
            loop {
                match self.queue_dsn(&item).await {
                    Ok(()) => break,
                    // The sender address cannot be resolved: no retry will
                    // change that, so the DSN is dropped, not the queue slot
                    // held forever.
                    Err(PutError::Resolve(e)) => {
                        tracing::error!(id = %item.id, "no DSN possible for sender <{}>: {e}", item.from);
                        break;
                    }
                    // The sender stopped existing (a reload) between the
                    // check in queue_dsn and the put: same as never there.
                    Err(PutError::NoRecipients) => {
                        metrics::inc(names::QUEUE_DSNS_DROPPED);
                        tracing::warn!(id = %item.id, "no DSN: the sender <{}> does not exist", item.from);
                        break;
                    }
                    Err(e) => {
                        tracing::error!(id = %item.id, "cannot queue the DSN: {e}; retrying in {}", duration::format(wait));
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(300));
                    }
                }
            }
        }
        let spool = self.spool.clone();
        let id = item.id.clone();
        let removed = tokio::task::spawn_blocking(move || spool.unlink(&id))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match removed {
            Err(e) => tracing::error!(id = %item.id, "cannot remove finished item: {e}"),
            // Nobody waits for a removal to be durable (dirsync::SOON).
            Ok(()) => self.dirsync.sync_soon(),
        }
        self.ids().items.remove(&item.id);
        tracing::info!(id = %item.id, "{} from=<{}> all done", item.id, item.from);
        crate::maillog::done(&item.id, &item.from);
    }

    pub(super) async fn queue_dsn(self: &Arc<Self>, item: &Item) -> Result<(), PutError> {
        let domains = self.domains();
        let deliverable = Policy {
            cfg: &self.cfg,
            domains: &domains,
        }
        .deliverable(&item.from);
        // A Dovecot error is retried, like any failed DSN put.
        let what = format!("{}: DSN to <{}>", item.id, item.from);
        let deliverable = self.lookup(deliverable, &what).await?;
        if !deliverable {
            metrics::inc(names::QUEUE_DSNS_DROPPED);
            tracing::warn!(
                id = %item.id,
                "{} no DSN: the sender <{}> is in a local domain but does not exist",
                item.id,
                item.from
            );
            return Ok(());
        }
        let our_domain = dsn::our_domain(item, |d| domains.is_local(d), &self.cfg.hostname);
        let dsn_id = self.reserve_id(true)?;
        let w = match self.body_writer(&dsn_id) {
            Ok(w) => w,
            Err(e) => {
                self.release_id(&dsn_id);
                return Err(e.into());
            }
        };
        let spool = self.spool.clone();
        let hostname = self.cfg.hostname.clone();
        let date = chrono::Local::now()
            .format("%a, %d %b %Y %H:%M:%S %z")
            .to_string();
        let (id2, item2, dkim) = (dsn_id.clone(), item.clone(), self.dkim.clone());
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<BodyWriter> {
            let original = match spool.open_body(&item2.id) {
                Ok(f) => dsn::read_original(f)?,
                Err(_) => Vec::new(),
            };
            let msg = dsn::build(&dsn::DsnInput {
                item: &item2,
                dsn_id: &id2,
                hostname: &hostname,
                our_domain: &our_domain,
                original: &original,
                date: &date,
            });
            // Signed with our domain's keys, if it has any (REFERENCE
            // §3.4); an unsigned DSN is still better than none.
            let signatures = dkim.sign(&our_domain, &msg).unwrap_or_else(|e| {
                metrics::inc(names::SMTP_IN_DKIM_SIGN_ERRORS);
                tracing::error!(id = %item2.id, "DSN not DKIM-signed: {e}");
                Vec::new()
            });
            let mut w = w;
            w.write(&signatures)?;
            w.write(&msg)?;
            Ok(w)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()));
        let body = match written.and_then(|r| r) {
            Ok(w) => w,
            Err(e) => {
                self.release_id(&dsn_id);
                return Err(e.into());
            }
        };
        match self
            .put(
                dsn_id.clone(),
                String::new(),
                vec![item.from.clone()],
                "local".into(),
                true,
                FromSession {
                    body: Some(body),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(()) => {
                metrics::inc(names::QUEUE_DSN_QUEUED);
                tracing::info!(id = %item.id, "{} DSN queued as {dsn_id}", item.id);
                Ok(())
            }
            Err(e) => {
                self.release_id(&dsn_id);
                Err(e)
            }
        }
    }
}
