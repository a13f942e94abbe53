//! The queue: putting messages in, one send loop per item, finishing
//! items (with a DSN when something failed).
//!
//! Each item is owned by its send loop (as in chasquid's `SendLoop`); the
//! shared state is only the set of live IDs. Disk work runs on the
//! blocking pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tambo_common::config::Config;
use tambo_common::domains::Domains;
use tambo_common::duration;

mod finish;
mod ids;
mod put;
mod round;
#[cfg(test)]
pub(crate) mod tests;

use crate::dirsync::DirSync;
use crate::dispatch::Dispatcher;
use crate::dkim::DkimKeys;
use crate::domaininfo::DomainInfo;
use crate::dovecot::{self, Dovecot};
use crate::hooks::Hooks;
use crate::item::{self, Item};
use crate::policy::{Lookup, Oracles, Policy, Unresolved};
use crate::retry::Schedule;
use crate::spool::{BodyWriter, Spool};
use ids::Ids;

pub struct Queue {
    pub cfg: Arc<Config>,
    domains: RwLock<Arc<Domains>>,
    pub spool: Spool,
    dirsync: DirSync,
    /// IDs in use: `items` are queued (they count toward
    /// `max_queue_items`); `reserved` are puts still receiving their body
    /// and the IDs of ready files, which do not, so clients stalling in
    /// DATA cannot fill the queue.
    ids: Mutex<Ids>,
    pub dispatcher: Arc<Dispatcher>,
    /// Hooks, run by deliverd (REFERENCE §6).
    pub hooks: Arc<Hooks>,
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
    /// Every item in its send loop: how it looked after its last round,
    /// and how the admin commands reach it (`tambo queue`).
    /// Shared with the send loop between rounds, so a waiting item is
    /// held once.
    live: Mutex<Live>,
    /// Bumped whenever `live` changes, so `/debug/queue` is rebuilt only
    /// when there is something new to show.
    version: AtomicU64,
    /// Items in a delivery round at once ([`MAX_ACTIVE_ROUNDS`]).
    active: tokio::sync::Semaphore,
}

/// Every item in its send loop, by ID: the item as of its last round, and
/// its controls.
type Live = HashMap<String, (Arc<Item>, Arc<Control>)>;

/// Items in a delivery round at once. The others wait in their send
/// loops, a few hundred bytes each, instead of holding a round's state and
/// a job each: a queue of 100,000 items loaded at startup does not turn
/// into 100,000 concurrent rounds. Postfix bounds its active queue the
/// same way (`qmgr_message_active_limit`, 20,000).
pub const MAX_ACTIVE_ROUNDS: usize = 5_000;

/// What `tambo queue` may do to an item in its send loop: wake it for a
/// round now, or take it out at the next chance (never in the middle of
/// a round: deliveries under way finish first).
#[derive(Default)]
pub struct Control {
    wake: tokio::sync::Notify,
    /// `Some(silent)` once removal was asked for.
    remove: Mutex<Option<bool>>,
}

impl Control {
    fn removal(&self) -> Option<bool> {
        *self.remove.lock().unwrap_or_else(|e| e.into_inner())
    }
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

/// The alias-resolve hook's answers in one transaction: address → its
/// targets (none if it had no entry).
pub type HookAnswers = HashMap<String, Vec<tambo_common::aliases::Target>>;

/// Where an item given to [`Queue::start`] comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Origin {
    /// Read from the queue directory at startup: each round takes a turn.
    Loaded,
    /// Just put for a client: its first round goes ahead (new mail is
    /// bounded by max_queue_items and must not wait behind a backlog).
    Received,
    /// Just put by queued itself (a DSN, which passes max_queue_items):
    /// it takes turns like the rest, so a mass bounce is not that many
    /// rounds at once.
    Internal,
}

/// What a put from an SMTP session brings beyond the envelope.
#[derive(Default)]
pub struct FromSession {
    /// The alias-resolve hook's answers at RCPT.
    pub hook_answers: HookAnswers,
    /// The message must be an item by then, or not at all.
    pub deadline: Option<std::time::Instant>,
    /// The body as received, not yet synced (and maybe only in memory):
    /// the put writes it out with its item. None: its `d:` file is there
    /// already, rewritten by signing or the checks.
    pub body: Option<BodyWriter>,
}

/// What a put learned beyond the files while resolving.
#[derive(Default)]
struct Answers {
    dovecot: HashMap<String, bool>,
    hook: HookAnswers,
    /// No more hook runs past it.
    deadline: Option<std::time::Instant>,
}

/// Why a put failed; the client sees a 4xx either way.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("queue is full, try again later")]
    Full,
    #[error("the checks after DATA took too long")]
    TooLate,
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
        let hooks = Arc::new(Hooks::new(&cfg));
        let dispatcher = Arc::new(Dispatcher::new(
            cfg.testing.delivery_job_deadline,
            cfg.testing.ipc_idle_timeout,
            hooks.clone(),
        ));
        Self {
            domains: RwLock::new(Arc::new(domains)),
            dirsync: DirSync::start(spool.clone()),
            spool,
            ids: Mutex::default(),
            dispatcher,
            hooks,
            schedule,
            in_flight: AtomicU64::new(0),
            dovecot: Dovecot::from_config(&cfg).map(Arc::new),
            domaininfo,
            dkim,
            cfg,
            live: Mutex::default(),
            version: AtomicU64::new(0),
            active: tokio::sync::Semaphore::new(MAX_ACTIVE_ROUNDS),
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

    /// Resolves one RCPT (REFERENCE §5.3), asking Dovecot and the
    /// alias-resolve hook whatever the resolution needs to know; `answers`
    /// carry their answers across a put's recipients, so each address is
    /// asked about once per message.
    async fn resolve(
        &self,
        policy: &Policy<'_>,
        rcpt: &str,
        answers: &mut Answers,
    ) -> Result<Vec<item::Recipient>, PutError> {
        let hook_exists = self.hooks.exists(crate::hooks::Name::AliasResolve);
        loop {
            let resolved = {
                let oracles = Oracles {
                    dovecot: &|id| answers.dovecot.get(id).copied(),
                    hook: &|addr| {
                        if hook_exists {
                            answers.hook.get(addr).cloned()
                        } else {
                            Some(Vec::new())
                        }
                    },
                };
                policy.resolve_with(rcpt, &oracles)
            };
            match resolved {
                Ok(rs) => return Ok(rs),
                Err(Unresolved::Failed(e)) => return Err(PutError::Resolve(e)),
                // Each question is about an id not answered yet, so the
                // loop ends: at the bound at the latest.
                Err(Unresolved::AskDovecot(id)) => {
                    if answers.dovecot.len() >= MAX_DOVECOT_LOOKUPS_PER_PUT {
                        return Err(PutError::Resolve(format!(
                            "more than {MAX_DOVECOT_LOOKUPS_PER_PUT} Dovecot lookups resolving {rcpt}"
                        )));
                    }
                    let what = format!("resolving <{rcpt}>");
                    let known = self.lookup(Lookup::AskDovecot(id.clone()), &what).await?;
                    answers.dovecot.insert(id, known);
                }
                Err(Unresolved::AskHook(addr)) => {
                    if answers
                        .deadline
                        .is_some_and(|d| std::time::Instant::now() >= d)
                    {
                        return Err(PutError::TooLate);
                    }
                    if answers.hook.len() >= MAX_DOVECOT_LOOKUPS_PER_PUT {
                        return Err(PutError::Resolve(format!(
                            "more than {MAX_DOVECOT_LOOKUPS_PER_PUT} alias-resolve hook runs resolving {rcpt}"
                        )));
                    }
                    let targets = self
                        .hooks
                        .alias_resolve(&addr)
                        .await
                        .map_err(PutError::Resolve)?
                        .unwrap_or_default();
                    answers.hook.insert(addr, targets);
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

    /// Makes every change to the queue directory so far durable: at
    /// shutdown, for the removals [`DirSync::sync_soon`] has not synced
    /// yet.
    pub async fn sync_before_exit(&self) {
        if let Err(e) = self.dirsync.sync().await {
            tracing::error!("cannot sync the queue directory before stopping: {e}");
        }
    }

    /// Starts the send loop of an item.
    pub fn start(self: &Arc<Self>, item: Item, origin: Origin) {
        let mut ids = self.ids();
        ids.reserved.remove(&item.id);
        ids.items.insert(item.id.clone());
        drop(ids);
        let ctl = Arc::new(Control::default());
        let item = Arc::new(item);
        self.live()
            .insert(item.id.clone(), (item.clone(), ctl.clone()));
        self.version.fetch_add(1, Ordering::Relaxed);
        let q = self.clone();
        tokio::spawn(async move { q.send_loop(item, ctl, origin).await });
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `item` is shared with `live` between rounds; a round changes its
    /// own copy, published when it ends.
    async fn send_loop(self: Arc<Self>, mut item: Arc<Item>, ctl: Arc<Control>, origin: Origin) {
        if origin != Origin::Loaded {
            // Here, not in the put: the task runs once the session's has
            // answered, so the client's 250 does not wait for a write to
            // the debug log. (The mail log's line is the put's: it costs
            // no write there, and stays ahead of a DSN's lines.)
            tracing::info!(
                id = %item.id,
                "{} from=<{}> queued ip={} to={:?}",
                item.id,
                item.from,
                item.client,
                item.rcpt_to
            );
        }
        let mut fresh = origin == Origin::Received;
        let mut dsn = true;
        let mut trace = tambo_proto::trace::Trace::new("Queue.SendLoop", item.id.clone());
        loop {
            if let Some(silent) = ctl.removal() {
                self.take_out(Arc::make_mut(&mut item), silent);
                trace.error("removed from the queue by the administrator");
                dsn = !silent;
                break;
            }
            {
                // A new message's first round goes ahead: new mail is
                // bounded by max_queue_items and must not wait behind a
                // backlog read from disk. The other rounds take a turn.
                let _permit = if fresh {
                    None
                } else {
                    Some(self.active.acquire().await)
                };
                fresh = false;
                if ctl.removal().is_some() {
                    // Asked while it waited for its turn.
                    continue;
                }
                // Boxed: a round's state (its attempts, the rewrite) is
                // large, and the loop spends most of its life between
                // rounds.
                Box::pin(self.round(Arc::make_mut(&mut item))).await;
            }
            let count =
                |st: item::Status| item.recipients.iter().filter(|r| r.status == st).count();
            let round = format!(
                "round: {} sent, {} failed, {} pending",
                count(item::Status::Sent),
                count(item::Status::Failed),
                count(item::Status::Pending)
            );
            if count(item::Status::Failed) > 0 {
                trace.error(round);
            } else {
                trace.event(round);
            }
            if let Some(view) = self.live().get_mut(&item.id) {
                view.0 = item.clone();
            }
            self.version.fetch_add(1, Ordering::Relaxed);
            if item.pending().next().is_none() {
                break;
            }
            let age = self.age(&item);
            if age >= self.cfg.give_up_send_after {
                break;
            }
            let delay = self.schedule.next_delay(age);
            tracing::info!(id = %item.id, "{} from=<{}> completed loop, next in {}", item.id, item.from, duration::format(delay));
            crate::maillog::round_done(&item.id, &item.from, delay);
            // `tambo queue flush` (or remove) ends the wait early.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = ctl.wake.notified() => {}
            }
            if ctl.removal().is_none() && self.age(&item) >= self.cfg.give_up_send_after {
                break;
            }
        }
        let id = item.id.clone();
        // Listed until it is gone (a copy: `live` holds the other).
        Box::pin(self.finish(Item::clone(&item), dsn)).await;
        trace.event("done");
        self.live().remove(&id);
        self.version.fetch_add(1, Ordering::Relaxed);
    }

    /// `tambo queue remove`: every pending recipient fails now, for good.
    fn take_out(&self, item: &mut Item, silent: bool) {
        let how = if silent {
            "without a DSN"
        } else {
            "with a DSN"
        };
        tracing::info!(id = %item.id, "removed from the queue by the administrator, {how}");
        for r in item.recipients.iter_mut() {
            if r.status == item::Status::Pending {
                r.status = item::Status::Failed;
                r.permanent = true;
                r.last_failure = "removed from the queue by the administrator".into();
                crate::maillog::failed(&item.id, &item.from, &r.address, true, &r.last_failure);
            }
        }
    }

    /// The items in their send loops, as of their last round, by creation.
    pub fn snapshot(&self) -> Vec<Item> {
        let mut items: Vec<Item> = self.live().values().map(|(i, _)| Item::clone(i)).collect();
        items.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        items
    }

    /// The `max` oldest items, by creation, and how many there are in
    /// all: what `/debug/queue` shows, without copying a large queue.
    pub fn snapshot_head(&self, max: usize) -> (usize, Vec<Item>) {
        let live = self.live();
        let order = |a: &&Item, b: &&Item| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id));
        let mut all: Vec<&Item> = live.values().map(|(i, _)| &**i).collect();
        let total = all.len();
        if total > max && max > 0 {
            all.select_nth_unstable_by(max - 1, order);
        }
        all.truncate(max);
        all.sort_by(order);
        let items: Vec<Item> = all.into_iter().cloned().collect();
        drop(live);
        (total, items)
    }

    /// Changes whenever an item enters, finishes a round or leaves.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Wakes one item's send loop (or every one) for a round now; false
    /// if there is no such item.
    pub fn flush(&self, id: Option<&str>) -> bool {
        let live = self.live();
        match id {
            Some(id) => live.get(id).map(|(_, c)| c.wake.notify_one()).is_some(),
            None => {
                live.values().for_each(|(_, c)| c.wake.notify_one());
                true
            }
        }
    }

    /// Asks an item's send loop to take it out (after the round under way,
    /// if any); false if there is no such item.
    pub fn remove(&self, id: &str, silent: bool) -> bool {
        let live = self.live();
        let Some((_, c)) = live.get(id) else {
            return false;
        };
        *c.remove.lock().unwrap_or_else(|e| e.into_inner()) = Some(silent);
        c.wake.notify_one();
        true
    }

    /// What `rcpt` resolves to now (`tambo aliases-resolve`), asking
    /// Dovecot and the alias-resolve hook as a put would.
    pub async fn resolve_now(&self, rcpt: &str) -> Result<Vec<item::Recipient>, PutError> {
        let domains = self.domains();
        let policy = Policy {
            cfg: &self.cfg,
            domains: &domains,
        };
        let mut answers = Answers::default();
        self.resolve(&policy, rcpt, &mut answers).await
    }

    fn age(&self, item: &Item) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(item.created_ms).max(0) as u64)
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
