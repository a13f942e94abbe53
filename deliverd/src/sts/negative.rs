//! Domains whose policy fetch failed lately, in memory only.
//!
//! A domain that publishes an `_mta-sts` record but whose policy host
//! drops packets costs each lookup the whole fetch timeout, while a
//! delivery slot waits on it. After a failed fetch, lookups of the domain
//! within [`TTL`] answer without fetching: no policy (fail open), or the
//! unexpired cached one (that still wins; RFC 8461 §3.3).
//!
//! "No `_mta-sts` record" is not remembered here: it is what most domains
//! answer, quickly, from the resolver's own cache, and remembering it
//! would only fill this table and delay noticing a new policy.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// How long a failed fetch is remembered.
pub const TTL: Duration = Duration::from_secs(5 * 60);

/// Most domains remembered; when full, expired ones go first, then the
/// oldest failure.
pub const MAX: usize = 10_000;

pub struct Negative {
    /// When each domain's last fetch failed.
    failed: HashMap<String, SystemTime>,
    max: usize,
}

impl Default for Negative {
    fn default() -> Self {
        Negative::with_max(MAX)
    }
}

impl Negative {
    pub fn with_max(max: usize) -> Self {
        Negative {
            failed: HashMap::new(),
            max: max.max(1),
        }
    }

    /// Whether a fetch of `domain` failed less than [`TTL`] before `now`.
    pub fn contains(&self, domain: &str, now: SystemTime) -> bool {
        self.failed.get(domain).is_some_and(|&t| recent(t, now))
    }

    /// Remembers that fetching `domain` failed at `now`.
    pub fn insert(&mut self, domain: &str, now: SystemTime) {
        if !self.failed.contains_key(domain) && self.failed.len() >= self.max {
            self.failed.retain(|_, t| recent(*t, now));
            if self.failed.len() >= self.max {
                let oldest = self
                    .failed
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(d, _)| d.clone());
                if let Some(d) = oldest {
                    self.failed.remove(&d);
                }
            }
        }
        self.failed.insert(domain.to_string(), now);
    }

    /// Forgets `domain` (its policy was just fetched).
    pub fn remove(&mut self, domain: &str) {
        self.failed.remove(domain);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.failed.len()
    }
}

/// Within [`TTL`] of `t`. A clock set back since (`now` before `t`) makes
/// the entry useless rather than last longer.
fn recent(t: SystemTime, now: SystemTime) -> bool {
    now.duration_since(t).is_ok_and(|d| d < TTL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn remembered_for_five_minutes() {
        let mut n = Negative::default();
        n.insert("a.example", at(0));
        assert!(n.contains("a.example", at(0)));
        assert!(n.contains("a.example", at(299)));
        assert!(!n.contains("a.example", at(300)));
        assert!(!n.contains("b.example", at(0)));
        // The clock set back: not kept longer.
        assert!(!n.contains("a.example", at(0) - Duration::from_secs(1)));
        n.insert("a.example", at(300));
        assert!(n.contains("a.example", at(599)));
        n.remove("a.example");
        assert!(!n.contains("a.example", at(300)));
    }

    #[test]
    fn bounded_expired_first_then_oldest() {
        let mut n = Negative::with_max(3);
        n.insert("a", at(0));
        n.insert("b", at(10));
        n.insert("c", at(400));
        // Full: a and b have expired by 401; both go.
        n.insert("d", at(401));
        assert_eq!(n.len(), 2);
        assert!(n.contains("c", at(401)) && n.contains("d", at(401)));
        n.insert("e", at(402));
        // Full of live entries: the oldest failure (c) goes.
        n.insert("f", at(403));
        assert_eq!(n.len(), 3);
        assert!(!n.contains("c", at(403)));
        for d in ["d", "e", "f"] {
            assert!(n.contains(d, at(403)), "{d}");
        }
        // A domain already there takes no room.
        n.insert("f", at(404));
        assert_eq!(n.len(), 3);
        assert!(n.contains("d", at(404)));
    }
}
