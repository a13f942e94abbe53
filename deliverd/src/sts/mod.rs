//! MTA-STS (RFC 8461, REFERENCE §4.7): policy lookup, fetch, cache.
//!
//! STUB: being written (issue 7).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use rustls::RootCertStore;

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

    /// Refreshes every cached policy each `period`, forever.
    pub async fn refresh_forever(self: Arc<Self>, _period: Duration) {
        std::future::pending::<()>().await
    }
}
