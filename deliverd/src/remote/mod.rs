//! Remote SMTP delivery (REFERENCE §4.5, §4.8): MX lookup, the SMTP client,
//! STARTTLS and security levels, MTA-STS, connection reuse.
//!
//! STUB: being written (issue 7).

use std::fs::File;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use rustls::RootCertStore;

use tambo_common::config::Config;
use tambo_proto::deliver::{Job, Outcome, SecLevel};

use crate::sts::Sts;

/// What every remote delivery shares: the resolver, the TLS setup, the
/// MTA-STS cache, the open connections.
pub struct Remote {
    #[allow(dead_code)]
    cfg: Arc<Config>,
    #[allow(dead_code)]
    resolver: TokioResolver,
    #[allow(dead_code)]
    roots: Arc<RootCertStore>,
    #[allow(dead_code)]
    sts: Arc<Sts>,
}

impl Remote {
    pub fn new(
        cfg: Arc<Config>,
        resolver: TokioResolver,
        roots: Arc<RootCertStore>,
        sts: Arc<Sts>,
    ) -> Self {
        Self {
            cfg,
            resolver,
            roots,
            sts,
        }
    }

    /// One attempt for every recipient of a Remote or Forward job: one
    /// outcome per recipient, in order, and the security level of the
    /// connection used once it passed the job's check.
    pub async fn deliver(&self, job: &Job, _message: File) -> (Vec<Outcome>, Option<SecLevel>) {
        let o = Outcome::TempFail("remote SMTP delivery is not implemented yet".into());
        (vec![o; job.to.len()], None)
    }
}
