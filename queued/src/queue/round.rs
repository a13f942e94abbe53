//! One round of delivery attempts for an item (REFERENCE §3.3): the
//! pending recipients grouped into jobs by destination, handed to deliverd,
//! and their outcomes recorded.

use std::collections::HashMap;

use tokio::task::JoinSet;

use tambo_common::address;
use tambo_proto::deliver::{Job, Outcome, Target};
use tambo_proto::metrics::{self, names};

use super::{Queue, dovecot_knows};
use crate::dispatch::JobResult;
use crate::domaininfo::Direction;
use crate::item::{Item, Kind, Status};
use crate::policy::{Lookup, Policy};
use crate::srs;

impl Queue {
    /// Tries every pending recipient once, in parallel up to deliverd's
    /// slots; rewrites the item after each attempt. Recipients that go
    /// the same way (one remote domain or `via` list, with the same
    /// envelope sender) share one job, so one SMTP transaction.
    pub(super) async fn round(&self, item: &mut Item) {
        let body = self.spool.body_path(&item.id);
        let domains = self.domains();
        let policy = Policy {
            cfg: &self.cfg,
            domains: &domains,
        };
        let mut attempts: JoinSet<(Vec<usize>, JobResult)> = JoinSet::new();
        let mut groups: HashMap<(Target, String, String), Vec<usize>> = HashMap::new();
        for (idx, r) in item.pending() {
            // A local address that is no user (unknown after alias
            // resolution, or in a domain with no users, like `localhost`)
            // fails here: deliverd never creates a mailbox the config does
            // not imply. Dovecot's users count (REFERENCE §5.3).
            let no_such_user = || format!("550 5.1.1 <{}>: no such user here", r.address);
            let ask = if r.kind == Kind::Email && r.local {
                match policy.is_user(&r.address) {
                    Lookup::Yes => None,
                    Lookup::No => {
                        let text = no_such_user();
                        attempts.spawn(async move { (vec![idx], JobResult::perm_fail(1, &text)) });
                        continue;
                    }
                    Lookup::AskDovecot(id) => Some(id),
                }
            } else {
                None
            };
            let target = match &r.kind {
                Kind::Email if r.local => Target::Local,
                Kind::Email => Target::Remote,
                Kind::Pipe => Target::Pipe(r.address.clone()),
                Kind::Forward { via } => Target::Forward(via.clone()),
            };
            let from = srs::envelope_sender(&item.from, r, &domains);
            if let Some(dovecot_id) = ask {
                // Asked here, in the attempt's own task, so a slow Dovecot
                // delays this recipient only.
                let job = self.job(item, from, vec![r.address.clone()], target);
                let (dovecot, dispatcher, body) =
                    (self.dovecot.clone(), self.dispatcher.clone(), body.clone());
                let (text, qid) = (no_such_user(), item.id.clone());
                attempts.spawn(async move {
                    let result = match dovecot_knows(dovecot.as_deref(), &dovecot_id).await {
                        Ok(true) => dispatcher
                            .submit(job, body)
                            .await
                            .unwrap_or_else(|_| JobResult::temp_fail(1, "delivery was abandoned")),
                        Ok(false) => JobResult::perm_fail(1, &text),
                        Err(e) => {
                            tracing::warn!(id = %qid, "cannot ask Dovecot whether {dovecot_id} is a user: {e}");
                            // No path or socket detail: this text can end
                            // up in a DSN to an outside sender.
                            JobResult::temp_fail(
                                1,
                                "451 4.4.3 temporary error checking the recipient",
                            )
                        }
                    };
                    (vec![idx], result)
                });
                continue;
            }
            let shared = match &target {
                Target::Remote | Target::Forward(_) => true,
                // LMTP takes every local recipient in one transaction.
                Target::Local => self.cfg.tambo.lmtp_address.is_some(),
                Target::Pipe(_) => false,
            };
            if shared {
                let domain = address::split(&r.address).1.to_lowercase();
                groups.entry((target, from, domain)).or_default().push(idx);
            } else {
                let job = self.job(item, from, vec![r.address.clone()], target);
                let rx = self.dispatcher.submit(job, body.clone());
                attempts.spawn(async move {
                    let result = rx
                        .await
                        .unwrap_or_else(|_| JobResult::temp_fail(1, "delivery was abandoned"));
                    (vec![idx], result)
                });
            }
        }
        for ((target, from, domain), idxs) in groups {
            let to = idxs
                .iter()
                .map(|&i| item.recipients[i].address.clone())
                .collect();
            let mut job = self.job(item, from, to, target);
            if matches!(job.target, Target::Remote | Target::Forward(_)) {
                let recorded = self.domaininfo.get(&domain).outgoing;
                job.security = Some((domain.clone(), recorded));
            }
            let rx = self.dispatcher.submit(job, body.clone());
            let (n, domaininfo) = (idxs.len(), self.domaininfo.clone());
            attempts.spawn(async move {
                let result = rx
                    .await
                    .unwrap_or_else(|_| JobResult::temp_fail(n, "delivery was abandoned"));
                if let Some(seen) = result.seen {
                    // deliverd held the connection to the record it was
                    // given; this records a raise (a lower level means the
                    // record rose meanwhile, and changes nothing).
                    domaininfo.check(&domain, Direction::Outgoing, seen);
                }
                (idxs, result)
            });
        }
        while let Some(res) = attempts.join_next().await {
            let Ok((idxs, result)) = res else { continue };
            for (idx, outcome) in idxs.into_iter().zip(result.outcomes) {
                let Some(r) = item.recipients.get_mut(idx) else {
                    continue;
                };
                match outcome {
                    Outcome::Delivered => {
                        r.status = Status::Sent;
                        tracing::info!(id = %item.id, "{} from=<{}> to=<{}> sent", item.id, item.from, r.address);
                    }
                    Outcome::TempFail(text) => {
                        tracing::info!(id = %item.id, "{} from=<{}> to=<{}> failed (temporary): {text}", item.id, item.from, r.address);
                        r.last_failure = text;
                        r.permanent = false;
                    }
                    Outcome::PermFail(text) => {
                        tracing::info!(id = %item.id, "{} from=<{}> to=<{}> failed (permanent): {text}", item.id, item.from, r.address);
                        r.status = Status::Failed;
                        r.last_failure = text;
                        r.permanent = true;
                    }
                }
            }
            // An item with nothing pending is about to be finished and
            // deleted: rewriting it first would cost a file and two fsyncs
            // for nothing, since a crash before the deletion is durable
            // repeats the same deliveries either way.
            if item.pending().next().is_some() {
                self.rewrite(item).await;
            }
        }
    }

    pub(super) fn job(&self, item: &Item, from: String, to: Vec<String>, target: Target) -> Job {
        Job {
            job: 0,
            queue_id: item.id.clone(),
            from,
            to,
            target,
            security: None,
        }
    }

    pub(super) async fn rewrite(&self, item: &Item) {
        let spool = self.spool.clone();
        let copy = item.clone();
        let staged = tokio::task::spawn_blocking(move || spool.stage_item(&copy))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match staged {
            Ok(()) => match self.dirsync.sync().await {
                Ok(()) => metrics::inc(names::QUEUE_ITEMS_WRITTEN),
                Err(e) => tracing::error!(id = %item.id, "cannot sync the queue directory: {e}"),
            },
            // The old state stays on disk: at worst a recipient is tried
            // again after a restart, never lost.
            Err(e) => tracing::error!(id = %item.id, "cannot rewrite queue item: {e}"),
        }
    }
}
