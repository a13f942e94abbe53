//! The cache's entries and their files (REFERENCE §1.4): one file per
//! domain, `<dir>/pol:<domain>`, so the cache survives a restart.
//!
//! The file is tambo's own, and only a cache: JSON holding the policy's
//! fields and when it was fetched (Unix seconds; it expires `max_age`
//! later), e.g.
//!
//! ```text
//! {"version":"STSv1","mode":"enforce","max_age":86400,"mx":["mx.example.com"],"fetched":1767225600}
//! ```
//!
//! A file that cannot be read, decoded or checked is logged, counted and
//! ignored (the policy is fetched again when needed); never fatal.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tambo_common::safeio;

use super::counters::{Counter, Stats};
use super::policy::{self, Fields, Mode, Policy, PolicyError};

/// Prefix of a cache file's name; the rest is the domain.
pub const PREFIX: &str = "pol:";

/// Mode of the cache directory and its files: only deliverd reads them.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// The largest file read: ours stay near 10 KiB (the largest policy).
const MAX_FILE: u64 = 64 * 1024;

/// Most policies cached. Each domain mail went to that publishes one
/// stays until it expires and cannot be renewed: without a bound the
/// periodic refresh (one fetch per entry) and the directory would grow
/// with every such domain. Far more than a normal server sees.
pub const MAX_ENTRIES: usize = 10_000;

/// Makes room for `domain` in `entries` before it goes in, so that at
/// most `max` are held: if it is new and they are full, entries are
/// dropped — expired ones first, then the weaker policies (`none`,
/// `testing`) and `enforce` ones unused for [`IDLE_AFTER`], soonest to
/// expire first. An `enforce` policy in use is never dropped to make
/// room: otherwise whoever can make this server mail 10 000 domains of
/// theirs could push a victim's `enforce` out of the cache, then block its
/// re-fetch and so turn it off (fail open); and since the refresh stops
/// renewing unused entries, such a flood ages out of the way. Returns the
/// dropped domains (whose files must go too), or None — and nothing
/// dropped — when no room can be made: the newcomer is then used for this
/// delivery but not cached.
pub fn make_room(
    entries: &mut HashMap<String, Entry>,
    domain: &str,
    max: usize,
    now: SystemTime,
) -> Option<Vec<String>> {
    if entries.contains_key(domain) {
        return Some(Vec::new());
    }
    let keep = max.max(1) - 1;
    let excess = entries.len().saturating_sub(keep);
    let evictable = entries.values().filter(|e| evictable(e, now)).count();
    if evictable < excess {
        return None;
    }
    Some(trim(entries, keep, now))
}

/// Whether an entry may be dropped to make room (see [`make_room`]).
fn evictable(e: &Entry, now: SystemTime) -> bool {
    e.policy.mode != Mode::Enforce || e.expires() <= now || e.idle(now)
}

/// Drops evictable entries, expired ones first and then those that
/// expire first, until at most `keep` are left (or none is evictable);
/// returns their domains, in that order.
fn trim(entries: &mut HashMap<String, Entry>, keep: usize, now: SystemTime) -> Vec<String> {
    let Some(excess) = entries.len().checked_sub(keep).filter(|&n| n > 0) else {
        return Vec::new();
    };
    let mut candidates: Vec<(SystemTime, &String)> = entries
        .iter()
        .filter(|(_, e)| evictable(e, now))
        .map(|(d, e)| (e.expires(), d))
        .collect();
    candidates.sort_unstable();
    let dropped: Vec<String> = candidates
        .into_iter()
        .take(excess)
        .map(|(_, d)| d.clone())
        .collect();
    for d in &dropped {
        entries.remove(d);
    }
    dropped
}

/// A cached policy.
#[derive(Debug, Clone)]
pub struct Entry {
    pub policy: Arc<Policy>,
    /// When it was fetched; it is valid for `max_age` from then.
    pub fetched: SystemTime,
    /// When a delivery last asked for it (memory only; at startup, the
    /// time it was loaded). An entry unused for [`IDLE_AFTER`] is no
    /// longer renewed by the refresh, and may make room for another.
    pub used: SystemTime,
}

/// How long an unused policy is still renewed and kept over others.
pub const IDLE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

impl Entry {
    /// Unused for [`IDLE_AFTER`].
    pub fn idle(&self, now: SystemTime) -> bool {
        now.duration_since(self.used).is_ok_and(|d| d >= IDLE_AFTER)
    }

    pub fn expires(&self) -> SystemTime {
        // max_age ≤ one year, fetched ≤ now (see `decode`): no overflow in
        // practice; saturating all the same.
        self.fetched
            .checked_add(self.policy.max_age)
            .unwrap_or(self.fetched)
    }

    pub fn is_fresh(&self, now: SystemTime) -> bool {
        now < self.expires()
    }
}

/// The file's JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    version: String,
    mode: String,
    max_age: u64,
    mx: Vec<String>,
    fetched: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("larger than {MAX_FILE} bytes")]
    TooLarge,
    #[error("not a policy cache file: {0}")]
    Unmarshal(#[from] serde_json::Error),
    #[error("invalid policy: {0}")]
    Invalid(#[from] PolicyError),
}

impl LoadError {
    fn counter(&self) -> Counter {
        match self {
            LoadError::Io(_) => Counter::IoErrors,
            LoadError::TooLarge | LoadError::Unmarshal(_) => Counter::UnmarshalErrors,
            LoadError::Invalid(_) => Counter::Invalid,
        }
    }
}

pub fn encode(entry: &Entry) -> serde_json::Result<Vec<u8>> {
    let secs = entry
        .fetched
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    serde_json::to_vec(&Stored {
        version: policy::VERSION.into(),
        mode: entry.policy.mode.name().into(),
        max_age: entry.policy.max_age.as_secs(),
        mx: entry.policy.mx.clone(),
        fetched: secs,
    })
}

/// Decodes a file and checks its policy as strictly as a fetched one.
pub fn decode(data: &[u8], now: SystemTime) -> Result<Entry, LoadError> {
    let s: Stored = serde_json::from_slice(data)?;
    let policy = Fields {
        version: Some(&s.version),
        mode: Some(&s.mode),
        max_age: Some(s.max_age),
        mx: s.mx.iter().map(String::as_str).collect(),
    }
    .check()?;
    // A fetch time in the future (a clock set back since, or a damaged
    // file) counts as now: no file can keep a policy beyond max_age.
    let fetched = UNIX_EPOCH
        .checked_add(Duration::from_secs(s.fetched))
        .map_or(now, |t| t.min(now));
    Ok(Entry {
        policy: Arc::new(policy),
        fetched,
        used: now,
    })
}

/// The file of `domain` (already normalized: no `/`, no leading dot).
pub fn path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("{PREFIX}{domain}"))
}

/// The domain a file name stands for, if it is a cache file's name with a
/// domain in the form lookups use.
fn domain_of(name: &OsStr) -> Option<String> {
    let domain = name.to_str()?.strip_prefix(PREFIX)?;
    policy::normalize_host(domain).filter(|d| d == domain)
}

/// Creates the directory if missing and reads every entry in it (expired
/// ones too: a refresh may renew them), at most `max`: beyond that, those
/// that expire first are dropped and their files removed.
pub fn load_dir(dir: &Path, now: SystemTime, stats: &Stats, max: usize) -> HashMap<String, Entry> {
    let mut entries = read_dir(dir, now, stats);
    if entries.len() > max {
        let dropped = trim(&mut entries, max, now);
        tracing::warn!(
            "MTA-STS cache: {} policies beyond the {max} kept were dropped",
            dropped.len()
        );
        for domain in dropped {
            remove(dir, &domain, stats);
        }
    }
    entries
}

fn read_dir(dir: &Path, now: SystemTime, stats: &Stats) -> HashMap<String, Entry> {
    let mut entries = HashMap::new();
    if let Err(e) = safeio::create_dir_all_durable(dir, DIR_MODE) {
        stats.inc(Counter::IoErrors);
        tracing::warn!(
            "MTA-STS cache: cannot create {}: {e}; policies are kept in memory only",
            dir.display()
        );
        return entries;
    }
    let list = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) => {
            stats.inc(Counter::IoErrors);
            tracing::warn!("MTA-STS cache: cannot list {}: {e}", dir.display());
            return entries;
        }
    };
    for item in list {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                stats.inc(Counter::IoErrors);
                tracing::warn!("MTA-STS cache: listing {}: {e}", dir.display());
                break;
            }
        };
        let name = item.file_name();
        if let Some(hidden) = name.as_encoded_bytes().strip_prefix(b".") {
            // `.pol:…`: a write that a crash cut short (safeio's temporary
            // names). Other hidden files are not ours to touch.
            if hidden.starts_with(PREFIX.as_bytes()) {
                let _ = std::fs::remove_file(item.path());
            }
            continue;
        }
        let Some(domain) = domain_of(&name) else {
            tracing::warn!(
                "MTA-STS cache: ignoring {}: not a cache file",
                item.path().display()
            );
            continue;
        };
        match read(&item.path()).and_then(|data| decode(&data, now)) {
            Ok(entry) => {
                entries.insert(domain, entry);
            }
            Err(e) => {
                stats.inc(e.counter());
                tracing::warn!("MTA-STS cache: ignoring {}: {e}", item.path().display());
            }
        }
    }
    entries
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    let mut data = Vec::new();
    File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut data)?;
    if data.len() as u64 > MAX_FILE {
        return Err(LoadError::TooLarge);
    }
    Ok(data)
}

/// Writes the file of `domain` atomically. Failures are counted and
/// logged only: the policy in memory is used all the same.
pub fn write(dir: &Path, domain: &str, entry: &Entry, stats: &Stats) {
    let data = match encode(entry) {
        Ok(d) => d,
        Err(e) => {
            stats.inc(Counter::MarshalErrors);
            tracing::warn!("MTA-STS cache: cannot encode the policy of {domain}: {e}");
            return;
        }
    };
    let path = path(dir, domain);
    if let Err(e) = safeio::write_atomic(&path, &data, FILE_MODE) {
        stats.inc(Counter::IoErrors);
        tracing::warn!("MTA-STS cache: cannot write {}: {e}", path.display());
    }
}

/// Removes the file of `domain`, if there is one.
pub fn remove(dir: &Path, domain: &str, stats: &Stats) {
    let path = path(dir, domain);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            stats.inc(Counter::IoErrors);
            tracing::warn!("MTA-STS cache: cannot remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sts::Mode;

    fn entry(fetched: u64) -> Entry {
        Entry {
            policy: Arc::new(Policy {
                mode: Mode::Enforce,
                max_age: Duration::from_secs(3600),
                mx: vec!["mx.example.com".into(), "*.example.net".into()],
            }),
            fetched: UNIX_EPOCH + Duration::from_secs(fetched),
            used: UNIX_EPOCH + Duration::from_secs(fetched),
        }
    }

    #[test]
    fn round_trip() {
        let e = entry(1_700_000_000);
        let data = encode(&e).unwrap();
        assert_eq!(
            std::str::from_utf8(&data).unwrap(),
            r#"{"version":"STSv1","mode":"enforce","max_age":3600,"mx":["mx.example.com","*.example.net"],"fetched":1700000000}"#
        );
        let back = decode(&data, SystemTime::now()).unwrap();
        assert_eq!(back.policy, e.policy);
        assert_eq!(back.fetched, e.fetched);
        assert_eq!(back.expires(), e.fetched + Duration::from_secs(3600));
    }

    #[test]
    fn bad_files() {
        let now = SystemTime::now();
        for garbage in [&b""[..], b"garbage", b"{}", b"[1]", b"\xff\xfe"] {
            assert!(
                matches!(decode(garbage, now), Err(LoadError::Unmarshal(_))),
                "{garbage:?}"
            );
        }
        // An unknown field: another format, not ours.
        let extra =
            br#"{"version":"STSv1","mode":"enforce","max_age":1,"mx":["a.b"],"fetched":1,"x":1}"#;
        assert!(matches!(decode(extra, now), Err(LoadError::Unmarshal(_))));
        // Well formed, but not a valid policy.
        let zero = br#"{"version":"STSv1","mode":"enforce","max_age":0,"mx":["a.b"],"fetched":1}"#;
        assert!(matches!(decode(zero, now), Err(LoadError::Invalid(_))));
        let mode = br#"{"version":"STSv1","mode":"report","max_age":1,"mx":["a.b"],"fetched":1}"#;
        assert!(matches!(decode(mode, now), Err(LoadError::Invalid(_))));
    }

    #[test]
    fn a_fetch_time_in_the_future_counts_as_now() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        // A time no SystemTime holds: also now.
        let huge = format!(
            r#"{{"version":"STSv1","mode":"enforce","max_age":1,"mx":["a.b"],"fetched":{}}}"#,
            u64::MAX
        );
        assert_eq!(decode(huge.as_bytes(), now).unwrap().fetched, now);
        let e = decode(&encode(&entry(2_000_000)).unwrap(), now).unwrap();
        assert_eq!(e.fetched, now);
        assert_eq!(e.expires(), now + Duration::from_secs(3600));
    }

    #[test]
    fn room_goes_to_the_longest_lived_and_never_from_an_enforce_policy() {
        let with = |mode: Mode, fetched: u64, max_age: u64| Entry {
            policy: Arc::new(Policy {
                mode,
                max_age: Duration::from_secs(max_age),
                ..(*entry(0).policy).clone()
            }),
            fetched: UNIX_EPOCH + Duration::from_secs(fetched),
            used: UNIX_EPOCH + Duration::from_secs(fetched),
        };
        let now = UNIX_EPOCH + Duration::from_secs(300);
        let mut entries = HashMap::new();
        entries.insert("a".to_string(), with(Mode::Testing, 100, 1000)); // expires 1100
        entries.insert("b".to_string(), with(Mode::None, 0, 500)); // 500
        entries.insert("c".to_string(), with(Mode::Testing, 200, 2000)); // 2200
        entries.insert("e".to_string(), with(Mode::Enforce, 0, 400)); // 400
        entries.insert("x".to_string(), with(Mode::Enforce, 0, 100)); // expired
        // Room left, or a domain already in: nothing goes.
        assert_eq!(make_room(&mut entries, "d", 6, now), Some(vec![]));
        assert_eq!(make_room(&mut entries, "a", 5, now), Some(vec![]));
        assert_eq!(entries.len(), 5);
        // Full: an expired policy first, even an enforce one.
        assert_eq!(
            make_room(&mut entries, "d", 5, now),
            Some(vec!["x".to_string()])
        );
        // Then the weaker ones, soonest to expire first; the unexpired
        // enforce policy stays although it expires first of all.
        assert_eq!(
            make_room(&mut entries, "d", 2, now),
            Some(vec!["b".to_string(), "a".to_string(), "c".to_string()])
        );
        assert!(entries.contains_key("e"));
        // Nothing left that may go: the newcomer is not cached, and
        // nothing was dropped for it.
        assert_eq!(make_room(&mut entries, "d", 1, now), None);
        assert!(entries.contains_key("e"));
        // An enforce policy in use for a year stays; unused for a week,
        // it may go.
        let mut entries = HashMap::new();
        let mut long = with(Mode::Enforce, 0, 31_000_000);
        entries.insert("long".to_string(), long.clone());
        let week = UNIX_EPOCH + IDLE_AFTER;
        assert_eq!(
            make_room(&mut entries, "d", 1, week - Duration::from_secs(1)),
            None
        );
        assert_eq!(
            make_room(&mut entries, "d", 1, week),
            Some(vec!["long".to_string()])
        );
        long.used = week;
        entries.insert("long".to_string(), long);
        assert_eq!(make_room(&mut entries, "d", 1, week), None);
    }

    #[test]
    fn loading_keeps_at_most_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Stats::default();
        for (domain, fetched) in [("a.example", 300), ("b.example", 100), ("c.example", 200)] {
            write(dir.path(), domain, &entry(fetched), &stats);
        }
        // b has expired (100 + 3600 s); a and c are unexpired enforce
        // policies, which are never dropped for room.
        let now = UNIX_EPOCH + Duration::from_secs(3750);
        let got = load_dir(dir.path(), now, &stats, 2);
        let mut kept: Vec<_> = got.keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, ["a.example", "c.example"]);
        assert!(!path(dir.path(), "b.example").exists(), "its file went too");
        assert_eq!(load_dir(dir.path(), now, &stats, 2).len(), 2);
    }

    #[test]
    fn only_cache_files_name_domains() {
        assert_eq!(
            domain_of(OsStr::new("pol:example.com")).as_deref(),
            Some("example.com")
        );
        for bad in [
            "pol:",
            "pol:Example.com",
            "pol:example.com.",
            "pol:..",
            "example.com",
            "pol:a b",
            "pol:ñ.example",
        ] {
            assert_eq!(domain_of(OsStr::new(bad)), None, "{bad}");
        }
    }
}
