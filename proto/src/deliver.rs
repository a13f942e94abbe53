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

use crate::submit::{SpfReport, SpfResult};

/// queued closes a deliver.sock connection that sends nothing (not even a
/// heartbeat) for this long; deliverd heartbeats well within it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3 * 60);

/// Most recipients in one job: Postfix's `smtp_destination_recipient_limit`
/// default. Bigger groups are split into several jobs (several SMTP
/// transactions), which also keeps every frame within its limit.
pub const MAX_RECIPIENTS_PER_JOB: usize = 50;

/// Most bytes of recipient addresses in one job, so a job frame (with its
/// sender, ID and `via` list) stays within [`crate::frame::MAX_SMALL_FRAME`].
pub const MAX_JOB_ADDRESS_BYTES: usize = 4096;

/// Longest failure text per recipient in a result; deliverd cuts longer
/// ones (at a character boundary) before sending.
pub const MAX_FAILURE_TEXT: usize = 1024;

/// Largest result frame: one outcome per recipient at most
/// [`MAX_FAILURE_TEXT`] long, plus room for the encoding.
pub const MAX_RESULT_FRAME: usize = 1024 + MAX_RECIPIENTS_PER_JOB * (MAX_FAILURE_TEXT + 64);

/// What a recipient is, after alias resolution.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// A per-domain security level (REFERENCE §4.6), ordered from weakest to
/// strongest. queued keeps them (domaininfo); deliverd only observes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SecLevel {
    /// No TLS.
    Plain,
    /// Incoming TLS (the incoming half only).
    TlsClient,
    /// Outgoing TLS with a certificate that did not verify.
    TlsInsecure,
    /// Outgoing TLS; the certificate chains to the roots and names the MX.
    TlsSecure,
}

impl Outcome {
    /// The same outcome with its text cut to [`MAX_FAILURE_TEXT`] bytes.
    pub fn capped(self) -> Self {
        let cut = |mut t: String| {
            if t.len() > MAX_FAILURE_TEXT {
                let mut end = MAX_FAILURE_TEXT;
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                t.truncate(end);
            }
            t
        };
        match self {
            Outcome::Delivered => Outcome::Delivered,
            Outcome::TempFail(t) => Outcome::TempFail(cut(t)),
            Outcome::PermFail(t) => Outcome::PermFail(cut(t)),
        }
    }
}

impl SecLevel {
    /// The name chasquid's domaininfo files use.
    pub fn name(self) -> &'static str {
        match self {
            SecLevel::Plain => "PLAIN",
            SecLevel::TlsClient => "TLS_CLIENT",
            SecLevel::TlsInsecure => "TLS_INSECURE",
            SecLevel::TlsSecure => "TLS_SECURE",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "PLAIN" => SecLevel::Plain,
            "TLS_CLIENT" => SecLevel::TlsClient,
            "TLS_INSECURE" => SecLevel::TlsInsecure,
            "TLS_SECURE" => SecLevel::TlsSecure,
            _ => return None,
        })
    }
}

/// One delivery attempt for one or more recipients of one message that go
/// the same way: a local user, a pipe, or every recipient of one remote
/// domain (or one `via` list) with the same envelope sender, which go in
/// one SMTP transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Unique on this connection; echoed in the result.
    pub job: u64,
    /// The queue item, for logs.
    pub queue_id: String,
    /// Envelope sender to use; empty for `<>`. Already rewritten by queued
    /// when forwarding needs it (REFERENCE §4.8).
    pub from: String,
    /// Final recipient addresses (clean form for local users); one for
    /// pipes. Never empty.
    pub to: Vec<String>,
    pub target: Target,
    /// Remote and forward jobs: the recipient domain (IDNA or Unicode, as
    /// queued stored it) and the outgoing security level queued has
    /// recorded for it; a connection weaker than that must not be used.
    pub security: Option<(String, SecLevel)>,
    /// Whether an earlier attempt for one of these recipients may have
    /// delivered without queued learning it (deliverd or queued died
    /// mid-attempt): the Maildir writer then also looks in `cur/` for the
    /// message, so it is never written twice.
    pub maybe_delivered: bool,
    /// Each recipient's position in its queue item, in `to`'s order: with
    /// the queue ID, the name of its Maildir file (a message to `team@`
    /// and `postmaster@` that both reach ann is two files). Empty when
    /// unknown (the address names the file then).
    pub positions: Vec<u32>,
}

/// queued → deliverd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDeliverd {
    /// A job; one file descriptor accompanies this frame.
    Job(Job),
    /// On a hook connection only: a hook to run. A `PostData` call is
    /// followed, in the same `sendmsg`, by a read-only descriptor of the
    /// message; the others carry none.
    Hook(HookCall),
}

/// Timeouts of the hooks (REFERENCE §6); deliverd kills the hook's whole
/// process group when one passes.
pub const POST_DATA_TIMEOUT: Duration = Duration::from_secs(60);
pub const ALIAS_HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// `hooks/rcpt` (tambo's own): long enough for a DNSBL query or a
/// greylisting database, short enough that a client waiting at RCPT does
/// not give up.
pub const RCPT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of a hook's standard output deliverd keeps; a hook that
/// prints more has its output treated as invalid (post-data) or as an
/// error (alias-resolve).
pub const MAX_HOOK_OUTPUT: usize = 16 * 1024;

/// Largest hook call frame: a post-data environment with 100 recipients
/// of 256 characters (4 bytes each at worst) and its sender.
pub const MAX_HOOK_CALL_FRAME: usize = 128 * 1024;

/// Largest hook result frame: the hook's output, an
/// Authentication-Results header for the signatures verified, the
/// refusal text.
pub const MAX_HOOK_RESULT_FRAME: usize = MAX_HOOK_OUTPUT + 16 * 1024;

/// One hook to run on queued's behalf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookCall {
    /// Unique on this connection; echoed in the result.
    pub call: u64,
    pub hook: Hook,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hook {
    /// After DATA (REFERENCE §2.8 steps 3 to 5): verify the DKIM
    /// signatures and write Authentication-Results if asked, then run
    /// `hooks/post-data` on the message with that header on top.
    PostData(PostData),
    /// `hooks/alias-resolve <address>`.
    AliasResolve { address: String },
    /// `hooks/alias-exists <address>`.
    AliasExists { address: String },
    /// `hooks/rcpt`, with one recipient in `rcpt_to`.
    Rcpt(HookEnv),
}

/// What a hook learns of the SMTP transaction, through its environment.
/// deliverd builds the environment from these fields itself: queued never
/// names a variable, so nothing like `LD_PRELOAD` can be passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookEnv {
    /// The client, `ip:port` (or `local`).
    pub remote_addr: String,
    /// The HELO/EHLO argument as sent.
    pub ehlo: String,
    /// Empty for `<>`.
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// `user@domain`, or empty.
    pub auth_as: String,
    pub on_tls: bool,
    pub from_local_domain: bool,
    pub spf: Option<SpfResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostData {
    /// The queue ID the message will have, for logs.
    pub queue_id: String,
    pub env: HookEnv,
    /// Whether queued found `hooks/post-data` (deliverd runs it only if it
    /// is still there).
    pub run_hook: bool,
    /// For mail that was not authenticated: write Authentication-Results
    /// with this authserv-id, this SPF report, and the verification of the
    /// message's DKIM signatures.
    pub auth_results: Option<AuthResultsRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthResultsRequest {
    pub authserv_id: String,
    pub spf: Option<SpfReport>,
}

/// A hook's decision on a recipient or a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HookVerdict {
    Accept,
    /// `permanent` for exit status 20; `text` is the hook's last complete
    /// line of output, possibly empty.
    Reject {
        permanent: bool,
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HookOutcome {
    PostData {
        /// Valid hook output to prepend (empty if none or invalid), with
        /// CRLF line ends.
        headers: String,
        /// The Authentication-Results header, CRLF line ends, if asked.
        auth_results: String,
        verdict: HookVerdict,
    },
    /// alias-resolve: its output (an aliases right-hand side, possibly
    /// empty) on exit 0, else why not.
    Resolve(Result<String, String>),
    /// alias-exists: exit 0.
    Exists(bool),
    Rcpt(HookVerdict),
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
    /// The result of a job: one outcome per recipient, in the job's order.
    /// `seen` is the security level of the connection the recipients were
    /// tried over, once it passed the job's check, so queued can raise its
    /// record (it never lowers one).
    Done {
        job: u64,
        outcomes: Vec<Outcome>,
        seen: Option<SecLevel>,
    },
    /// Sent when deliverd has had nothing to say for a while, so queued
    /// can close a connection whose peer went silent.
    Heartbeat,
    /// Instead of `Ready`, first after the hello: this connection runs
    /// hooks, at most `slots` at once. Hooks have their own connection so
    /// a client waiting on one never queues behind deliveries.
    HookReady { slots: u32 },
    /// On a hook connection: what came of a call.
    HookDone { call: u64, outcome: HookOutcome },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_result_fits_its_frame_limit() {
        // Texts over the cap, of 3-byte characters, for the most recipients.
        let text = "é€".repeat(MAX_FAILURE_TEXT);
        let outcomes: Vec<Outcome> = (0..MAX_RECIPIENTS_PER_JOB)
            .map(|_| Outcome::PermFail(text.clone()).capped())
            .collect();
        for o in &outcomes {
            let Outcome::PermFail(t) = o else { panic!() };
            assert!(t.len() <= MAX_FAILURE_TEXT && t.len() > MAX_FAILURE_TEXT - 3);
        }
        let frame = crate::frame::encode(&FromDeliverd::Done {
            job: u64::MAX,
            outcomes,
            seen: Some(SecLevel::TlsSecure),
        })
        .unwrap();
        assert!(frame.len() - 4 <= MAX_RESULT_FRAME, "{}", frame.len());
    }
}
