//! Native LMTP delivery (RFC 2033, REFERENCE §4.3).
//!
//! STUB: being written (issue 7).

use std::fs::File;

use tambo_common::config::Config;
use tambo_proto::deliver::{Job, Outcome};

/// Delivers a Local job to the LMTP server at `address` (a Unix socket
/// path starting with `/`, or host:port): one outcome per recipient.
pub async fn deliver(_cfg: &Config, _address: &str, job: &Job, _message: File) -> Vec<Outcome> {
    vec![Outcome::TempFail("LMTP delivery is not implemented yet".into()); job.to.len()]
}
