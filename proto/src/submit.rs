//! submit.sock: one connection per SMTP session, smtpd → queued.
//!
//! queued keeps the session's state (envelope, and later its
//! authentication) tied to this connection, and decides every recipient
//! itself: a compromised smtpd can ask, but cannot relay. Every request gets
//! exactly one reply, except `DataChunk` and `DataAbort`, which get none so
//! the body streams without round trips.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// queued closes a submit.sock connection that sends nothing for this
/// long; smtpd keeps its links alive well within it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// How the SMTP client reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Port 25.
    Smtp,
    /// Port 587.
    Submission,
    /// Port 465 (implicit TLS).
    SubmissionTls,
}

/// Names a certificate (and so its private key, which stays in queued):
/// the SHA-256 of its leaf certificate.
pub type CertId = [u8; 32];

/// A certificate as smtpd sees it: the chain, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertEntry {
    pub id: CertId,
    /// The `certs/` directory it came from.
    pub name: String,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// TLS signature schemes its key can make (IANA code points).
    pub schemes: Vec<u16>,
    /// The key's algorithm (rustls `SignatureAlgorithm` code point).
    pub algorithm: u8,
}

/// queued's answer to an AUTH attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthVerdict {
    /// 235 2.7.0; the session may now relay.
    Accepted,
    /// 535 5.7.8.
    Invalid,
    /// The client's failure budget is spent: 454 4.7.0, nothing checked.
    Blocked,
    /// The backend failed: 454 4.7.0.
    TempError,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmitRequest {
    /// Once, first after the hello: who the client is, and whether the
    /// SMTP session is on TLS (a link opened before STARTTLS is closed).
    Session {
        client: String,
        mode: Mode,
        tls: bool,
    },
    /// Instead of `Session`, first after the hello: this connection is
    /// smtpd's key link, for certificates and TLS handshake signatures.
    KeyLink,
    /// On a key link: the certificates (chains only).
    Certificates,
    /// On a key link: a handshake signature with `cert`'s key. queued signs
    /// only inputs shaped like a TLS 1.2 ServerKeyExchange or a TLS 1.3
    /// CertificateVerify.
    Sign {
        cert: CertId,
        scheme: u16,
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
    },
    /// A SASL identity and password to check (AUTH PLAIN or LOGIN).
    Auth {
        identity: String,
        #[serde(with = "serde_bytes")]
        password: Vec<u8>,
    },
    /// Starts a new envelope. `from` is empty for the null sender `<>`.
    /// The rest is what smtpd knows of the transaction, for queued's
    /// checks, the hooks and the Authentication-Results header.
    Mail {
        from: String,
        /// The HELO/EHLO argument as the client sent it (empty before
        /// HELO: REFERENCE §2.3 allows MAIL without it).
        ehlo: String,
        /// The host name this connection answers as (`hostname`, or the
        /// SNI name a certificate covers): the authserv-id.
        server_name: String,
        /// The SPF check of the sender, when one ran (REFERENCE §2.6:
        /// not for `<>` nor for authenticated sessions).
        spf: Option<SpfReport>,
    },
    /// One recipient, as the client gave it.
    Rcpt { to: String },
    /// Forgets the envelope.
    Rset,
    /// The client sent DATA: open a spool file for the body.
    DataBegin,
    /// Part of the message: added headers first, then the unstuffed body
    /// with CRLF line ends.
    DataChunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The whole body was sent: make it durable and queue it.
    DataEnd,
    /// The body will not be completed (too big, bad line ending, client
    /// gone): throw it away. No reply.
    DataAbort,
    /// Keeps an idle link open (queued closes links idle for longer than
    /// its idle timeout); replied to with `Ok`.
    Ping,
    /// Instead of `Session`, first after the hello: this connection
    /// carries smtpd's mail-log events to queued, which writes the one
    /// mail log (REFERENCE §8). Nothing is replied on it, ever.
    LogLink,
    /// On a log link: one event smtpd saw.
    Log(MailLogEvent),
    /// Instead of `Session`, first after the hello, from the admin CLI
    /// (role ctl: root): one request, answered by `Admin`, then queued
    /// closes the connection.
    Admin(AdminRequest),
}

/// What `tambo` asks the running queued (REFERENCE §9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// What an address resolves to now: one `(type, address)` per result.
    AliasesResolve { address: String },
    /// Forgets a domain's security levels (both directions back to plain).
    DomaininfoRemove { domain: String },
    /// The queue, as `/debug/queue` shows it (REFERENCE §7.4).
    QueueList,
    /// Tries one item now (or every item).
    QueueFlush { id: Option<String> },
    /// Takes an item out of the queue: its pending recipients fail with a
    /// DSN to the sender, or, `silent`, the item is dropped without one.
    QueueRemove { id: String, silent: bool },
}

/// What smtpd tells the mail log (REFERENCE §8). queued writes it, with
/// its time, made safe and bounded; `client` is the client's address as
/// smtpd knows it (`ip:port`, `[ip]:port` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailLogEvent {
    /// A listener opened: what it serves and where.
    Listening { what: String, addr: String },
    /// An AUTH attempt ended.
    Auth {
        client: String,
        user: String,
        ok: bool,
    },
    /// MAIL, RCPT or DATA refused: the sender and recipients known then.
    /// `temporary` (a 4xx): logged as `deferred`, which no fail2ban
    /// filter counts (an outage on our side must never ban a client).
    Rejected {
        client: String,
        from: Option<String>,
        to: Vec<String>,
        reason: String,
        temporary: bool,
    },
    /// Another reply of 500 or more (or the 421 of too many errors): the
    /// command's verb (`unknown` when it was none), the code, the reason.
    Error {
        client: String,
        verb: String,
        code: u16,
        reason: String,
    },
}

/// An SPF result (RFC 7208 §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SpfResult {
    None,
    Neutral,
    Pass,
    Fail,
    SoftFail,
    TempError,
    PermError,
}

impl SpfResult {
    /// The name RFC 7208 gives it, as headers and counters spell it.
    pub fn name(self) -> &'static str {
        match self {
            SpfResult::None => "none",
            SpfResult::Neutral => "neutral",
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }

    pub const EVERY: [SpfResult; 7] = [
        SpfResult::None,
        SpfResult::Neutral,
        SpfResult::Pass,
        SpfResult::Fail,
        SpfResult::SoftFail,
        SpfResult::TempError,
        SpfResult::PermError,
    ];
}

/// What smtpd's SPF check found: the result, and why (for the headers;
/// may be empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpfReport {
    pub result: SpfResult,
    /// The sender domain checked.
    pub domain: String,
    pub reason: String,
}

/// Longest text of a hook's refusal that reaches the client.
pub const MAX_HOOK_TEXT: usize = 400;

/// queued's verdict on a recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptVerdict {
    Accepted,
    /// Local domain, no such user or alias (550 5.1.1).
    NoSuchUser,
    /// Non-local domain and the session is not authenticated (503 5.7.1).
    RelayDenied,
    /// The address does not normalise (550 5.1.3 / 501 5.1.2).
    Invalid(String),
    /// The existence check failed (451 4.4.3).
    TempError(String),
    /// Too many recipients in this transaction (452 4.5.3).
    TooMany,
    /// `hooks/rcpt` refused it: 550 5.7.1 if permanent (exit 20), else
    /// 451 4.7.1; `text` is the hook's last line (may be empty).
    HookRejected {
        permanent: bool,
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmitReply {
    Ok,
    Rcpt(RcptVerdict),
    /// A request arrived out of order (e.g. RCPT before MAIL).
    BadSequence(String),
    /// DataBegin accepted: send the body.
    DataReady,
    /// The message is on disk, fsync'd: the client may get its 250.
    Queued {
        id: String,
    },
    /// The message was not queued; the client gets a 4xx (451 4.3.0).
    /// `reason` is for smtpd's log, never for the client.
    Failed {
        reason: String,
    },
    /// Too many message bytes are being received at once (queued's
    /// in-flight budget); the client gets 452 4.3.1 and may retry later.
    NoSpace {
        reason: String,
    },
    /// MAIL refused: this mode needs AUTH first (550 5.7.9).
    AuthRequired,
    /// MAIL refused: the authenticated user may not send as this address
    /// (550 5.7.1).
    SenderNotAllowed,
    /// MAIL refused: the sender domain was seen over TLS before, and this
    /// session is plain text (550 5.7.3, REFERENCE §2.6).
    SecurityLevelTooLow,
    /// The post-data hook refused the message: 554 5.7.1 if permanent
    /// (exit 20), else 451 4.7.1; `text` is its last line (may be empty).
    HookRejected {
        permanent: bool,
        text: String,
    },
    Auth(AuthVerdict),
    Certificates(Vec<CertEntry>),
    Signature(#[serde(with = "serde_bytes")] Vec<u8>),
    /// queued would not sign (not a handshake input, over the rate, no
    /// such key); the handshake fails.
    SignRefused(String),
    /// The answer to an `Admin` request: the text to print, or the error
    /// line.
    Admin(Result<String, String>),
    /// First on local.sock, from queued: the address the connecting user
    /// submits as (their login, `user@<local domain>`).
    LocalLogin(String),
}
