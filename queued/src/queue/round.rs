//! One round of delivery attempts for an item (REFERENCE §3.3): the
//! pending recipients grouped into jobs by destination, handed to deliverd,
//! and their outcomes recorded.

use std::collections::HashMap;

use tokio::task::JoinSet;

use tambo_common::address;
use tambo_proto::deliver::{Job, MAX_JOB_ADDRESS_BYTES, MAX_RECIPIENTS_PER_JOB, Outcome, Target};
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
                let job = self.job(item, from, &[idx], target);
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
                // One spelling per domain (Unicode, as chasquid keys its
                // domaininfo), so `bücher.example` and its A-label share a
                // security record.
                let raw = address::split(&r.address).1;
                let domain = address::normalize_domain(raw).unwrap_or_else(|_| raw.to_lowercase());
                groups.entry((target, from, domain)).or_default().push(idx);
            } else {
                let job = self.job(item, from, &[idx], target);
                let rx = self.dispatcher.submit(job, body.clone());
                attempts.spawn(async move {
                    let result = rx
                        .await
                        .unwrap_or_else(|_| JobResult::temp_fail(1, "delivery was abandoned"));
                    (vec![idx], result)
                });
            }
        }
        for ((target, from, domain), group) in groups {
            let addresses: Vec<&str> = group
                .iter()
                .map(|&i| item.recipients[i].address.as_str())
                .collect();
            // What else the job frame carries (sender, via list, domain)
            // comes out of the address budget.
            let overhead = from.len()
                + domain.len()
                + match &target {
                    Target::Forward(via) => via.iter().map(|v| v.len() + 8).sum(),
                    _ => 0,
                };
            let budget = MAX_JOB_ADDRESS_BYTES.saturating_sub(overhead).max(1024);
            for range in chunks(&addresses, budget) {
                let idxs = group[range].to_vec();
                let mut job = self.job(item, from.clone(), &idxs, target.clone());
                if matches!(job.target, Target::Remote | Target::Forward(_)) {
                    let recorded = self.domaininfo.get(&domain).outgoing;
                    job.security = Some((domain.clone(), recorded));
                }
                let rx = self.dispatcher.submit(job, body.clone());
                let (n, domaininfo, domain) = (idxs.len(), self.domaininfo.clone(), domain.clone());
                attempts.spawn(async move {
                    let result = rx
                        .await
                        .unwrap_or_else(|_| JobResult::temp_fail(n, "delivery was abandoned"));
                    if let Some(seen) = result.seen {
                        // deliverd held the connection to the record it was
                        // given; this records a raise (a lower level means
                        // the record rose meanwhile, and changes nothing).
                        // The write fsyncs: off the runtime's threads.
                        let _ = tokio::task::spawn_blocking(move || {
                            domaininfo.check(&domain, Direction::Outgoing, seen)
                        })
                        .await;
                    }
                    (idxs, result)
                });
            }
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
                        r.uncertain = false;
                        tracing::info!(id = %item.id, "{} from=<{}> to=<{}> sent", item.id, item.from, r.address);
                        crate::maillog::sent(&item.id, &item.from, &r.address);
                    }
                    Outcome::TempFail(text) => {
                        // Perhaps delivered all the same (deliverd died
                        // after writing): the next attempt checks.
                        r.uncertain = true;
                        tracing::info!(id = %item.id, "{} from=<{}> to=<{}> failed (temporary): {text}", item.id, item.from, r.address);
                        crate::maillog::failed(&item.id, &item.from, &r.address, false, &text);
                        r.last_failure = text;
                        r.permanent = false;
                    }
                    Outcome::PermFail(text) => {
                        tracing::info!(id = %item.id, "{} from=<{}> to=<{}> failed (permanent): {text}", item.id, item.from, r.address);
                        crate::maillog::failed(&item.id, &item.from, &r.address, true, &text);
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

    /// The job for the item's recipients at `idxs`.
    pub(super) fn job(&self, item: &Item, from: String, idxs: &[usize], target: Target) -> Job {
        let rcpts = idxs.iter().filter_map(|&i| item.recipients.get(i));
        Job {
            job: 0,
            queue_id: item.id.clone(),
            from,
            to: rcpts.clone().map(|r| r.address.clone()).collect(),
            target,
            security: None,
            maybe_delivered: rcpts.clone().any(|r| r.uncertain),
            positions: idxs.iter().map(|&i| i as u32).collect(),
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

/// Splits a destination's recipients into jobs: at most
/// [`MAX_RECIPIENTS_PER_JOB`] recipients and `budget` bytes of addresses
/// each (one address alone always makes a job), in order.
pub fn chunks(addresses: &[&str], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, a) in addresses.iter().enumerate() {
        let full = i - start >= MAX_RECIPIENTS_PER_JOB || bytes + a.len() > budget;
        if i > start && full {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += a.len();
    }
    if start < addresses.len() {
        out.push(start..addresses.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_destinations_are_split_into_jobs_that_fit() {
        assert!(chunks(&[], MAX_JOB_ADDRESS_BYTES).is_empty());
        assert_eq!(
            chunks(&["a@x", "b@x"], MAX_JOB_ADDRESS_BYTES),
            vec![std::ops::Range { start: 0, end: 2 }]
        );
        let many: Vec<String> = (0..120).map(|i| format!("user{i}@example.org")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            chunks(&refs, MAX_JOB_ADDRESS_BYTES),
            [0..50, 50..100, 100..120]
        );
        // Long addresses: by bytes before count.
        let long: Vec<String> = (0..10)
            .map(|i| format!("{i}{}@x", "a".repeat(997)))
            .collect();
        let refs: Vec<&str> = long.iter().map(String::as_str).collect();
        let got = chunks(&refs, MAX_JOB_ADDRESS_BYTES);
        assert_eq!(got.len(), 3);
        assert_eq!(got.iter().map(|r| r.len()).sum::<usize>(), 10);
        for r in &got {
            let bytes: usize = refs[r.clone()].iter().map(|a| a.len()).sum();
            assert!(bytes <= MAX_JOB_ADDRESS_BYTES);
        }
        // A job of the biggest chunk, with the longest sender and a long via
        // list, fits in a frame.
        let job = tambo_proto::deliver::Job {
            job: u64::MAX,
            queue_id: "x".repeat(11),
            from: "s".repeat(1000),
            to: refs[got[0].clone()].iter().map(|s| s.to_string()).collect(),
            target: Target::Forward(vec!["h".repeat(255); 4]),
            security: Some(("d".repeat(255), tambo_proto::deliver::SecLevel::TlsSecure)),
            maybe_delivered: true,
            positions: (0..got[0].len() as u32).collect(),
        };
        let frame =
            tambo_proto::frame::encode(&tambo_proto::deliver::ToDeliverd::Job(job)).unwrap();
        assert!(
            frame.len() - 4 <= tambo_proto::frame::MAX_SMALL_FRAME,
            "{}",
            frame.len()
        );
    }
}
