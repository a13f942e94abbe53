//! The queue: putting messages in, one send loop per item, finishing
//! items (with a DSN when something failed).
//!
//! Each item is owned by its send loop (as in chasquid's `SendLoop`); the
//! shared state is only the set of live IDs. Disk work runs on the
//! blocking pool.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;

use tambo_common::address;
use tambo_common::config::Config;
use tambo_common::domains::Domains;
use tambo_common::duration;
use tambo_proto::deliver::{Job, Outcome, Target};
use tambo_proto::metrics::{self, names};

use crate::dirsync::DirSync;
use crate::dispatch::{Dispatcher, JobResult};
use crate::dkim::DkimKeys;
use crate::domaininfo::{Direction, DomainInfo};
use crate::dovecot::{self, Dovecot};
use crate::dsn;
use crate::item::{self, FORMAT_VERSION, Item, Kind, Status};
use crate::policy::{Lookup, Policy, Unresolved};
use crate::retry::Schedule;
use crate::spool::Spool;
use crate::srs;

pub struct Queue {
    pub cfg: Arc<Config>,
    domains: RwLock<Arc<Domains>>,
    pub spool: Spool,
    dirsync: DirSync,
    /// IDs in use: `items` are queued (they count toward
    /// `max_queue_items`); `reserved` are puts still receiving their body,
    /// which do not, so clients stalling in DATA cannot fill the queue.
    ids: Mutex<Ids>,
    pub dispatcher: Arc<Dispatcher>,
    schedule: Schedule,
    /// Bytes of message bodies being received right now, over all
    /// sessions ([`Queue::reserve_in_flight`]).
    in_flight: AtomicU64,
    /// The fallback for users the files do not have (`dovecot_auth`),
    /// shared by AUTH, RCPT, resolution and the delivery-time user check.
    pub dovecot: Option<Arc<Dovecot>>,
    /// Per-domain security levels (REFERENCE §4.6).
    pub domaininfo: Arc<DomainInfo>,
    /// DKIM keys by domain (REFERENCE §4.9).
    pub dkim: Arc<DkimKeys>,
}

/// Most Dovecot lookups one put may make while resolving its recipients
/// (at most one per address the files do not know behind a catch-all):
/// enough for [`crate::session`]'s 100 recipients and their aliases, and
/// a bound on how long a put can take.
pub const MAX_DOVECOT_LOOKUPS_PER_PUT: usize = 256;

/// Dovecot's answer for `id` in an existence check; "no" when Dovecot is
/// off (the policy only asks when it is on).
pub async fn dovecot_knows(dovecot: Option<&Dovecot>, id: &str) -> Result<bool, dovecot::Error> {
    match dovecot {
        Some(d) => d.exists(id).await,
        None => Ok(false),
    }
}

#[derive(Default)]
struct Ids {
    items: HashSet<String>,
    reserved: HashSet<String>,
}

/// Why a put failed; the client sees a 4xx either way.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("queue is full, try again later")]
    Full,
    #[error(
        "an fsync of the queue directory failed earlier; new mail is refused until queued restarts"
    )]
    Unsynced,
    #[error("no recipient of an internal message exists")]
    NoRecipients,
    #[error("could not resolve recipients: {0}")]
    Resolve(String),
    /// Dovecot could not say whether a recipient is a user; a later try
    /// may work. The details (socket paths) went to queued's log: this
    /// text reaches smtpd.
    #[error("could not check a recipient with Dovecot")]
    Lookup,
    #[error("could not write to the queue: {0}")]
    Io(#[from] std::io::Error),
}

impl Queue {
    /// Must be called inside the runtime (it starts the directory syncer).
    pub fn new(
        cfg: Arc<Config>,
        domains: Domains,
        spool: Spool,
        domaininfo: Arc<DomainInfo>,
        dkim: Arc<DkimKeys>,
    ) -> Self {
        let mut schedule = Schedule::default();
        if let Some(d) = cfg.testing.retry_delays {
            schedule.delays = d;
        }
        if let Some(j) = cfg.testing.retry_jitter {
            schedule.jitter = j;
        }
        let dispatcher = Arc::new(Dispatcher::new(
            cfg.testing.delivery_job_deadline,
            cfg.testing.ipc_idle_timeout,
        ));
        Self {
            domains: RwLock::new(Arc::new(domains)),
            dirsync: DirSync::start(spool.clone()),
            spool,
            ids: Mutex::default(),
            dispatcher,
            schedule,
            in_flight: AtomicU64::new(0),
            dovecot: Dovecot::from_config(&cfg).map(Arc::new),
            domaininfo,
            dkim,
            cfg,
        }
    }

    /// Replaces users and aliases (SIGHUP); the old snapshot stays in use
    /// by whoever holds it.
    pub fn set_domains(&self, domains: Domains) {
        *self.domains.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(domains);
    }

    /// Counts `n` more body bytes in flight; false (and nothing counted)
    /// if that would pass `[tambo] max_data_in_flight_mb`.
    pub fn reserve_in_flight(&self, n: u64) -> bool {
        let max = self.max_in_flight();
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                cur.checked_add(n).filter(|total| *total <= max)
            })
            .is_ok()
    }

    /// Whether no more body bytes fit in flight.
    pub fn in_flight_full(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) >= self.max_in_flight()
    }

    /// `[tambo] max_data_in_flight_mb`, plus room for the headers smtpd
    /// adds: the config only requires it to be at least
    /// `max_data_size_mb`, and a message of exactly that size must fit.
    fn max_in_flight(&self) -> u64 {
        self.cfg.max_data_in_flight() + crate::session::HEADER_ROOM
    }

    /// Gives back body bytes counted by [`Queue::reserve_in_flight`].
    pub fn release_in_flight(&self, n: u64) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                Some(cur.saturating_sub(n))
            });
    }

    /// A policy answer, with Dovecot asked if the files could not tell;
    /// a Dovecot error is logged here, with what was being done (`what`).
    async fn lookup(&self, l: Lookup, what: &str) -> Result<bool, PutError> {
        match l {
            Lookup::Yes => Ok(true),
            Lookup::No => Ok(false),
            Lookup::AskDovecot(id) => {
                dovecot_knows(self.dovecot.as_deref(), &id)
                    .await
                    .map_err(|e| {
                        tracing::warn!("{what}: cannot ask Dovecot whether {id} is a user: {e}");
                        PutError::Lookup
                    })
            }
        }
    }

    /// Resolves one RCPT (REFERENCE §5.3), asking Dovecot whatever the
    /// resolution needs to know; `answers` carries the answers across a
    /// put's recipients.
    async fn resolve(
        &self,
        policy: &Policy<'_>,
        rcpt: &str,
        answers: &mut HashMap<String, bool>,
    ) -> Result<Vec<item::Recipient>, PutError> {
        loop {
            let resolved = policy.resolve_with(rcpt, &|id| answers.get(id).copied());
            match resolved {
                Ok(rs) => return Ok(rs),
                Err(Unresolved::Failed(e)) => return Err(PutError::Resolve(e)),
                // Each question is about an id not answered yet, so the
                // loop ends: at the bound at the latest.
                Err(Unresolved::AskDovecot(id)) => {
                    if answers.len() >= MAX_DOVECOT_LOOKUPS_PER_PUT {
                        return Err(PutError::Resolve(format!(
                            "more than {MAX_DOVECOT_LOOKUPS_PER_PUT} Dovecot lookups resolving {rcpt}"
                        )));
                    }
                    let what = format!("resolving <{rcpt}>");
                    let known = self.lookup(Lookup::AskDovecot(id.clone()), &what).await?;
                    answers.insert(id, known);
                }
            }
        }
    }

    pub fn domains(&self) -> Arc<Domains> {
        self.domains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, Ids> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a fresh ID for a new message; refused when the queue holds
    /// `max_queue_items` items (unless `bypass_limit`, for DSNs).
    pub fn reserve_id(&self, bypass_limit: bool) -> Result<String, PutError> {
        if self.dirsync.has_failed() {
            return Err(PutError::Unsynced);
        }
        let mut ids = self.ids();
        if !bypass_limit && ids.items.len() as u64 >= self.cfg.max_queue_items {
            return Err(PutError::Full);
        }
        loop {
            let id = item::new_id()?;
            if !ids.items.contains(&id) && ids.reserved.insert(id.clone()) {
                return Ok(id);
            }
        }
    }

    /// Gives back an ID whose put failed, and throws its files away (the
    /// item too: its rename may have happened before a failed directory
    /// fsync).
    pub fn release_id(&self, id: &str) {
        let _ = self.spool.unlink(id);
        self.ids().reserved.remove(id);
    }

    /// Turns a fully written (fsync'd) body into a queue item: resolves the
    /// recipients, writes the item durably and starts its send loop. When
    /// this returns Ok the message survives a crash.
    pub async fn put(
        self: &Arc<Self>,
        id: String,
        from: String,
        rcpts: Vec<String>,
        client: String,
        bypass_limit: bool,
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
        let mut answers = HashMap::new();
        for r in &rcpts {
            recipients.extend(self.resolve(&policy, r, &mut answers).await?);
        }
        let item = Item {
            version: FORMAT_VERSION,
            id: id.clone(),
            from,
            rcpt_to: rcpts,
            created_ms: now_ms(),
            client,
            recipients,
        };
        let spool = self.spool.clone();
        let to_write = item.clone();
        tokio::task::spawn_blocking(move || spool.stage_item(&to_write))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        // Covers the item's rename and the body's directory entry.
        self.dirsync.sync().await?;
        metrics::inc(names::QUEUE_ITEMS_WRITTEN);
        metrics::inc(names::QUEUE_PUT_COUNT);
        tracing::info!(
            id = %item.id,
            "{} from=<{}> queued ip={} to={:?}",
            item.id,
            item.from,
            item.client,
            item.rcpt_to
        );
        self.start(item);
        Ok(())
    }

    /// Starts the send loop of an item (new, or loaded at startup).
    pub fn start(self: &Arc<Self>, item: Item) {
        let mut ids = self.ids();
        ids.reserved.remove(&item.id);
        ids.items.insert(item.id.clone());
        drop(ids);
        let q = self.clone();
        tokio::spawn(async move { q.send_loop(item).await });
    }

    async fn send_loop(self: Arc<Self>, mut item: Item) {
        loop {
            self.round(&mut item).await;
            if item.pending().next().is_none() {
                break;
            }
            let age = self.age(&item);
            if age >= self.cfg.give_up_send_after {
                break;
            }
            let delay = self.schedule.next_delay(age);
            tracing::info!(id = %item.id, "{} from=<{}> completed loop, next in {}", item.id, item.from, duration::format(delay));
            tokio::time::sleep(delay).await;
            if self.age(&item) >= self.cfg.give_up_send_after {
                break;
            }
        }
        self.finish(item).await;
    }

    fn age(&self, item: &Item) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(item.created_ms).max(0) as u64)
    }

    /// Tries every pending recipient once, in parallel up to deliverd's
    /// slots; rewrites the item after each attempt. Recipients that go
    /// the same way (one remote domain or `via` list, with the same
    /// envelope sender) share one job, so one SMTP transaction.
    async fn round(&self, item: &mut Item) {
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

    fn job(&self, item: &Item, from: String, to: Vec<String>, target: Target) -> Job {
        Job {
            job: 0,
            queue_id: item.id.clone(),
            from,
            to,
            target,
            security: None,
        }
    }

    async fn rewrite(&self, item: &Item) {
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

    /// Sends the DSN if needed (durably, before anything is removed), then
    /// deletes the item.
    async fn finish(self: &Arc<Self>, item: Item) {
        let needs_dsn =
            !item.from.is_empty() && item.recipients.iter().any(|r| r.status != Status::Sent);
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
        if let Err(e) = removed {
            tracing::error!(id = %item.id, "cannot remove finished item: {e}");
        } else if let Err(e) = self.dirsync.sync().await {
            tracing::error!(id = %item.id, "cannot sync the queue directory: {e}");
        }
        self.ids().items.remove(&item.id);
        tracing::info!(id = %item.id, "{} from=<{}> all done", item.id, item.from);
    }

    async fn queue_dsn(self: &Arc<Self>, item: &Item) -> Result<(), PutError> {
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
        let spool = self.spool.clone();
        let hostname = self.cfg.hostname.clone();
        let date = chrono::Local::now()
            .format("%a, %d %b %Y %H:%M:%S %z")
            .to_string();
        let (id2, item2, dkim) = (dsn_id.clone(), item.clone(), self.dkim.clone());
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
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
            let mut w = spool.create_body(&id2)?;
            w.write(&signatures)?;
            w.write(&msg)?;
            w.finish()
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()));
        if let Err(e) = written.and_then(|r| r) {
            self.release_id(&dsn_id);
            return Err(e.into());
        }
        match self
            .put(
                dsn_id.clone(),
                String::new(),
                vec![item.from.clone()],
                "local".into(),
                true,
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

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
