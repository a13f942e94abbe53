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

use password_hash::{PasswordHash, PasswordVerifier};
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

/// Most memory one hash may ask for. The parameters come from the users
/// file, not the client, so this is a guard against a typo (`ln=41`) that
/// would make queued, the trusted core, abort on allocation; 2 GiB still
/// admits RFC 9106's first recommended argon2id setting.
pub const MAX_HASH_MEMORY: u64 = 2 << 30;

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
/// [`MAX_HASH_MEMORY`]: call it from `spawn_blocking`, not on a runtime
/// thread.
pub fn check(db: &UserDb, user: &str, password: &[u8]) -> Result<Option<Verdict>, String> {
    let phc = match db.get(user) {
        None => {
            decoy(password);
            return Ok(None);
        }
        Some(Credential::ReceiveOnly) => {
            decoy(password);
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
/// ~50 ms) of a password nobody knows, made once.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        use password_hash::{PasswordHasher, SaltString};
        let mut salt = [0u8; 16];
        // Without randomness the decoy is still a decoy: its salt is not
        // a secret, only its cost matters.
        let _ = getrandom::fill(&mut salt);
        let params = scrypt::Params::new(14, 8, 1, 32).expect("valid scrypt parameters");
        SaltString::encode_b64(&salt)
            .ok()
            .and_then(|salt| {
                scrypt::Scrypt
                    .hash_password_customized(b"decoy", None, None, params, &salt)
                    .map(|h| h.to_string())
                    .ok()
            })
            .unwrap_or_default()
    })
}

/// The work of one password check, for a user who has no hash (unknown,
/// or receive-only): so that the answer takes as long as for a user who
/// has one, and timing does not tell which users exist. The result is
/// thrown away.
fn decoy(password: &[u8]) {
    let _ = verify_phc(
        decoy_hash(),
        &password[..password.len().min(MAX_PASSWORD_LEN)],
    );
}

/// Whether `password` matches the PHC string `phc` (`$scrypt$…`,
/// `$argon2id$…`, `$argon2i$…`, `$argon2d$…`).
///
/// The hash's own parameters (cost, version, output length) are used, so
/// old and new hashes verify side by side, and the comparison is the
/// `password-hash` crate's constant-time one. `Err` for a string that is
/// not PHC, an unsupported algorithm, unusable parameters, or a PHC with no
/// salt or output (which would otherwise never match, hiding the mistake).
pub fn verify_phc(phc: &str, password: &[u8]) -> Result<bool, String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    let algorithm = hash.algorithm.as_str();
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(format!("the {algorithm} hash has no salt or no output"));
    }
    let bad_params = |e: password_hash::Error| format!("the {algorithm} hash's parameters: {e}");
    let memory = match algorithm {
        "scrypt" => {
            let p = scrypt::Params::try_from(&hash).map_err(bad_params)?;
            // scrypt's working set: 128·r·N bytes for V plus 128·r·p for B.
            let n = 1u64.checked_shl(u32::from(p.log_n())).unwrap_or(u64::MAX);
            (128 * u64::from(p.r())).saturating_mul(n.saturating_add(u64::from(p.p())))
        }
        "argon2id" | "argon2i" | "argon2d" => {
            let p = argon2::Params::try_from(&hash).map_err(bad_params)?;
            u64::from(p.m_cost()) * 1024
        }
        other => return Err(format!("unsupported password hash algorithm {other:?}")),
    };
    if memory > MAX_HASH_MEMORY {
        return Err(format!(
            "the {algorithm} hash needs {} MiB, more than the {} MiB allowed",
            memory >> 20,
            MAX_HASH_MEMORY >> 20
        ));
    }
    let result = match algorithm {
        "scrypt" => scrypt::Scrypt.verify_password(password, &hash),
        // Argon2's hasher takes the variant and version from the hash too.
        _ => argon2::Argon2::default().verify_password(password, &hash),
    };
    match result {
        Ok(()) => Ok(true),
        Err(password_hash::Error::Password) => Ok(false),
        Err(e) => Err(format!("cannot verify the {algorithm} hash: {e}")),
    }
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
mod tests {
    use super::*;
    use password_hash::{PasswordHasher, SaltString};
    use std::path::Path;

    const SALT: &[u8] = b"0123456789abcdef";

    fn salt() -> SaltString {
        SaltString::encode_b64(SALT).unwrap()
    }

    /// argon2 with the smallest parameters, so tests stay fast.
    fn argon2_hash(algorithm: argon2::Algorithm, password: &[u8]) -> String {
        let params = argon2::Params::new(64, 1, 1, Some(32)).unwrap();
        argon2::Argon2::new(algorithm, argon2::Version::V0x13, params)
            .hash_password(password, &salt())
            .unwrap()
            .to_string()
    }

    fn scrypt_hash(log_n: u8, password: &[u8]) -> String {
        let params = scrypt::Params::new(log_n, 8, 1, 32).unwrap();
        scrypt::Scrypt
            .hash_password_customized(password, None, None, params, &salt())
            .unwrap()
            .to_string()
    }

    fn db(lines: &[(&str, &str)]) -> UserDb {
        let text: String = lines.iter().map(|(u, c)| format!("{u} {c}\n")).collect();
        UserDb::parse(&text, Path::new("users")).unwrap()
    }

    #[test]
    fn scrypt_with_chasquid_parameters() {
        // The one N=2^14 hash (tens of ms): what chasquid and `tambo
        // user-add` write.
        let phc = scrypt_hash(14, b"s3cret");
        assert!(phc.starts_with("$scrypt$ln=14,r=8,p=1$"), "{phc}");
        assert_eq!(verify_phc(&phc, b"s3cret"), Ok(true));
        assert_eq!(verify_phc(&phc, b"s3cret "), Ok(false));
    }

    #[test]
    fn scrypt_honours_stored_parameters() {
        let phc = scrypt_hash(4, "contraseña".as_bytes());
        assert!(phc.starts_with("$scrypt$ln=4,r=8,p=1$"), "{phc}");
        assert_eq!(verify_phc(&phc, "contraseña".as_bytes()), Ok(true));
        assert_eq!(verify_phc(&phc, b"contrasena"), Ok(false));
        // Same salt, same password, other cost: the stored ln is what counts,
        // so swapping it breaks the match instead of being ignored.
        let other = phc.replacen("ln=4", "ln=5", 1);
        assert_eq!(verify_phc(&other, "contraseña".as_bytes()), Ok(false));
    }

    #[test]
    fn users_without_a_hash_cost_a_check_too() {
        // The decoy is a real scrypt hash at chasquid's cost, checked for
        // unknown and receive-only users alike.
        let decoy = decoy_hash();
        assert!(decoy.starts_with("$scrypt$ln=14,r=8,p=1$"), "{decoy}");
        assert_eq!(verify_phc(decoy, b"decoy"), Ok(true));
        assert_eq!(verify_phc(decoy, b""), Ok(false));
    }

    #[test]
    fn attempts_side_by_side_cannot_overrun_the_budget() {
        let b = FailureBudget::new(3, WINDOW, 100);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let t0 = Instant::now();
        // Five attempts begun before any finished: three get a check.
        let begun: Vec<bool> = (0..5)
            .map(|i| b.try_begin(ip, t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(begun, [true, true, true, false, false]);
        // One of them succeeds: its provisional failure is taken back, and
        // one more attempt may run.
        b.forgive(ip, t0 + Duration::from_millis(1));
        assert!(b.try_begin(ip, t0 + Duration::from_millis(10)));
        assert!(!b.try_begin(ip, t0 + Duration::from_millis(11)));
        // Forgiving what was never counted changes nothing.
        b.forgive(ip, t0 + Duration::from_secs(5));
        b.forgive("203.0.113.1".parse().unwrap(), t0);
        assert!(!b.allows(ip, t0 + Duration::from_millis(12)));
        // All forgiven: the client is forgotten.
        for ms in [0, 2, 10] {
            b.forgive(ip, t0 + Duration::from_millis(ms));
        }
        assert_eq!(b.tracked_clients(), 0);
    }

    #[test]
    fn argon2_variants() {
        for alg in [
            argon2::Algorithm::Argon2id,
            argon2::Algorithm::Argon2i,
            argon2::Algorithm::Argon2d,
        ] {
            let phc = argon2_hash(alg, b"s3cret");
            assert!(phc.starts_with(&format!("${}$v=19$m=64,t=1,p=1$", alg.as_str())));
            assert_eq!(verify_phc(&phc, b"s3cret"), Ok(true), "{phc}");
            assert_eq!(verify_phc(&phc, b"S3cret"), Ok(false), "{phc}");
            assert_eq!(verify_phc(&phc, b""), Ok(false), "{phc}");
        }
        // The variant is taken from the hash: an argon2i output relabelled
        // argon2id no longer matches.
        let i = argon2_hash(argon2::Algorithm::Argon2i, b"pw");
        let relabelled = i.replacen("$argon2i$", "$argon2id$", 1);
        assert_eq!(verify_phc(&relabelled, b"pw"), Ok(false));
    }

    #[test]
    fn argon2_with_a_longer_output_and_older_version() {
        let params = argon2::Params::new(64, 2, 1, Some(48)).unwrap();
        let phc = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x10, params)
            .hash_password(b"pw", &salt())
            .unwrap()
            .to_string();
        assert!(phc.starts_with("$argon2id$v=16$m=64,t=2,p=1$"), "{phc}");
        assert_eq!(verify_phc(&phc, b"pw"), Ok(true));
        assert_eq!(verify_phc(&phc, b"pW"), Ok(false));
    }

    #[test]
    fn broken_phc_strings_are_errors() {
        let good = argon2_hash(argon2::Algorithm::Argon2id, b"pw");
        let no_output = good.rsplit_once('$').unwrap().0.to_string();
        for phc in [
            "",
            "not a hash",
            "$md5$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
            "$scrypt$ln=14,r=8,p=1",
            no_output.as_str(),
            // An unknown parameter; parameters scrypt (N ≥ 2^(16·r)),
            // argon2 (m < 8·p) or the PHC version rule out.
            "$scrypt$ln=4,r=8,p=1,x=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
            "$scrypt$ln=16,r=1,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
            "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
            "$argon2id$v=99$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
        ] {
            let r = verify_phc(phc, b"pw");
            assert!(r.is_err(), "{phc}: {r:?}");
        }
    }

    #[test]
    fn absurd_memory_costs_are_refused_before_hashing() {
        // ln=31, r=8: 256 GiB. Refused at once rather than aborting queued.
        let phc =
            "$scrypt$ln=31,r=8,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4";
        let e = verify_phc(phc, b"pw").unwrap_err();
        assert!(e.contains("MiB"), "{e}");
        let phc = "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4";
        let e = verify_phc(phc, b"pw").unwrap_err();
        assert!(e.contains("4096 MiB"), "{e}");
    }

    #[test]
    fn check_against_a_users_file() {
        let ann = scrypt_hash(4, b"ann's pw");
        let bob = argon2_hash(argon2::Algorithm::Argon2id, b"bob's pw");
        let db = db(&[("Ann", &ann), ("bob", &bob), ("carol", "!")]);
        assert_eq!(check(&db, "ann", b"ann's pw"), Ok(Some(Verdict::Accepted)));
        assert_eq!(check(&db, "ann", b"bob's pw"), Ok(Some(Verdict::Refused)));
        assert_eq!(check(&db, "bob", b"bob's pw"), Ok(Some(Verdict::Accepted)));
        assert_eq!(check(&db, "bob", b""), Ok(Some(Verdict::Refused)));
        // Receive-only: never authenticates, whatever is sent.
        assert_eq!(check(&db, "carol", b"!"), Ok(Some(Verdict::ReceiveOnly)));
        assert_eq!(check(&db, "carol", b""), Ok(Some(Verdict::ReceiveOnly)));
        // Unknown: no verdict, so Dovecot can be asked.
        assert_eq!(check(&db, "dave", b"ann's pw"), Ok(None));
        assert_eq!(check(&UserDb::default(), "ann", b"x"), Ok(None));
        // Keys are normalised users: the caller normalises first.
        assert_eq!(check(&db, "Ann", b"ann's pw"), Ok(None));
    }

    #[test]
    fn check_refuses_oversized_passwords_without_hashing() {
        let mut long = vec![b'x'; MAX_PASSWORD_LEN];
        let db = db(&[("ann", &scrypt_hash(4, &long))]);
        assert_eq!(check(&db, "ann", &long), Ok(Some(Verdict::Accepted)));
        long.push(b'x');
        assert_eq!(check(&db, "ann", &long), Ok(Some(Verdict::Refused)));
    }

    #[test]
    fn check_reports_unusable_hashes() {
        // The users file only checks PHC syntax; a hash without output
        // passes it and must surface as an error, not as "wrong password".
        let db = db(&[("ann", "$scrypt$ln=14,r=8,p=1")]);
        assert!(check(&db, "ann", b"pw").is_err());
    }

    #[test]
    fn identities_split_at_the_first_at() {
        let ok = |id: &str, user: &str, domain: &str| {
            assert_eq!(
                split_identity(id),
                Ok((user.to_string(), domain.to_string())),
                "{id}"
            );
        };
        ok("Ann@Example.ORG", "ann", "example.org");
        ok("ann", "ann", "");
        ok("ＡＮＮ@xn--bcher-kva.example", "ann", "bücher.example");
        ok("Ñandú@EJEMPLO.ar", "ñandú", "ejemplo.ar");
        ok("ann+tag@example.org", "ann+tag", "example.org");
        for id in [
            "",
            "@example.org",
            "ann@",
            // First `@` splits; the rest is not a domain.
            "a@b@c",
            "ann@bad domain",
            "ann@exa\u{1}mple.org",
            "ann@exa\u{7f}mple.org",
            "an n@example.org",
            "an\tn",
            "ann@xn--zz",
        ] {
            assert!(split_identity(id).is_err(), "{id:?} should be refused");
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn budget_refuses_after_max_failures() {
        let b = FailureBudget::default();
        let t0 = Instant::now();
        let client = ip("192.0.2.1");
        for i in 0..MAX_FAILURES {
            assert!(b.allows(client, t0), "attempt {i}");
            b.record_failure(client, t0 + Duration::from_secs(u64::from(i)));
        }
        assert!(!b.allows(client, t0 + Duration::from_secs(10)));
        // Others are unaffected.
        assert!(b.allows(ip("192.0.2.2"), t0));
        // A success does not clear it (a valid account must not reset the
        // budget between guesses at others): only the window does.
        assert!(b.allows(client, t0 + WINDOW + Duration::from_secs(10)));
    }

    #[test]
    fn budget_window_slides() {
        let b = FailureBudget::new(3, Duration::from_secs(600), 100);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let c = ip("198.51.100.7");
        b.record_failure(c, t0);
        b.record_failure(c, t0 + s(300));
        b.record_failure(c, t0 + s(500));
        assert!(!b.allows(c, t0 + s(599)));
        // The first failure ages out at 600 s: one more try.
        assert!(b.allows(c, t0 + s(600)));
        b.record_failure(c, t0 + s(600));
        // Now 300, 500 and 600 are within the window until 900.
        assert!(!b.allows(c, t0 + s(899)));
        assert!(b.allows(c, t0 + s(900)));
        // Everything aged out: the entry goes.
        assert!(b.allows(c, t0 + s(1200)));
        assert_eq!(b.tracked_clients(), 0);
    }

    #[test]
    fn budget_has_no_fixed_window_edge() {
        // A fixed window starting at the first failure would let a client
        // fail 3 times just before its end and 3 more just after.
        let b = FailureBudget::new(3, Duration::from_secs(600), 100);
        let t0 = Instant::now();
        let c = ip("198.51.100.8");
        b.record_failure(c, t0);
        for _ in 0..2 {
            b.record_failure(c, t0 + Duration::from_secs(599));
        }
        assert!(b.allows(c, t0 + Duration::from_secs(600)));
        b.record_failure(c, t0 + Duration::from_secs(600));
        assert!(!b.allows(c, t0 + Duration::from_secs(601)));
    }

    #[test]
    fn budget_groups_ipv6_by_64() {
        let b = FailureBudget::new(2, WINDOW, 100);
        let t0 = Instant::now();
        b.record_failure(ip("2001:db8:1:2::1"), t0);
        b.record_failure(ip("2001:db8:1:2:ffff::9"), t0);
        assert!(!b.allows(ip("2001:db8:1:2:1234::5"), t0));
        assert!(b.allows(ip("2001:db8:1:3::1"), t0));
        // IPv4-mapped addresses count as their IPv4 address.
        b.record_failure(ip("::ffff:192.0.2.9"), t0);
        b.record_failure(ip("192.0.2.9"), t0);
        assert!(!b.allows(ip("192.0.2.9"), t0));
        assert_eq!(b.tracked_clients(), 2);
    }

    #[test]
    fn budget_memory_is_bounded() {
        let b = FailureBudget::new(2, WINDOW, 100);
        let t0 = Instant::now();
        let attacker = ip("203.0.113.1");
        b.record_failure(attacker, t0);
        b.record_failure(attacker, t0 + Duration::from_secs(1));
        assert!(!b.allows(attacker, t0 + Duration::from_secs(1)));
        // A flood of distinct /64s: the map never grows past its bound.
        for i in 0..10_000u32 {
            let flood = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i) << 64));
            b.record_failure(flood, t0 + Duration::from_secs(2));
            assert!(b.tracked_clients() <= 100);
        }
        assert_eq!(b.tracked_clients(), 100);
        // The oldest went first, the attacker with them (the bound's
        // price: an evicted client starts afresh).
        assert!(b.allows(attacker, t0 + Duration::from_secs(2)));
        let s = b.lock();
        assert_eq!(s.clients.len(), s.by_latest.len());
    }

    #[test]
    fn budget_evicts_least_recent_failure_first() {
        let b = FailureBudget::new(2, WINDOW, 2);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let (x, y, z) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        b.record_failure(x, t0);
        b.record_failure(y, t0 + s(1));
        // x fails again later: now y is the one whose last failure is oldest.
        b.record_failure(x, t0 + s(2));
        b.record_failure(z, t0 + s(3));
        assert_eq!(b.tracked_clients(), 2);
        assert!(!b.allows(x, t0 + s(3)));
        let st = b.lock();
        assert!(st.clients.contains_key(&z));
        assert!(!st.clients.contains_key(&y));
        assert_eq!(st.by_latest.len(), 2);
    }

    #[test]
    fn budget_zero_limits_mean_one() {
        let b = FailureBudget::new(0, WINDOW, 0);
        let t0 = Instant::now();
        assert!(b.allows(ip("192.0.2.1"), t0));
        b.record_failure(ip("192.0.2.1"), t0);
        assert!(!b.allows(ip("192.0.2.1"), t0));
        b.record_failure(ip("192.0.2.2"), t0);
        assert_eq!(b.tracked_clients(), 1);
    }

    #[test]
    fn equalised_bounds() {
        assert_eq!(equalised_duration(|| 0.0), Duration::from_millis(100));
        assert_eq!(equalised_duration(|| 0.5), Duration::from_millis(110));
        assert_eq!(equalised_duration(|| 1.0), Duration::from_millis(120));
        // Out-of-range or broken randomness stays within the bounds.
        assert_eq!(equalised_duration(|| -3.0), Duration::from_millis(100));
        assert_eq!(equalised_duration(|| 7.0), Duration::from_millis(120));
        assert_eq!(equalised_duration(|| f64::NAN), Duration::from_millis(100));
        for _ in 0..1000 {
            let d = equalised_duration(crate::retry::random_unit);
            assert!(
                d >= MIN_DURATION && d <= Duration::from_millis(120),
                "{d:?}"
            );
        }
    }

    #[tokio::test]
    async fn finish_at_pads_but_never_cuts_short() {
        let start = Instant::now();
        finish_at(start, Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        // Padded from `start`, not from the call: 60 ms already spent of
        // 100 leaves about 40.
        let start = Instant::now() - Duration::from_millis(60);
        let before = Instant::now();
        finish_at(start, Duration::from_millis(100)).await;
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(before.elapsed() < Duration::from_millis(100));
        // Already past: returns at once.
        let past = Instant::now() - Duration::from_secs(1);
        finish_at(past, Duration::from_millis(100)).await;
        assert!(past.elapsed() < Duration::from_millis(1100));
        let start = Instant::now();
        equalise(start).await;
        assert!(start.elapsed() >= MIN_DURATION);
    }
}
