//! SMTP AUTH checks (REFERENCE §2.5, §2.2, §5.4): queued's half.
//!
//! smtpd decodes the SASL exchange and sends queued the identity as the
//! client gave it and the password; queued, which alone reads the users
//! files, decides. The pieces here are pure and socket-free:
//!
//! - [`split_identity`]: `user@domain` → the normalised user and domain.
//! - [`check`] / [`verify_phc`]: the users file's verdict, hashes checked
//!   with their stored parameters and in constant time.
//! - [`FailureBudget`]: at most [`MAX_FAILURES`] failures per [`WINDOW`] per
//!   client, Postfix-anvil style, in a map bounded by [`MAX_CLIENTS`].
//! - [`equalised_duration`] / [`finish_at`]: every attempt takes at least
//!   100 ms plus 0–20 %, so success, failure and unknown users look alike
//!   from outside.
//!
//! Nothing here logs: the password never reaches a log line, and the error
//! strings name the problem, never the hash or the password.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tambo_common::address;
use tambo_common::users::{Credential, UserDb};

/// Failures a client may have within [`WINDOW`]; the next attempt is
/// refused (`454 4.7.0`) without looking at the password. Together with
/// smtpd's 3-errors-per-session limit this means at least four sessions.
pub const MAX_FAILURES: u32 = 10;

/// How long a failure counts against its client.
pub const WINDOW: Duration = Duration::from_secs(10 * 60);

/// Clients the budget remembers at once. Each costs a few hundred bytes, so
/// the map stays around a few MB however many source addresses a flood
/// uses; past the bound the client whose last failure is oldest is
/// forgotten first.
pub const MAX_CLIENTS: usize = 10_000;

/// The floor of an AUTH attempt (REFERENCE §2.2), before the random part.
pub const MIN_DURATION: Duration = Duration::from_millis(100);

/// The random part's upper bound, as a fraction of [`MIN_DURATION`].
pub const JITTER: f64 = 0.2;

/// Longest password hashed. smtpd refuses responses over 1 KiB decoded, so
/// a longer one can only come from a misbehaving smtpd; refusing it keeps
/// that from turning into work here.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Splits an AUTH identity at the first `@` and normalises both halves:
/// the user as a PRECIS-like user name ([`address::normalize_user`]), the
/// domain as IDNA→Unicode, NFC, lowercase ([`address::normalize_domain`]).
///
/// A bare `ann` has an empty domain (only Dovecot can accept it). A
/// trailing `@` with nothing after it is an error rather than a bare user:
/// the client meant a domain and sent none. Splitting at the first `@`
/// means any further `@` lands in the domain, which is then refused;
/// `normalize_domain` does not refuse `@` or control characters itself, so
/// they are checked here (the domain may be sent on to Dovecot).
pub fn split_identity(identity: &str) -> Result<(String, String), String> {
    let (user, domain) = match identity.split_once('@') {
        Some((_, "")) => return Err("the identity has an empty domain after `@`".into()),
        Some((user, domain)) => (user, domain),
        None => (identity, ""),
    };
    let user = address::normalize_user(user).map_err(|e| e.to_string())?;
    if domain.chars().any(|c| c == '@' || c.is_control()) {
        return Err(format!("the domain {domain:?} is not a valid domain name"));
    }
    let domain = address::normalize_domain(domain).map_err(|e| e.to_string())?;
    Ok((user, domain))
}

/// The users file's answer for a known user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The password matches the stored hash.
    Accepted,
    /// It does not (`535 5.7.8`).
    Refused,
    /// The user receives mail but never authenticates (`user !`); the
    /// password was not looked at. Answer it like [`Verdict::Refused`].
    ReceiveOnly,
}

/// Checks `password` for `user` (already normalised, see
/// [`split_identity`]) against one domain's users file.
///
/// `Ok(None)`: the user is not in the file, so the caller may ask Dovecot
/// (REFERENCE §5.4 lookup order). `Err`: the stored hash cannot be used
/// (`454 4.7.0`, and worth a log line for the administrator).
///
/// This runs scrypt or argon2, tens of milliseconds of CPU and up to
/// [`tambo_common::users::MAX_HASH_MEMORY`]: call it from `spawn_blocking`, not on a runtime
/// thread.
pub fn check(db: &UserDb, user: &str, password: &[u8]) -> Result<Option<Verdict>, String> {
    let phc = match db.get(user) {
        None => {
            decoy(db, password);
            return Ok(None);
        }
        Some(Credential::ReceiveOnly) => {
            decoy(db, password);
            return Ok(Some(Verdict::ReceiveOnly));
        }
        Some(Credential::Hash(phc)) => phc,
    };
    if password.len() > MAX_PASSWORD_LEN {
        return Ok(Some(Verdict::Refused));
    }
    Ok(Some(if verify_phc(phc, password)? {
        Verdict::Accepted
    } else {
        Verdict::Refused
    }))
}

/// A scrypt hash at chasquid's parameters (N=2^14, r=8, p=1: ~16 MiB,
/// ~50 ms) of a password nobody knows, made once: at queued's startup
/// ([`warm_up`]), so no AUTH pays for it.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        let mut salt = [0u8; 16];
        // Without randomness the decoy is still a decoy: its salt is not
        // a secret, only its cost matters.
        let _ = getrandom::fill(&mut salt);
        tambo_common::password::hash_with_salt(b"decoy", &salt, 14).unwrap_or_default()
    })
}

/// Makes the decoy hash now rather than at the first AUTH.
pub fn warm_up() {
    decoy_hash();
}

/// The work of one password check, for a user who has no hash (unknown,
/// or receive-only): so that the answer takes as long as for a user who
/// has one, and timing does not tell which users exist. Against another
/// user's hash in the same file when there is one (the same algorithm and
/// cost, whatever the site chose), else the decoy. The result is thrown
/// away.
fn decoy(db: &UserDb, password: &[u8]) {
    let phc: &str = match db.any_hash() {
        Some(h) => h,
        None => decoy_hash(),
    };
    let _ = verify_phc(phc, &password[..password.len().min(MAX_PASSWORD_LEN)]);
}

/// Whether `password` matches the PHC string `phc`: the shared check
/// ([`tambo_common::password::verify`]), which `tambo authenticate` runs too.
pub fn verify_phc(phc: &str, password: &[u8]) -> Result<bool, String> {
    tambo_common::password::verify(phc, password)
}

/// Per-client AUTH failure counts, Postfix-anvil style: a client (an IPv4
/// address or an IPv6 /64, [`address::client_key`]) with `max_failures`
/// failures in the last `window` is refused without a check until the
/// oldest of them ages out.
///
/// The window slides: each client keeps the times of its last
/// `max_failures` failures, so no span of `window` ever holds more than
/// `max_failures` checked failures (a fixed window would allow twice that
/// across its boundary). At most `max_clients` are remembered; a new one
/// past that evicts the client whose most recent failure is oldest (an
/// expired one if any, since those are oldest of all), in O(log n), so a
/// flood of source addresses costs neither memory nor a scan.
///
/// Times are passed in, so the clock is the caller's (and the tests').
#[derive(Debug)]
pub struct FailureBudget {
    max_failures: usize,
    window: Duration,
    max_clients: usize,
    state: Mutex<BudgetState>,
    /// Serialises [`try_begin`](Self::try_begin)'s check and count.
    begin: Mutex<()>,
}

#[derive(Debug, Default)]
struct BudgetState {
    /// Per client: its recent failure times, oldest first, at most
    /// `max_failures` of them; never empty.
    clients: HashMap<IpAddr, VecDeque<Instant>>,
    /// (latest failure, client) for every entry of `clients`: the eviction
    /// order.
    by_latest: BTreeSet<(Instant, IpAddr)>,
}

impl Default for FailureBudget {
    /// [`MAX_FAILURES`] per [`WINDOW`], [`MAX_CLIENTS`] clients.
    fn default() -> Self {
        Self::new(MAX_FAILURES, WINDOW, MAX_CLIENTS)
    }
}

impl FailureBudget {
    /// Zero for either count is taken as one: a budget that refuses
    /// everyone, or remembers no one, is never what is meant.
    pub fn new(max_failures: u32, window: Duration, max_clients: usize) -> Self {
        Self {
            max_failures: usize::try_from(max_failures.max(1)).unwrap_or(usize::MAX),
            window,
            max_clients: max_clients.max(1),
            state: Mutex::default(),
            begin: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        // The state is a cache of counts: after a panic elsewhere it is
        // still consistent enough to use, and AUTH must not stop over it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ip` may try to authenticate at `now`.
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        let key = address::client_key(ip);
        let mut s = self.lock();
        let Some(times) = s.clients.get_mut(&key) else {
            return true;
        };
        let latest = times.back().copied();
        expire(times, now, self.window);
        let allowed = times.len() < self.max_failures;
        if times.is_empty() {
            s.clients.remove(&key);
            if let Some(latest) = latest {
                s.by_latest.remove(&(latest, key));
            }
        }
        allowed
    }

    /// Whether `ip` may try at `now`, and if so counts the attempt as a
    /// failure at once, in the same step: attempts that run side by side
    /// (one client, many sessions) cannot all pass the check before any is
    /// counted. [`forgive`](Self::forgive) takes it back when the attempt
    /// succeeds or could not be checked.
    pub fn try_begin(&self, ip: IpAddr, now: Instant) -> bool {
        let _serial = self.begin.lock().unwrap_or_else(|e| e.into_inner());
        if !self.allows(ip, now) {
            return false;
        }
        self.record_failure(ip, now);
        true
    }

    /// Takes back the failure [`try_begin`](Self::try_begin) counted at
    /// `at` for `ip`.
    pub fn forgive(&self, ip: IpAddr, at: Instant) {
        let key = address::client_key(ip);
        let mut s = self.lock();
        let s = &mut *s;
        let Some(times) = s.clients.get_mut(&key) else {
            return;
        };
        let Some(i) = times.iter().rposition(|&t| t == at) else {
            return;
        };
        if let Some(&latest) = times.back() {
            s.by_latest.remove(&(latest, key));
        }
        times.remove(i);
        match times.back() {
            Some(&latest) => {
                s.by_latest.insert((latest, key));
            }
            None => {
                s.clients.remove(&key);
            }
        }
    }

    /// Counts a failed attempt by `ip` at `now`. Recording attempts that
    /// were refused by [`allows`](Self::allows) as well is safe: it keeps
    /// a client that keeps hammering locked out.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let key = address::client_key(ip);
        let mut s = self.lock();
        let s = &mut *s;
        if let Some(times) = s.clients.get_mut(&key) {
            if let Some(&latest) = times.back() {
                s.by_latest.remove(&(latest, key));
            }
            expire(times, now, self.window);
            times.push_back(now);
            while times.len() > self.max_failures {
                times.pop_front();
            }
            if let Some(&latest) = times.back() {
                s.by_latest.insert((latest, key));
            }
            return;
        }
        while s.clients.len() >= self.max_clients {
            let Some((_, oldest)) = s.by_latest.pop_first() else {
                break;
            };
            s.clients.remove(&oldest);
        }
        s.clients.insert(key, VecDeque::from([now]));
        s.by_latest.insert((now, key));
    }

    /// How many clients are remembered.
    #[cfg(test)]
    pub fn tracked_clients(&self) -> usize {
        self.lock().clients.len()
    }
}

/// Drops failures older than `window` at `now` from the front.
fn expire(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|&t| now.saturating_duration_since(t) >= window)
    {
        times.pop_front();
    }
}

/// What every session's AUTH shares: the bounded pool the hashes run on,
/// and the per-client failure budget.
pub struct Service {
    pub pool: std::sync::Arc<crate::pool::CpuPool>,
    pub budget: FailureBudget,
}

/// How long one AUTH attempt should take: [`MIN_DURATION`] × (1 + 0.2·r)
/// for `r` drawn by `rand` from [0, 1) (clamped; NaN counts as 0), i.e.
/// 100–120 ms. The randomness is per attempt, so averaging many attempts
/// cannot recover the hash cost.
pub fn equalised_duration(rand: impl FnOnce() -> f64) -> Duration {
    let r = rand();
    let r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
    MIN_DURATION.mul_f64(1.0 + JITTER * r)
}

/// Sleeps until `start + d`; returns at once if that has passed (a slow
/// hash is never cut short, only padded). `start` is when the attempt
/// arrived, taken before any lookup.
pub async fn finish_at(start: Instant, d: Duration) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(start) + d).await;
}

/// [`finish_at`] with a fresh [`equalised_duration`]: what the AUTH
/// handler awaits before answering, whatever the answer.
pub async fn equalise(start: Instant) {
    finish_at(start, equalised_duration(crate::retry::random_unit)).await;
}

#[cfg(test)]
mod tests;
