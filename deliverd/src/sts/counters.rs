//! The `chasquid/sts/cache/*` counters (monitoring.md). Each cache counts
//! into its own copy too, so a test reads exactly what its cache counted
//! while other tests count into the process-wide metrics at the same time.

use std::sync::atomic::{AtomicU64, Ordering};

use tambo_proto::metrics::{self, names};

/// What each counter counts (where chasquid's `internal/sts` counts it,
/// with tambo's in-memory cache and `refetch` fitted in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Lookups: every `policy` and `refetch` call, fetching or not.
    Fetches,
    /// Lookups answered from an unexpired cached policy, with no fetch.
    Hits,
    /// Lookups that found a cached policy past its `max_age`.
    Expired,
    /// Lookups that needed a fetch which failed: no TXT record (most
    /// domains), DNS, connection, TLS or HTTP errors, timeouts, invalid
    /// policies. Lookups that waited on another's fetch count its result.
    /// Lookups answered from the memory of a recent failure (no fetch)
    /// count only in `Fetches`.
    FailedFetch,
    /// Invalid policies: fetched ones (lookup or refresh) that fail the
    /// parse or the checks, and cache files whose policy fails the checks.
    Invalid,
    /// Completed refresh passes over the cache.
    RefreshCycles,
    /// Entries re-fetched by a refresh pass.
    Refreshes,
    /// Refresh fetches that failed (for any reason a lookup's can).
    RefreshErrors,
    /// Failed filesystem operations on the cache directory: creating or
    /// listing it, reading, writing or removing a file.
    IoErrors,
    /// Policies that could not be encoded for their file.
    MarshalErrors,
    /// Cache files that could not be decoded (not our JSON, or too large).
    UnmarshalErrors,
}

impl Counter {
    /// Every counter, in declaration order.
    #[cfg(test)]
    pub const EVERY: [Counter; ALL] = [
        Counter::Fetches,
        Counter::Hits,
        Counter::Expired,
        Counter::FailedFetch,
        Counter::Invalid,
        Counter::RefreshCycles,
        Counter::Refreshes,
        Counter::RefreshErrors,
        Counter::IoErrors,
        Counter::MarshalErrors,
        Counter::UnmarshalErrors,
    ];
}

const ALL: usize = 11;

impl Counter {
    fn var(self) -> &'static str {
        match self {
            Counter::Fetches => names::STS_CACHE_FETCHES,
            Counter::Hits => names::STS_CACHE_HITS,
            Counter::Expired => names::STS_CACHE_EXPIRED,
            Counter::FailedFetch => names::STS_CACHE_FAILED_FETCH,
            Counter::Invalid => names::STS_CACHE_INVALID,
            Counter::RefreshCycles => names::STS_CACHE_REFRESH_CYCLES,
            Counter::Refreshes => names::STS_CACHE_REFRESHES,
            Counter::RefreshErrors => names::STS_CACHE_REFRESH_ERRORS,
            Counter::IoErrors => names::STS_CACHE_IO_ERRORS,
            Counter::MarshalErrors => names::STS_CACHE_MARSHAL_ERRORS,
            Counter::UnmarshalErrors => names::STS_CACHE_UNMARSHAL_ERRORS,
        }
    }
}

/// One cache's counts.
#[derive(Debug, Default)]
pub struct Stats {
    counts: [AtomicU64; ALL],
}

impl Stats {
    /// Counts one event, here and in the process's metrics.
    pub fn inc(&self, c: Counter) {
        self.counts[c as usize].fetch_add(1, Ordering::Relaxed);
        metrics::inc(c.var());
    }

    #[cfg(test)]
    pub fn get(&self, c: Counter) -> u64 {
        self.counts[c as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_slot_and_name() {
        let all = Counter::EVERY;
        assert_eq!(all.len(), ALL);
        let s = Stats::default();
        for (i, c) in all.iter().enumerate() {
            for _ in 0..=i {
                s.inc(*c);
            }
        }
        for (i, c) in all.iter().enumerate() {
            assert_eq!(s.get(*c), i as u64 + 1, "{c:?}");
        }
        let mut names: Vec<_> = all.iter().map(|c| c.var()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL);
    }
}
