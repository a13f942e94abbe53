//! MTA-STS (RFC 8461, REFERENCE §4.7): policy lookup, fetch, cache.
//!
//! STUB: the API remote delivery uses; being written (issue 7).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use rustls::RootCertStore;

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl Mode {
    /// The label of `chasquid/smtpOut/sts/mode`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A valid policy (REFERENCE §4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub max_age: Duration,
    /// The `mx` patterns, as given (`mx.example.com`, `*.example.net`).
    pub mx: Vec<String>,
}

impl Policy {
    /// Whether `mx_host` (an MX name from DNS) matches one of the
    /// patterns: exactly (case-insensitive, trailing dot ignored, IDNA
    /// applied), or `*.suffix` with exactly one more leftmost label.
    pub fn matches(&self, _mx_host: &str) -> bool {
        false
    }
}

/// The MTA-STS policy cache of deliverd.
pub struct Sts {
    #[allow(dead_code)]
    dir: PathBuf,
}

impl Sts {
    pub fn new(
        dir: PathBuf,
        _resolver: TokioResolver,
        _roots: Arc<RootCertStore>,
        _https_port: u16,
    ) -> Self {
        Self { dir }
    }

    /// The policy of `domain` (IDNA-ASCII, lower case): from the cache if
    /// fresh, else fetched (1 minute at most). None when the domain has no
    /// policy or it cannot be fetched (fail open).
    pub async fn policy(&self, _domain: &str) -> Option<Arc<Policy>> {
        None
    }

    /// Fetches the policy again, bypassing the cache (RFC 8461 §5: before
    /// giving up on a domain whose MX hosts all fail the policy).
    pub async fn refetch(&self, _domain: &str) -> Option<Arc<Policy>> {
        None
    }

    /// Refreshes every cached policy each `period`, forever.
    pub async fn refresh_forever(self: Arc<Self>, _period: Duration) {
        std::future::pending::<()>().await
    }
}
