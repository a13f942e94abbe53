//! Counters, and the client that pushes their increases to monitord.
//!
//! Every process counts into a local map of pending increases; a background
//! task sends them to monitor.sock every half second. If monitord is down,
//! the increases stay in the map and go out once it is back. The map is
//! bounded by the number of distinct variables and labels (not by time), so
//! a long outage costs no memory growth; past [`MAX_KEYS`] new labels are
//! dropped and counted. Counting never waits on monitord.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::net::UnixStream;

use crate::Role;
use crate::frame::write_frame;
use crate::hello;
use crate::identity::Identities;
use crate::monitor::{
    Delta, MAX_DELTAS_PER_FRAME, MAX_PROFILE, MAX_PROFILE_SECONDS, MAX_REQUEST_FRAME,
    MonitorMessage, ProfileFuture, ProfileKind, ProfileRequest, Profiler,
};

/// Variable names: a compatibility contract (../shared/monitoring.md).
pub mod names {
    pub const VERSION: &str = "chasquid/version";
    pub const SOURCE_DATE_STR: &str = "chasquid/sourceDateStr";
    pub const SOURCE_DATE_TIMESTAMP: &str = "chasquid/sourceDateTimestamp";
    pub const SMTP_IN_COMMAND_COUNT: &str = "chasquid/smtpIn/commandCount";
    pub const SMTP_IN_RESPONSE_CODE_COUNT: &str = "chasquid/smtpIn/responseCodeCount";
    pub const SMTP_IN_TLS_COUNT: &str = "chasquid/smtpIn/tlsCount";
    pub const SMTP_IN_WRONG_PROTO_COUNT: &str = "chasquid/smtpIn/wrongProtoCount";
    pub const SMTP_IN_LOOPS_DETECTED: &str = "chasquid/smtpIn/loopsDetected";
    pub const QUEUE_PUT_COUNT: &str = "chasquid/queue/putCount";
    pub const QUEUE_ITEMS_WRITTEN: &str = "chasquid/queue/itemsWritten";
    pub const QUEUE_DELIVER_ATTEMPTS: &str = "chasquid/queue/deliverAttempts";
    pub const QUEUE_DSN_QUEUED: &str = "chasquid/queue/dsnQueued";
    pub const SMTP_IN_DKIM_SIGNED: &str = "chasquid/smtpIn/dkimSigned";
    pub const SMTP_IN_DKIM_SIGN_ERRORS: &str = "chasquid/smtpIn/dkimSignErrors";
    pub const SMTP_OUT_SECURITY_LEVEL_CHECKS: &str = "chasquid/smtpOut/securityLevelChecks";
    pub const SMTP_IN_SECURITY_LEVEL_CHECKS: &str = "chasquid/smtpIn/securityLevelChecks";
    pub const SMTP_IN_SPF_RESULT_COUNT: &str = "chasquid/smtpIn/spfResultCount";
    pub const SMTP_IN_HOOK_RESULTS: &str = "chasquid/smtpIn/hookResults";
    pub const ALIASES_HOOK_RESULTS: &str = "chasquid/aliases/hookResults";
    pub const SMTP_IN_DKIM_VERIFY_FOUND: &str = "chasquid/smtpIn/dkimVerifyFound";
    pub const SMTP_IN_DKIM_VERIFY_NOT_FOUND: &str = "chasquid/smtpIn/dkimVerifyNotFound";
    pub const SMTP_IN_DKIM_VERIFY_VALID: &str = "chasquid/smtpIn/dkimVerifyValid";
    pub const SMTP_IN_DKIM_VERIFY_ERRORS: &str = "chasquid/smtpIn/dkimVerifyErrors";
    pub const SMTP_OUT_STS_MODE: &str = "chasquid/smtpOut/sts/mode";
    pub const SMTP_OUT_STS_SECURITY: &str = "chasquid/smtpOut/sts/security";
    pub const SMTP_OUT_TLS_COUNT: &str = "chasquid/smtpOut/tlsCount";
    pub const STS_CACHE_EXPIRED: &str = "chasquid/sts/cache/expired";
    pub const STS_CACHE_FAILED_FETCH: &str = "chasquid/sts/cache/failedFetch";
    pub const STS_CACHE_FETCHES: &str = "chasquid/sts/cache/fetches";
    pub const STS_CACHE_HITS: &str = "chasquid/sts/cache/hits";
    pub const STS_CACHE_INVALID: &str = "chasquid/sts/cache/invalid";
    pub const STS_CACHE_IO_ERRORS: &str = "chasquid/sts/cache/ioErrors";
    pub const STS_CACHE_MARSHAL_ERRORS: &str = "chasquid/sts/cache/marshalErrors";
    pub const STS_CACHE_REFRESH_CYCLES: &str = "chasquid/sts/cache/refreshCycles";
    pub const STS_CACHE_REFRESH_ERRORS: &str = "chasquid/sts/cache/refreshErrors";
    pub const STS_CACHE_REFRESHES: &str = "chasquid/sts/cache/refreshes";
    pub const STS_CACHE_UNMARSHAL_ERRORS: &str = "chasquid/sts/cache/unmarshalErrors";
    /// Outgoing SMTP connections opened, and deliveries that reused one.
    pub const SMTP_OUT_CONNECTIONS: &str = "tambo/smtpOut/connections";
    pub const SMTP_OUT_REUSED: &str = "tambo/smtpOut/reused";
    /// `hooks/rcpt`, tambo's own: skip (no hook), success, fail.
    pub const SMTP_IN_RCPT_HOOK_RESULTS: &str = "tambo/smtpIn/rcptHookResults";
    pub const IPC_ERRORS: &str = "tambo/ipc/errors";
    pub const IPC_REFUSED: &str = "tambo/ipc/refused";
    pub const SMTP_IN_SESSIONS_REFUSED: &str = "tambo/smtpIn/sessionsRefused";
    pub const SMTP_IN_PROXY_ERRORS: &str = "tambo/smtpIn/proxyErrors";
    pub const QUEUE_UNREADABLE_ITEMS: &str = "tambo/queue/unreadableItems";
    pub const QUEUE_JOBS_EXPIRED: &str = "tambo/queue/jobsExpired";
    pub const QUEUE_DSNS_DROPPED: &str = "tambo/queue/dsnDropped";
    pub const TLS_SIGNATURES: &str = "tambo/tls/signatures";
    pub const TLS_SIGN_REFUSED: &str = "tambo/tls/signRefused";
    pub const CONFIG_RELOAD_ERRORS: &str = "tambo/config/reloadErrors";
    pub const MAILLOG_DROPPED: &str = "tambo/maillog/dropped";
    pub const MAILLOG_ERRORS: &str = "tambo/maillog/errors";
    pub const QUEUE_DIR_SYNCS: &str = "tambo/queue/dirSyncs";
    pub const METRICS_DROPPED: &str = "tambo/metrics/dropped";
    pub const MONITORD_DROPPED_KEYS: &str = "tambo/monitord/droppedKeys";
    pub const MONITORD_DROPPED_DELTAS: &str = "tambo/monitord/droppedDeltas";
    pub const MONITORD_DROPPED_REGISTER_FIELDS: &str = "tambo/monitord/droppedRegisterFields";
    pub const MONITORD_HTTP_CLOSED: &str = "tambo/monitord/httpClosed";
    /// Variables under this prefix are monitord's own; pushed increases to
    /// them are dropped.
    pub const MONITORD_PREFIX: &str = "tambo/monitord/";
    /// Every pushed variable is named under one of these (and is more
    /// than the prefix); monitord drops the rest, so a peer cannot add
    /// names beside the entries monitord writes itself (`cmdline`).
    pub const PUSHED_PREFIXES: [&str; 2] = ["chasquid/", "tambo/"];

    /// Whether `var` is under one of [`PUSHED_PREFIXES`].
    pub fn is_pushable(var: &str) -> bool {
        PUSHED_PREFIXES
            .iter()
            .any(|p| var.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
    }
}

/// Whether a variable is one counter or a map of label → counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Map,
}

/// Every counter variable tambo exports, with its kind and help text.
/// monitord shows all of them, at zero until something counts.
pub const VARIABLES: &[(&str, Kind, &str)] = &[
    (
        "chasquid/aliases/hookResults",
        Kind::Map,
        "aliases hook results",
    ),
    (
        "chasquid/queue/deliverAttempts",
        Kind::Map,
        "attempts to deliver mail, by recipient type",
    ),
    (
        "chasquid/queue/dsnQueued",
        Kind::Counter,
        "DSNs generated (queued)",
    ),
    (
        "chasquid/queue/itemsWritten",
        Kind::Counter,
        "items written to disk by the queue",
    ),
    (
        "chasquid/queue/putCount",
        Kind::Counter,
        "envelopes put in the queue",
    ),
    (
        "chasquid/smtpIn/commandCount",
        Kind::Map,
        "incoming SMTP commands, by command",
    ),
    (
        "chasquid/smtpIn/dkimSignErrors",
        Kind::Counter,
        "DKIM signing failures",
    ),
    (
        "chasquid/smtpIn/dkimSigned",
        Kind::Counter,
        "messages DKIM-signed",
    ),
    (
        "chasquid/smtpIn/dkimVerifyErrors",
        Kind::Counter,
        "DKIM verification errors",
    ),
    (
        "chasquid/smtpIn/dkimVerifyFound",
        Kind::Counter,
        "messages with a DKIM signature",
    ),
    (
        "chasquid/smtpIn/dkimVerifyNotFound",
        Kind::Counter,
        "messages without a DKIM signature",
    ),
    (
        "chasquid/smtpIn/dkimVerifyValid",
        Kind::Counter,
        "messages with a valid DKIM signature",
    ),
    (
        "chasquid/smtpIn/hookResults",
        Kind::Map,
        "post-data hook results",
    ),
    (
        "chasquid/smtpIn/loopsDetected",
        Kind::Counter,
        "mail loops detected",
    ),
    (
        "chasquid/smtpIn/responseCodeCount",
        Kind::Map,
        "reply codes sent to SMTP clients",
    ),
    (
        "chasquid/smtpIn/securityLevelChecks",
        Kind::Map,
        "incoming security level checks",
    ),
    (
        "chasquid/smtpIn/spfResultCount",
        Kind::Map,
        "SPF check results",
    ),
    (
        "chasquid/smtpIn/tlsCount",
        Kind::Map,
        "incoming connections, by TLS status",
    ),
    (
        "chasquid/smtpIn/wrongProtoCount",
        Kind::Map,
        "commands of other protocols on an SMTP port",
    ),
    (
        "chasquid/smtpOut/securityLevelChecks",
        Kind::Map,
        "outgoing security level checks",
    ),
    (
        "chasquid/smtpOut/sts/mode",
        Kind::Map,
        "STS checks on outgoing connections, by mode",
    ),
    (
        "chasquid/smtpOut/sts/security",
        Kind::Map,
        "STS security checks on outgoing connections",
    ),
    (
        "chasquid/smtpOut/tlsCount",
        Kind::Map,
        "outgoing connections, by TLS status",
    ),
    (
        "chasquid/sts/cache/expired",
        Kind::Counter,
        "expired entries in the STS cache",
    ),
    (
        "chasquid/sts/cache/failedFetch",
        Kind::Counter,
        "failed fetches in the STS cache",
    ),
    (
        "chasquid/sts/cache/fetches",
        Kind::Counter,
        "total fetches in the STS cache",
    ),
    (
        "chasquid/sts/cache/hits",
        Kind::Counter,
        "hits in the STS cache",
    ),
    (
        "chasquid/sts/cache/invalid",
        Kind::Counter,
        "invalid policies in the STS cache",
    ),
    (
        "chasquid/sts/cache/ioErrors",
        Kind::Counter,
        "I/O errors keeping the STS cache",
    ),
    (
        "chasquid/sts/cache/marshalErrors",
        Kind::Counter,
        "marshalling errors in the STS cache",
    ),
    (
        "chasquid/sts/cache/refreshCycles",
        Kind::Counter,
        "STS cache refresh cycles",
    ),
    (
        "chasquid/sts/cache/refreshErrors",
        Kind::Counter,
        "STS cache refresh errors",
    ),
    (
        "chasquid/sts/cache/refreshes",
        Kind::Counter,
        "STS cache refreshes",
    ),
    (
        "chasquid/sts/cache/unmarshalErrors",
        Kind::Counter,
        "unmarshalling errors in the STS cache",
    ),
    (
        "tambo/config/reloadErrors",
        Kind::Map,
        "reloads that failed and kept the previous files, by what (domains, certificates, domaininfo)",
    ),
    (
        "tambo/ipc/errors",
        Kind::Map,
        "IPC connections closed on a protocol error, by process",
    ),
    (
        "tambo/ipc/refused",
        Kind::Map,
        "IPC connections refused (wrong uid or role, or over a cap), by socket",
    ),
    (
        "tambo/maillog/dropped",
        Kind::Counter,
        "mail log lines dropped: the writer was behind, or a log link over its budget",
    ),
    (
        "tambo/maillog/errors",
        Kind::Counter,
        "mail log lines that could not be written",
    ),
    (
        "tambo/queue/dsnDropped",
        Kind::Counter,
        "DSNs not queued because the sender does not exist locally",
    ),
    (
        "tambo/queue/jobsExpired",
        Kind::Counter,
        "delivery jobs deliverd did not report on before their deadline",
    ),
    (
        "tambo/queue/unreadableItems",
        Kind::Counter,
        "queue items found unreadable at startup (left on disk)",
    ),
    (
        "tambo/tls/signRefused",
        Kind::Map,
        "TLS handshake signatures queued refused, by reason (input, rate)",
    ),
    (
        "tambo/tls/signatures",
        Kind::Counter,
        "TLS handshake signatures queued made for smtpd",
    ),
    (
        "tambo/smtpIn/sessionsRefused",
        Kind::Map,
        "SMTP connections refused over a session cap, by cap",
    ),
    (
        "tambo/smtpIn/proxyErrors",
        Kind::Map,
        "connections closed for their PROXY header (haproxy_incoming), by reason",
    ),
    (
        "tambo/metrics/dropped",
        Kind::Counter,
        "counter increases dropped because the pending map was full",
    ),
    (
        "tambo/monitord/droppedKeys",
        Kind::Counter,
        "counter increases monitord dropped, for any reason (see droppedDeltas)",
    ),
    (
        "tambo/monitord/droppedDeltas",
        Kind::Map,
        "counter increases monitord dropped, by reason",
    ),
    (
        "tambo/monitord/droppedRegisterFields",
        Kind::Counter,
        "registration fields (version, flags) monitord dropped as too long or too many",
    ),
    (
        "tambo/monitord/httpClosed",
        Kind::Map,
        "monitoring HTTP connections monitord closed, by reason",
    ),
    (
        "tambo/smtpOut/connections",
        Kind::Counter,
        "outgoing SMTP and LMTP connections opened",
    ),
    (
        "tambo/smtpOut/reused",
        Kind::Counter,
        "outgoing deliveries that reused an open connection",
    ),
    (
        "tambo/smtpIn/rcptHookResults",
        Kind::Map,
        "rcpt hook results, by result",
    ),
];

/// Most distinct (variable, label) pairs kept while monitord is away.
pub const MAX_KEYS: usize = 4096;

/// Pending counter increases of this process.
#[derive(Default)]
pub struct Metrics {
    /// variable → label ("" for plain counters) → pending increase.
    pending: Mutex<HashMap<String, HashMap<String, u64>>>,
    dropped: AtomicU64,
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process-wide counters.
pub fn global() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::default)
}

/// Adds one to a plain counter.
pub fn inc(var: &str) {
    global().add(var, None, 1);
}

/// Adds `n` to a map variable's label.
pub fn add_label(var: &str, label: &str, n: u64) {
    global().add(var, Some(label), n);
}

/// Adds one to a map variable's label.
pub fn inc_label(var: &str, label: &str) {
    global().add(var, Some(label), 1);
}

impl Metrics {
    pub fn add(&self, var: &str, label: Option<&str>, n: u64) {
        let label = label.unwrap_or("");
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let keys: usize = map.values().map(HashMap::len).sum();
        if let Some(inner) = map.get_mut(var) {
            if let Some(v) = inner.get_mut(label) {
                *v += n;
                return;
            }
            if keys < MAX_KEYS {
                inner.insert(label.to_string(), n);
                return;
            }
        } else if keys < MAX_KEYS {
            map.entry(var.to_string())
                .or_default()
                .insert(label.to_string(), n);
            return;
        }
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes every pending increase.
    pub fn take(&self) -> Vec<Delta> {
        let map = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::new();
        for (var, inner) in map {
            for (label, value) in inner {
                let label = if label.is_empty() { None } else { Some(label) };
                out.push(Delta {
                    var: var.clone(),
                    label,
                    value,
                });
            }
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            out.push(Delta {
                var: names::METRICS_DROPPED.into(),
                label: None,
                value: dropped,
            });
        }
        out
    }

    /// Puts back increases that could not be sent.
    pub fn restore(&self, deltas: Vec<Delta>) {
        for d in deltas {
            self.add(&d.var, d.label.as_deref(), d.value);
        }
    }
}

/// How often a pusher with nothing to send still sends an (empty)
/// heartbeat, so monitord's idle timeout only closes dead connections.
pub const HEARTBEAT: Duration = Duration::from_secs(30);

/// What a process pushes to monitord, and how.
pub struct Pusher {
    /// monitor.sock.
    pub socket: PathBuf,
    pub role: Role,
    /// Flags as given on the command line (`/debug/flags`).
    pub flags: Vec<(String, String)>,
    pub version: String,
    /// The effective config (`/debug/config`).
    pub config: String,
    pub ids: Identities,
    /// How often an empty batch goes out when there is nothing to send
    /// ([`HEARTBEAT`] unless monitord's idle timeout is shortened).
    pub heartbeat: Duration,
    /// What takes this process's profiles, if it was built with them.
    pub profiler: Option<Profiler>,
}

/// Starts the task that pushes this process's counters to monitord. It
/// reconnects forever, with the pending map as the bounded buffer.
pub fn spawn_pusher(p: Pusher) {
    let Pusher {
        socket,
        role,
        flags,
        version,
        mut config,
        ids,
        heartbeat,
        profiler,
    } = p;
    if config.len() > crate::monitor::MAX_CONFIG {
        let mut cut = crate::monitor::MAX_CONFIG - 64;
        while !config.is_char_boundary(cut) {
            cut -= 1;
        }
        config.truncate(cut);
        config.push_str("\n# … cut: longer than monitord keeps\n");
    }
    // This run of the process, for monitord to tell a reconnection from a
    // process it has not counted yet.
    let instance = {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ (u64::from(std::process::id()) << 40)
    };
    let reg = Registration {
        role,
        flags,
        version,
        config,
        instance,
    };
    tokio::spawn(async move {
        // Everything pushed so far, for the baseline of a new monitord.
        let mut pushed: HashMap<(String, Option<String>), u64> = HashMap::new();
        // The last queue snapshot, sent again to a new monitord.
        let mut last_queue: Option<String> = None;
        let mut last_state: Option<tokio::time::Instant> = None;
        let mut fresh = false;
        let mut conn: Option<Conn> = None;
        let mut generation = 0u64;
        // Finished profiles, tagged with the connection they were asked on.
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(1);
        let mut profiling = false;
        let mut interval = tokio::time::interval(heartbeat.min(Duration::from_millis(500)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut warned = false;
        let mut last_sent = tokio::time::Instant::now();
        loop {
            interval.tick().await;
            if conn.is_none() {
                match connect(&socket, &reg, &pushed, &ids).await {
                    Ok(s) => {
                        generation += 1;
                        if warned {
                            tracing::info!("reconnected to monitord at {}", socket.display());
                        }
                        warned = false;
                        fresh = true;
                        last_state = None;
                        conn = Some(Conn::new(s, generation));
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(
                                "monitord unreachable at {}: {e}; keeping counters until it is back",
                                socket.display()
                            );
                            warned = true;
                        }
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else {
                continue;
            };
            // monitord's requests. End of file means it went away
            // (restarted), and a new one wants the baseline now, not at
            // the next push.
            let request = match c.requests.try_recv() {
                Ok(r) => Some(r),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => None,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    conn = None;
                    continue;
                }
            };
            let stream = &mut c.w;
            let mut answer = None;
            if let Some(req) = request {
                match start_profile(req, profiler, profiling) {
                    Ok(run) => {
                        profiling = true;
                        let done = done_tx.clone();
                        let generation = c.generation;
                        tokio::spawn(async move {
                            // A profile that panics is answered too, or
                            // this process would stay "busy" for good.
                            let result = tokio::spawn(run)
                                .await
                                .unwrap_or_else(|e| Err(format!("the profile failed: {e}")));
                            let _ = done.send((generation, req.id, result)).await;
                        });
                    }
                    Err(why) => answer = Some((req.id, Err(why))),
                }
            }
            if let Ok((g, id, result)) = done_rx.try_recv() {
                profiling = false;
                // Asked on a connection since lost: nobody waits for it.
                if g == c.generation {
                    answer = Some((id, result));
                }
            }
            if let Some((id, result)) = answer {
                let result = result.and_then(|p| {
                    if p.len() > MAX_PROFILE {
                        Err(format!(
                            "the profile is {} bytes, over the {MAX_PROFILE} monitord takes: ask for fewer seconds",
                            p.len()
                        ))
                    } else {
                        Ok(p)
                    }
                });
                let msg = MonitorMessage::Profile { id, result };
                let sent =
                    tokio::time::timeout(Duration::from_secs(30), write_frame(stream, &msg)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    conn = None;
                    continue;
                }
            }
            // queued's queue snapshot: when it changed, and again to a
            // new connection.
            let snapshot = match take_queue_snapshot() {
                Some(t) => {
                    last_queue = Some(t.clone());
                    Some(t)
                }
                None if fresh => last_queue.clone(),
                None => None,
            };
            fresh = false;
            if let Some(text) = snapshot {
                let msg = MonitorMessage::Queue(text);
                let sent =
                    tokio::time::timeout(Duration::from_secs(2), write_frame(stream, &msg)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    conn = None;
                    continue;
                }
            }
            // The runtime's state, every few seconds.
            if last_state.is_none_or(|t: tokio::time::Instant| t.elapsed() >= STATE_EVERY) {
                let msg = MonitorMessage::State(runtime_state());
                let sent =
                    tokio::time::timeout(Duration::from_secs(2), write_frame(stream, &msg)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    conn = None;
                    continue;
                }
                let msg = MonitorMessage::Active(crate::trace::active());
                let sent =
                    tokio::time::timeout(Duration::from_secs(2), write_frame(stream, &msg)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    conn = None;
                    continue;
                }
                last_state = Some(tokio::time::Instant::now());
            }
            // Finished traces, a frame at a time.
            let mut lost = false;
            loop {
                let traces = crate::trace::take();
                if traces.is_empty() {
                    break;
                }
                let msg = MonitorMessage::Traces(traces);
                let sent =
                    tokio::time::timeout(Duration::from_secs(2), write_frame(stream, &msg)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    if let MonitorMessage::Traces(t) = msg {
                        crate::trace::restore(t);
                    }
                    lost = true;
                    break;
                }
            }
            if lost {
                conn = None;
                continue;
            }
            let mut deltas = global().take();
            if deltas.is_empty() && last_sent.elapsed() < heartbeat {
                continue;
            }
            // One frame per batch of at most MAX_DELTAS_PER_FRAME; what
            // cannot be sent goes back into the map.
            loop {
                let rest = deltas.split_off(deltas.len().min(MAX_DELTAS_PER_FRAME));
                let msg = MonitorMessage::Deltas(deltas);
                let sent =
                    tokio::time::timeout(Duration::from_secs(2), write_frame(stream, &msg)).await;
                let MonitorMessage::Deltas(batch) = msg else {
                    break;
                };
                if !matches!(sent, Ok(Ok(()))) {
                    global().restore(batch);
                    global().restore(rest);
                    conn = None;
                    break;
                }
                for d in batch {
                    let v = pushed.entry((d.var, d.label)).or_default();
                    *v = v.saturating_add(d.value);
                }
                last_sent = tokio::time::Instant::now();
                if rest.is_empty() {
                    break;
                }
                deltas = rest;
            }
        }
    });
}

/// A connection to monitord: what the pusher writes, and the requests a
/// reader task takes from it (closed when monitord goes away).
struct Conn {
    w: tokio::net::unix::OwnedWriteHalf,
    requests: tokio::sync::mpsc::Receiver<ProfileRequest>,
    reader: tokio::task::AbortHandle,
    generation: u64,
}

impl Conn {
    fn new(s: UnixStream, generation: u64) -> Conn {
        let (r, w) = s.into_split();
        let (tx, requests) = tokio::sync::mpsc::channel(1);
        let reader = tokio::spawn(async move {
            let mut r = crate::frame::FrameReader::new(r);
            // Requests only, one at a time: monitord has no reason to
            // queue more, and anything else ends the connection.
            while let Ok(Some(req)) = r.read::<ProfileRequest>(MAX_REQUEST_FRAME).await {
                if tx.try_send(req).is_err() {
                    tracing::warn!("monitord sent a request before the last was taken; closing");
                    break;
                }
            }
        })
        .abort_handle();
        Conn {
            w,
            requests,
            reader,
            generation,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Checks a request and gives the profile to run, or why it is refused.
fn start_profile(
    req: ProfileRequest,
    profiler: Option<Profiler>,
    busy: bool,
) -> Result<ProfileFuture, String> {
    let Some(profiler) = profiler else {
        return Err("this build has no profiler (cargo feature `profile`)".into());
    };
    if busy {
        return Err("a profile of this process is being taken; try again when it is done".into());
    }
    if let ProfileKind::Cpu { seconds } = req.kind
        && !(1..=MAX_PROFILE_SECONDS).contains(&seconds)
    {
        return Err(format!(
            "seconds must be 1 to {MAX_PROFILE_SECONDS}, not {seconds}"
        ));
    }
    Ok(profiler(req.kind))
}

/// What a pusher says when it registers.
struct Registration {
    role: Role,
    flags: Vec<(String, String)>,
    version: String,
    config: String,
    instance: u64,
}

/// Connects, registers, and sends the baseline: everything pushed so far.
async fn connect(
    socket: &std::path::Path,
    reg: &Registration,
    pushed: &HashMap<(String, Option<String>), u64>,
    ids: &Identities,
) -> Result<UnixStream, crate::Error> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        hello::connect(socket, reg.role, Role::Monitord, ids),
    )
    .await
    .map_err(|_| crate::Error::Io(std::io::ErrorKind::TimedOut.into()))??;
    let msg = MonitorMessage::Register {
        role: reg.role,
        pid: std::process::id(),
        version: reg.version.clone(),
        flags: crate::monitor::bounded_flags(&reg.flags),
        instance: reg.instance,
        config: reg.config.clone(),
    };
    write_frame(&mut s, &msg).await?;
    let all: Vec<Delta> = pushed
        .iter()
        .map(|((var, label), value)| Delta {
            var: var.clone(),
            label: label.clone(),
            value: *value,
        })
        .collect();
    for chunk in all.chunks(MAX_DELTAS_PER_FRAME) {
        tokio::time::timeout(
            Duration::from_secs(2),
            write_frame(&mut s, &MonitorMessage::Baseline(chunk.to_vec())),
        )
        .await
        .map_err(|_| crate::Error::Io(std::io::ErrorKind::TimedOut.into()))??;
    }
    Ok(s)
}

/// How often a process says how its runtime is (`/debug/tasks`).
const STATE_EVERY: Duration = Duration::from_secs(5);

/// The runtime's state as text: tokio's workers and tasks (what stable
/// tokio tells), and the process's CPU time and peak memory (getrusage:
/// no file to read, which the lockdown would forbid).
pub fn runtime_state() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        let m = h.metrics();
        let _ = writeln!(
            s,
            "tokio: {} workers, {} tasks alive, {} in the global queue",
            m.num_workers(),
            m.num_alive_tasks(),
            m.global_queue_depth()
        );
        for w in 0..m.num_workers().min(64) {
            let _ = writeln!(
                s,
                "  worker {w}: busy {:.3}s, parked {} times",
                m.worker_total_busy_duration(w).as_secs_f64(),
                m.worker_park_count(w)
            );
        }
    }
    if let Ok(u) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        let _ = writeln!(
            s,
            "cpu: user {:.3}s, system {:.3}s; peak resident {} KiB; {} voluntary and {} involuntary context switches",
            secs(u.user_time()),
            secs(u.system_time()),
            u.max_rss(),
            u.voluntary_context_switches(),
            u.involuntary_context_switches()
        );
    }
    s.truncate(crate::monitor::MAX_STATE);
    s
}

static QUEUE_SNAPSHOT: Mutex<Option<String>> = Mutex::new(None);

/// queued: the queue as `/debug/queue` shows it, sent to monitord with the
/// next push (only the latest is kept). Longer than
/// [`crate::monitor::MAX_QUEUE_SNAPSHOT`]: cut, and it says so.
pub fn set_queue_snapshot(mut text: String) {
    let max = crate::monitor::MAX_QUEUE_SNAPSHOT;
    if text.len() > max {
        let mut cut = max - 128;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n… cut here: `tambo queue list` shows every item\n");
    }
    *QUEUE_SNAPSHOT.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
}

fn take_queue_snapshot() -> Option<String> {
    QUEUE_SNAPSHOT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_and_restores() {
        let m = Metrics::default();
        m.add("a", None, 1);
        m.add("a", None, 2);
        m.add("b", Some("EHLO"), 1);
        let mut d = m.take();
        d.sort_by(|x, y| x.var.cmp(&y.var));
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].value, 3);
        assert!(m.take().is_empty());
        m.restore(d);
        m.add("a", None, 1);
        let total: u64 = m
            .take()
            .iter()
            .filter(|d| d.var == "a")
            .map(|d| d.value)
            .sum();
        assert_eq!(total, 4);
    }

    #[test]
    fn pending_map_is_bounded() {
        let m = Metrics::default();
        for i in 0..MAX_KEYS + 10 {
            m.add("v", Some(&i.to_string()), 1);
        }
        let d = m.take();
        assert_eq!(d.len(), MAX_KEYS + 1);
        let dropped = d.iter().find(|d| d.var == names::METRICS_DROPPED).unwrap();
        assert_eq!(dropped.value, 10);
    }

    #[test]
    fn monitord_variables_are_exported() {
        for name in [
            names::MONITORD_DROPPED_KEYS,
            names::MONITORD_DROPPED_DELTAS,
            names::MONITORD_DROPPED_REGISTER_FIELDS,
            names::MONITORD_HTTP_CLOSED,
        ] {
            assert!(name.starts_with(names::MONITORD_PREFIX), "{name}");
            assert!(VARIABLES.iter().any(|(n, _, _)| *n == name), "{name}");
        }
    }

    #[test]
    fn every_variable_can_be_pushed() {
        for (name, _, _) in VARIABLES {
            assert!(names::is_pushable(name), "{name}");
        }
        assert!(!names::is_pushable("cmdline"));
        assert!(!names::is_pushable("tambo/"));
        assert!(!names::is_pushable("tambo_x"));
        assert!(names::is_pushable("tambo/x"));
    }

    #[test]
    fn variable_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (name, _, _) in VARIABLES {
            assert!(seen.insert(*name), "{name} twice");
        }
    }

    fn no_profile(_: ProfileKind) -> ProfileFuture {
        Box::pin(async { Ok(vec![1, 2, 3]) })
    }

    #[test]
    fn profile_requests_are_checked() {
        let req = |kind| ProfileRequest { id: 1, kind };
        let cpu = |seconds| req(ProfileKind::Cpu { seconds });
        assert!(start_profile(cpu(1), None, false).is_err());
        assert!(start_profile(cpu(1), Some(no_profile), true).is_err());
        for bad in [0, MAX_PROFILE_SECONDS + 1, u32::MAX] {
            let e = start_profile(cpu(bad), Some(no_profile), false)
                .err()
                .unwrap();
            assert!(e.contains("seconds must be"), "{e}");
        }
        assert!(start_profile(cpu(MAX_PROFILE_SECONDS), Some(no_profile), false).is_ok());
        assert!(start_profile(req(ProfileKind::Heap), Some(no_profile), false).is_ok());
    }

    /// monitord may send requests only: anything else, a frame over the
    /// limit, or a second request before the first is taken, ends the
    /// connection.
    #[tokio::test]
    async fn a_hostile_monitord_gets_the_connection_closed() {
        use tokio::io::AsyncWriteExt;
        let good = ProfileRequest {
            id: 1,
            kind: ProfileKind::Heap,
        };
        let other = crate::frame::encode(&MonitorMessage::State("x".into())).unwrap();
        let mut two = crate::frame::encode(&good).unwrap();
        two.extend(crate::frame::encode(&good).unwrap());
        let mut huge = ((MAX_REQUEST_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.resize(4 + MAX_REQUEST_FRAME + 1, 0);
        for (what, bytes) in [
            ("another message", other),
            ("two at once", two),
            ("too large", huge),
        ] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            let mut c = Conn::new(ours, 1);
            theirs.write_all(&bytes).await.unwrap();
            // At most the first request comes through; then the channel
            // closes.
            let mut got = 0;
            loop {
                match tokio::time::timeout(Duration::from_secs(5), c.requests.recv()).await {
                    Ok(Some(r)) => {
                        assert_eq!(r, good, "{what}");
                        got += 1;
                    }
                    Ok(None) => break,
                    Err(_) => panic!("{what}: the connection stayed open"),
                }
            }
            assert!(got <= 1, "{what}");
        }
    }
}
