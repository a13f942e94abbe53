//! MTA-STS (RFC 8461, REFERENCE §4.7): policy lookup, fetch, cache.
//!
//! # Layout
//! - `policy`: parsing and checking a policy, matching MX hosts.
//! - `fetch`: the `_mta-sts` TXT record and the HTTPS GET.
//! - `cache`: cache entries and their files in `sts-cache/`.
//! - `counters`: the `chasquid/sts/cache/*` variables.
//! - `negative`: domains whose fetch failed lately.
//! - here: [`Sts`], which ties them together: lookups during delivery,
//!   the periodic refresh.
//!
//! # Rules (RFC 8461 §3.3, §5)
//! - A cached policy is used until `max_age` after its fetch; then it is
//!   fetched again.
//! - A failed fetch means no policy (fail open), except that an unexpired
//!   cached policy stays in force: a network attacker who blocks the
//!   fetch must not switch a known policy off.
//! - A failed fetch is remembered for 5 minutes (memory only): lookups of
//!   the domain then answer as the failure did, without fetching, so a
//!   black-holed policy host costs one timeout per 5 minutes, not one
//!   per delivery.
//! - At most [`cache::MAX_ENTRIES`] policies are cached; when full, an
//!   expired, weaker (`none`, `testing`) or unused one makes room, never an
//!   `enforce` policy in use (see [`cache::make_room`]). Policies no
//!   delivery asked for in [`cache::IDLE_AFTER`] are no longer renewed.
//! - Concurrent lookups of one domain share one fetch, so a burst of mail
//!   to a domain costs one GET (and a broken domain one timeout).
//! - Every `period`, every cached policy is fetched again (expired ones
//!   too); one that has expired and cannot be renewed is dropped, so the
//!   cache does not grow with every domain ever written to.
//! - Policies are parsed by RFC 8461's grammar, strictly. One departure
//!   from REFERENCE §4.7's "≥ 1 mx": as the RFC's grammar allows, a
//!   `mode: none` policy needs none, since that is how a domain withdraws
//!   its policy.

mod cache;
mod counters;
mod fetch;
mod negative;
mod policy;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hickory_resolver::TokioResolver;
use rustls::RootCertStore;
use tokio::sync::OnceCell;

use cache::Entry;
use counters::{Counter, Stats};
use fetch::{FetchError, Fetcher, Https};
use negative::Negative;
pub use policy::{Mode, Policy};

#[cfg(test)]
pub use fetch::fake::Fake;

/// The most a lookup during delivery waits for a fetch (REFERENCE §4.7:
/// 1 minute). A little less than the minute remote delivery gives the
/// whole lookup, so the fetch ends by its own timeout, counted and
/// logged and remembered, rather than by the lookup being dropped.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(55);

/// The most one refresh fetch takes (REFERENCE §4.7).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);

/// At most one warning per domain this often: mail to a domain with a
/// broken policy host must not flood the log.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The most domains remembered for [`LOG_INTERVAL`]; beyond, further
/// warnings are dropped until old ones age out (the counters still count).
const LOG_DOMAINS: usize = 4096;

/// The MTA-STS policy cache of deliverd.
pub struct Sts {
    shared: Arc<Shared>,
    fetcher: Fetcher,
    clock: Clock,
    /// One cell per domain being fetched by a lookup: later lookups of the
    /// domain wait for its outcome instead of fetching too.
    inflight: Mutex<HashMap<String, Arc<OnceCell<Outcome>>>>,
    /// Domains whose fetch for a lookup failed lately.
    negative: Mutex<Negative>,
    lookup_timeout: Duration,
    refresh_timeout: Duration,
    /// Most cached policies ([`cache::MAX_ENTRIES`]; tests lower it).
    max_entries: usize,
    warned: Mutex<HashMap<String, Instant>>,
}

/// What the blocking file writes need (they run on tokio's blocking
/// threads, so they hold their own reference).
struct Shared {
    dir: PathBuf,
    /// Lookups, refreshes and file writes take it briefly; it is never
    /// held across an await or a file operation.
    entries: Mutex<HashMap<String, Entry>>,
    /// Serializes file writes, each of which writes whatever is in
    /// `entries` when it runs: the file ends up matching memory, whatever
    /// order concurrent fetches and refreshes finish in.
    disk: Mutex<()>,
    stats: Stats,
}

/// The outcome of one fetch for a lookup, shared with those that waited.
#[derive(Debug, Clone)]
struct Outcome {
    policy: Option<Arc<Policy>>,
    failed: bool,
}

/// Wall-clock time: expiry must survive a restart, so it is not an
/// `Instant`. Tests turn it by hand.
enum Clock {
    System,
    #[cfg(test)]
    Manual(Arc<Mutex<SystemTime>>),
}

impl Clock {
    fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            #[cfg(test)]
            Clock::Manual(t) => *t.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl Sts {
    /// The cache over `dir` (created 0700 if missing; the files in it are
    /// read now), fetching with `resolver` and verifying the policy hosts
    /// against `roots`, on `https_port` (443 but in tests).
    pub fn new(
        dir: PathBuf,
        resolver: TokioResolver,
        roots: Arc<RootCertStore>,
        https_port: u16,
    ) -> Self {
        let fetcher = Fetcher::Https(Box::new(Https::new(resolver, roots, https_port)));
        Self::build(dir, fetcher, Clock::System)
    }

    /// A cache over `dir` whose fetches are `fake`'s script, for the
    /// tests of other modules.
    #[cfg(test)]
    pub fn scripted(dir: PathBuf, fake: Arc<Fake>) -> Self {
        Self::build(dir, Fetcher::Fake(fake), Clock::System)
    }

    /// Fetches leave from `sources` (`[tambo] outgoing_source_address`),
    /// as remote SMTP does. Remote delivery sets it, once, where it meets
    /// the configuration.
    pub fn set_source_addresses(&self, sources: &[IpAddr]) {
        match &self.fetcher {
            Fetcher::Https(h) => h.set_sources(sources),
            #[cfg(test)]
            Fetcher::Fake(_) => {}
        }
    }

    fn build(dir: PathBuf, fetcher: Fetcher, clock: Clock) -> Self {
        let stats = Stats::default();
        let entries = cache::load_dir(&dir, clock.now(), &stats, cache::MAX_ENTRIES);
        if !entries.is_empty() {
            tracing::info!("MTA-STS cache: {} policies read", entries.len());
        }
        Self {
            shared: Arc::new(Shared {
                dir,
                entries: Mutex::new(entries),
                disk: Mutex::new(()),
                stats,
            }),
            fetcher,
            clock,
            inflight: Mutex::new(HashMap::new()),
            negative: Mutex::new(Negative::default()),
            lookup_timeout: LOOKUP_TIMEOUT,
            refresh_timeout: REFRESH_TIMEOUT,
            max_entries: cache::MAX_ENTRIES,
            warned: Mutex::new(HashMap::new()),
        }
    }

    /// The policy of `domain` (IDNA-ASCII, lower case): from the cache if
    /// fresh, else fetched (55 s at most). None when the domain has no
    /// policy or it cannot be fetched (fail open), or its last fetch
    /// failed less than 5 minutes ago (no fetch then).
    ///
    /// Counters: every call counts in `fetches` (lookups, as chasquid
    /// counts them). An answer from the memory of a failure counts
    /// nothing more: it is no fetch, so not a `failedFetch` either.
    pub async fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        self.count(Counter::Fetches);
        let domain = self.key(domain)?;
        match self.cached(&domain) {
            Some(e) if e.is_fresh(self.clock.now()) => {
                self.count(Counter::Hits);
                self.touch(&domain);
                return Some(e.policy);
            }
            Some(_) => self.count(Counter::Expired),
            None => {}
        }
        if self.failed_lately(&domain) {
            return None;
        }
        self.fetch_shared(&domain).await
    }

    /// Fetches the policy again, bypassing the cache (RFC 8461 §5: before
    /// giving up on a domain whose MX hosts all fail the policy). If that
    /// fails, an unexpired cached policy still applies; after a failure
    /// less than 5 minutes ago, that is the answer without a fetch (it
    /// would most likely fail again, after the whole timeout).
    pub async fn refetch(&self, domain: &str) -> Option<Arc<Policy>> {
        self.count(Counter::Fetches);
        let domain = self.key(domain)?;
        if self.failed_lately(&domain) {
            return self.fresh_cached(&domain);
        }
        self.fetch_shared(&domain).await
    }

    /// Refreshes every cached policy each `period`, forever; the first
    /// pass is one period after startup.
    pub async fn refresh_forever(self: Arc<Self>, period: Duration) {
        let start = tokio::time::Instant::now() + period;
        let mut tick = tokio::time::interval_at(start, period);
        // A pass longer than the period delays the next one; passes never
        // pile up.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh_once().await;
        }
    }

    /// One refresh pass, one domain after another (as chasquid does: the
    /// pass is background work, and this keeps its load on the network
    /// and on the policy hosts small).
    async fn refresh_once(&self) {
        let now = self.clock.now();
        let (mut domains, idle): (Vec<String>, Vec<String>) = {
            let entries = self.lock_entries();
            let (busy, idle): (Vec<_>, Vec<_>) = entries.iter().partition(|(_, e)| !e.idle(now));
            (
                busy.into_iter().map(|(d, _)| d.clone()).collect(),
                idle.into_iter()
                    .filter(|(_, e)| !e.is_fresh(now))
                    .map(|(d, _)| d.clone())
                    .collect(),
            )
        };
        // Policies no delivery asked for in IDLE_AFTER are not renewed:
        // they expire, then go (a flood of domains mailed once cannot hold
        // the cache for good).
        for domain in idle {
            self.lock_entries().remove(&domain);
            self.sync_file(&domain).await;
        }
        domains.sort();
        let mut trace = tambo_proto::trace::Trace::new(
            "STSCache.Refresh",
            format!("{} policies", domains.len()),
        );
        for domain in domains {
            self.count(Counter::Refreshes);
            match self.fetch_checked(&domain, self.refresh_timeout).await {
                Ok(policy) => {
                    trace.event(format!("{domain}: {:?}", policy.mode));
                    let used = self.cached(&domain).map(|e| e.used);
                    self.insert(&domain, policy, used).await;
                }
                Err(e) => {
                    trace.error(format!("{domain}: {e}"));
                    self.count(Counter::RefreshErrors);
                    let now = self.clock.now();
                    let dropped = {
                        let mut entries = self.lock_entries();
                        let expired = entries.get(&domain).is_some_and(|e| !e.is_fresh(now));
                        expired && entries.remove(&domain).is_some()
                    };
                    let then = if dropped {
                        "it has expired and is dropped"
                    } else {
                        "the cached policy applies until it expires"
                    };
                    self.warn(
                        &domain,
                        &format!("refreshing the policy failed: {e}; {then}"),
                    );
                    if dropped {
                        self.sync_file(&domain).await;
                    }
                }
            }
        }
        self.count(Counter::RefreshCycles);
    }

    /// Fetches for a lookup, sharing the fetch with concurrent lookups of
    /// the same domain.
    async fn fetch_shared(&self, domain: &str) -> Option<Arc<Policy>> {
        let joined = Joined::new(self, domain);
        // If the lookup running the fetch is dropped (its delivery timed
        // out), one of the waiters runs it instead; the last one to leave
        // takes the domain's entry out of `inflight`, however it leaves.
        let outcome = joined
            .cell()
            .get_or_init(|| self.fetch_for_lookup(domain))
            .await
            .clone();
        drop(joined);
        if outcome.failed {
            self.count(Counter::FailedFetch);
        }
        outcome.policy
    }

    async fn fetch_for_lookup(&self, domain: &str) -> Outcome {
        let mut trace = tambo_proto::trace::Trace::new("STSCache.Fetch", domain.to_string());
        match self.fetch_checked(domain, self.lookup_timeout).await {
            Ok(policy) => {
                trace.event(format!(
                    "{:?}, max_age {}s, {} mx",
                    policy.mode,
                    policy.max_age.as_secs(),
                    policy.mx.len()
                ));
                Outcome {
                    policy: Some(self.insert(domain, policy, None).await),
                    failed: false,
                }
            }
            Err(e) => {
                if e.is_absent() {
                    trace.event(format!("none: {e}"));
                } else {
                    trace.error(format!("failed: {e}"));
                }
                // RFC 8461 §3.3: with no fresh policy to be had, a valid
                // cached one still applies.
                let kept = self.fresh_cached(domain);
                if !e.is_absent() {
                    self.lock_negative().insert(domain, self.clock.now());
                }
                if e.is_absent() {
                    tracing::debug!("MTA-STS: {domain}: {e}");
                } else {
                    let then = if kept.is_some() {
                        "the cached policy applies until it expires"
                    } else {
                        "delivering as if it had none"
                    };
                    self.warn(domain, &format!("fetching the policy failed: {e}; {then}"));
                }
                Outcome {
                    policy: kept,
                    failed: true,
                }
            }
        }
    }

    /// Fetches and parses within `limit`; an invalid policy is counted.
    async fn fetch_checked(&self, domain: &str, limit: Duration) -> Result<Policy, FetchError> {
        let body = tokio::time::timeout(limit, self.fetcher.fetch(domain))
            .await
            .map_err(|_| FetchError::Timeout(limit))??;
        policy::parse(&body).map_err(|e| {
            self.count(Counter::Invalid);
            FetchError::Invalid(e)
        })
    }

    /// Caches a freshly fetched policy, in memory and then on disk, last
    /// used at `used` (None: now, a delivery asked for it); when the cache
    /// is full, another entry may make room (see [`cache::make_room`]).
    async fn insert(&self, domain: &str, policy: Policy, used: Option<SystemTime>) -> Arc<Policy> {
        let now = self.clock.now();
        let entry = Entry {
            policy: Arc::new(policy),
            fetched: now,
            used: used.unwrap_or(now),
        };
        let policy = entry.policy.clone();
        // A fresh policy ends the memory of a failed fetch, cached or not.
        self.lock_negative().remove(domain);
        let dropped = {
            let mut entries = self.lock_entries();
            match cache::make_room(&mut entries, domain, self.max_entries, now) {
                Some(dropped) => {
                    entries.insert(domain.to_string(), entry);
                    dropped
                }
                None => {
                    drop(entries);
                    self.warn(
                        domain,
                        "the cache is full of enforce policies in use; this one is used but not cached",
                    );
                    return policy;
                }
            }
        };
        for d in &dropped {
            tracing::info!("MTA-STS cache: full; the policy of {d} is dropped to make room");
            self.sync_file(d).await;
        }
        self.sync_file(domain).await;
        policy
    }

    /// A delivery asked for the cached policy of `domain`.
    fn touch(&self, domain: &str) {
        let now = self.clock.now();
        if let Some(e) = self.lock_entries().get_mut(domain) {
            e.used = now;
        }
    }

    /// Whether a fetch of `domain` for a lookup failed in the last 5
    /// minutes.
    fn failed_lately(&self, domain: &str) -> bool {
        self.lock_negative().contains(domain, self.clock.now())
    }

    fn lock_negative(&self) -> std::sync::MutexGuard<'_, Negative> {
        self.negative.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached policy of `domain` if it has not expired.
    fn fresh_cached(&self, domain: &str) -> Option<Arc<Policy>> {
        let now = self.clock.now();
        self.cached(domain)
            .filter(|c| c.is_fresh(now))
            .map(|c| c.policy)
    }

    /// Makes the file of `domain` match memory: written if cached, removed
    /// if not. Waited for, so what a lookup returns is on disk (unless that
    /// failed, which is counted and logged, and changes nothing else).
    async fn sync_file(&self, domain: &str) {
        let shared = self.shared.clone();
        let domain = domain.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            let _disk = shared.disk.lock().unwrap_or_else(|e| e.into_inner());
            let entry = shared
                .entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&domain)
                .cloned();
            match entry {
                Some(e) => cache::write(&shared.dir, &domain, &e, &shared.stats),
                None => cache::remove(&shared.dir, &domain, &shared.stats),
            }
        })
        .await;
    }

    /// The cache key: the domain in IDNA-ASCII, lower case, no final dot.
    /// Not a domain (an address literal, say): no policy.
    fn key(&self, domain: &str) -> Option<String> {
        let key = policy::normalize_host(domain);
        if key.is_none() {
            self.count(Counter::FailedFetch);
            tracing::debug!("MTA-STS: {domain:?} is not a domain name: no policy");
        }
        key
    }

    fn cached(&self, domain: &str) -> Option<Entry> {
        self.lock_entries().get(domain).cloned()
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.shared
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, c: Counter) {
        self.shared.stats.inc(c);
    }

    /// One warning line about `domain`, unless it had one in the last
    /// [`LOG_INTERVAL`]; whether it was logged.
    fn warn(&self, domain: &str, what: &str) -> bool {
        let now = Instant::now();
        {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            let recent = |t: &Instant| now.saturating_duration_since(*t) < LOG_INTERVAL;
            if warned.get(domain).is_some_and(recent) {
                return false;
            }
            if warned.len() >= LOG_DOMAINS {
                warned.retain(|_, t| recent(t));
                if warned.len() >= LOG_DOMAINS {
                    return false;
                }
            }
            warned.insert(domain.to_string(), now);
        }
        tracing::warn!("MTA-STS: {domain}: {what}");
        true
    }
}

/// A lookup's share of the in-flight fetch of a domain. The entry in
/// `inflight` goes when the fetch is done or when the last lookup waiting
/// on it leaves, whichever comes first, in drop: a lookup dropped while
/// it waits (its delivery timed out) leaves no entry behind.
struct Joined<'a> {
    sts: &'a Sts,
    domain: &'a str,
    /// Always Some until drop.
    cell: Option<Arc<OnceCell<Outcome>>>,
}

impl<'a> Joined<'a> {
    fn new(sts: &'a Sts, domain: &'a str) -> Self {
        let cell = sts
            .lock_inflight()
            .entry(domain.to_string())
            .or_default()
            .clone();
        Joined {
            sts,
            domain,
            cell: Some(cell),
        }
    }

    fn cell(&self) -> &OnceCell<Outcome> {
        // An invariant, not data: set in `new`, taken only in `drop`.
        self.cell.as_deref().expect("the cell is held until drop")
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let Some(cell) = self.cell.take() else { return };
        // Every clone is made and (here) dropped under the lock, so the
        // count is exact: 1 means only the map still holds the cell.
        let mut inflight = self.sts.lock_inflight();
        let listed = inflight
            .get(self.domain)
            .is_some_and(|c| Arc::ptr_eq(c, &cell));
        let done = cell.initialized();
        drop(cell);
        let alone = || {
            inflight
                .get(self.domain)
                .is_some_and(|c| Arc::strong_count(c) == 1)
        };
        if listed && (done || alone()) {
            inflight.remove(self.domain);
        }
    }
}

impl Sts {
    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<OnceCell<Outcome>>>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests;
