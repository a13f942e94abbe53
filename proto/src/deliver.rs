//! deliver.sock: deliverd pulls delivery jobs from queued.
//!
//! deliverd says how many jobs it runs at once; queued never has more in
//! flight on that connection. Each `Job` frame is followed, in the same
//! `sendmsg`, by a read-only file descriptor of the message (see
//! [`crate::fd`]): deliverd never opens the queue directory. If the
//! connection drops, queued treats its in-flight jobs as temporary
//! failures, so they are retried.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// queued closes a deliver.sock connection that sends nothing (not even a
/// heartbeat) for this long; deliverd heartbeats well within it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3 * 60);

/// What a recipient is, after alias resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Mail for a user of a local domain: MDA, Maildir or LMTP.
    Local,
    /// Mail for another domain: remote SMTP via MX.
    Remote,
    /// A pipe alias: the command line.
    Pipe(String),
    /// A forward through the listed servers.
    Forward(Vec<String>),
}

/// One delivery attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Unique on this connection; echoed in the result.
    pub job: u64,
    /// The queue item, for logs.
    pub queue_id: String,
    /// Envelope sender; empty for `<>`.
    pub from: String,
    /// Final recipient address (clean form for local users).
    pub to: String,
    pub target: Target,
}

/// queued → deliverd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDeliverd {
    /// A job; one file descriptor accompanies this frame.
    Job(Job),
}

/// How an attempt ended. Temporary versus permanent is the type, never a
/// flag beside a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Delivered,
    /// Try again later; the text says why.
    TempFail(String),
    /// Give up on this recipient; the text goes into the DSN.
    PermFail(String),
}

/// deliverd → queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDeliverd {
    /// First after the hello: how many jobs may be in flight at once.
    Ready { slots: u32 },
    /// The result of a job.
    Done { job: u64, outcome: Outcome },
    /// Sent when deliverd has had nothing to say for a while, so queued
    /// can close a connection whose peer went silent.
    Heartbeat,
}
