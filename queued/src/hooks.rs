//! Hooks, asked of deliverd (DESIGN §1: queued never execs).
//!
//! deliverd holds a connection to deliver.sock for hooks alone, so a
//! client waiting on a hook never queues behind deliveries; calls go out
//! on it (at most as many at once as deliverd said it runs) and each comes
//! back as a [`HookOutcome`]. Whatever goes wrong on the way — no deliverd
//! connected, the connection lost, no answer in time — is an error the
//! caller turns into a temporary refusal (REFERENCE §6: never an accept).

mod conn;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};

use tambo_common::address;
use tambo_common::aliases;
use tambo_common::config::Config;
use tambo_proto::deliver::{
    ALIAS_HOOK_TIMEOUT, Hook, HookOutcome, POST_DATA_TIMEOUT, RCPT_HOOK_TIMEOUT,
};
use tambo_proto::metrics::{self, names};

pub use conn::serve;

/// The hooks, by the name of their file in `<config_dir>/hooks/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    PostData,
    AliasResolve,
    AliasExists,
    Rcpt,
}

impl Name {
    pub fn file(self) -> &'static str {
        match self {
            Name::PostData => "post-data",
            Name::AliasResolve => "alias-resolve",
            Name::AliasExists => "alias-exists",
            Name::Rcpt => "rcpt",
        }
    }

    fn of(hook: &Hook) -> Self {
        match hook {
            Hook::PostData(_) => Name::PostData,
            Hook::AliasResolve { .. } => Name::AliasResolve,
            Hook::AliasExists { .. } => Name::AliasExists,
            Hook::Rcpt(_) => Name::Rcpt,
        }
    }

    fn timeout(self) -> Duration {
        match self {
            Name::PostData => POST_DATA_TIMEOUT,
            Name::AliasResolve | Name::AliasExists => ALIAS_HOOK_TIMEOUT,
            Name::Rcpt => RCPT_HOOK_TIMEOUT,
        }
    }
}

/// Why a hook gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("deliverd, which runs the hooks, is not connected")]
    NoDeliverd,
    #[error("deliverd went away while running the {0} hook")]
    Lost(&'static str),
    #[error("no answer from the {0} hook within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("deliverd answered the {0} hook with the wrong kind of result")]
    WrongAnswer(&'static str),
    #[error("the {0} hook call does not fit its frame limit")]
    TooLarge(&'static str),
}

/// A call waiting for a deliverd slot.
struct Pending {
    hook: Hook,
    /// The message, for post-data: sent as a read-only descriptor.
    body: Option<PathBuf>,
    reply: oneshot::Sender<Result<HookOutcome, HookError>>,
    /// How long the caller waits.
    limit: Duration,
}

pub struct Hooks {
    dir: PathBuf,
    /// Replaces every hook's timeout (tests).
    timeout: Option<Duration>,
    tx: mpsc::UnboundedSender<Pending>,
    rx: Mutex<mpsc::UnboundedReceiver<Pending>>,
    /// Hook connections up right now; with none, calls fail after
    /// [`GRACE`].
    live: AtomicUsize,
    /// Rings when a hook connection comes up.
    up: tokio::sync::Notify,
}

/// How long a call waits for deliverd's hook connection when none is up:
/// long enough to ride over deliverd (re)connecting, short enough that a
/// client hears its 451 promptly when deliverd is really down.
const GRACE: Duration = Duration::from_secs(2);

/// Beyond the hook's own timeout, how long a call may take in deliverd
/// (before the hook: up to 15 s of DKIM key lookups and the hashing; after
/// it: the kill and the last output) and waiting for a slot. Within
/// smtpd's 120 s wait for queued's answer.
fn margin(name: Name) -> Duration {
    match name {
        Name::PostData => Duration::from_secs(35),
        _ => Duration::from_secs(12),
    }
}

impl Hooks {
    pub fn new(cfg: &Config) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            dir: cfg.config_dir.join("hooks"),
            timeout: cfg.testing.hook_timeout,
            tx,
            rx: Mutex::new(rx),
            live: AtomicUsize::new(0),
            up: tokio::sync::Notify::new(),
        }
    }

    /// Whether the site has this hook (a file by its name). Asked on every
    /// use, so adding or removing a hook needs no reload.
    pub fn exists(&self, name: Name) -> bool {
        is_file(&self.dir.join(name.file()))
    }

    /// Runs `hook` in deliverd and waits for what came of it.
    pub async fn call(&self, hook: Hook, body: Option<PathBuf>) -> Result<HookOutcome, HookError> {
        let name = Name::of(&hook);
        if !self.wait_live().await {
            return Err(HookError::NoDeliverd);
        }
        let (reply, rx) = oneshot::channel();
        let limit = self.timeout.unwrap_or(name.timeout()) + margin(name);
        let pending = Pending {
            hook,
            body,
            reply,
            limit,
        };
        if self.tx.send(pending).is_err() {
            return Err(HookError::NoDeliverd);
        }
        // The last connection may have gone (and failed what waited) just
        // before this call was queued: fail it now, not at its timeout.
        if self.live.load(Ordering::Acquire) == 0 {
            self.fail_waiting().await;
        }
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(HookError::Lost(name.file())),
            Err(_) => Err(HookError::Timeout(name.file(), limit)),
        }
    }

    /// The alias-resolve hook's entry for `addr`: None if there is no hook,
    /// else the targets its output names (possibly none). An error, an exit
    /// status other than 0 or output that does not parse: Err.
    pub async fn alias_resolve(&self, addr: &str) -> Result<Option<Vec<aliases::Target>>, String> {
        if !self.exists(Name::AliasResolve) {
            metrics::inc_label(names::ALIASES_HOOK_RESULTS, "resolve:skip");
            return Ok(None);
        }
        let hook = Hook::AliasResolve {
            address: addr.to_string(),
        };
        let out = match self.call(hook, None).await {
            Ok(HookOutcome::Resolve(Ok(out))) => out,
            Ok(HookOutcome::Resolve(Err(e))) => return Err(format!("alias-resolve {addr}: {e}")),
            Ok(_) => return Err(HookError::WrongAnswer("alias-resolve").to_string()),
            Err(e) => return Err(e.to_string()),
        };
        let domain = address::split(addr).1;
        // The whole output is one right-hand side, as in chasquid.
        match aliases::parse_rhs(out.trim(), domain) {
            Ok(targets) => Ok(Some(targets)),
            // deliverd parsed it and counted it already.
            Err(e) => Err(format!(
                "alias-resolve {addr}: its output does not parse: {e}"
            )),
        }
    }

    /// Whether a hook connection is up, waiting up to [`GRACE`] for one.
    async fn wait_live(&self) -> bool {
        let deadline = tokio::time::Instant::now() + GRACE;
        loop {
            let rung = self.up.notified();
            if self.live.load(Ordering::Acquire) > 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, rung).await.is_err() {
                return self.live.load(Ordering::Acquire) > 0;
            }
        }
    }

    /// A hook connection came up.
    fn connected(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
        self.up.notify_waiters();
    }

    /// A hook connection went away; with it the last one, calls still
    /// waiting for a slot fail now rather than at their timeout.
    async fn disconnected(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.fail_waiting().await;
        }
    }

    /// Fails every call waiting for a slot.
    async fn fail_waiting(&self) {
        let mut rx = self.rx.lock().await;
        while let Ok(p) = rx.try_recv() {
            let _ = p.reply.send(Err(HookError::NoDeliverd));
        }
    }
}

/// Whether a hook is there. Only "no such file" means no: a hook that
/// cannot be looked at (permissions, a broken link) is taken as present,
/// so the call fails (temporarily) instead of the site's policy being
/// skipped in silence.
fn is_file(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tambo_proto::deliver::{FromDeliverd, HookCall, MAX_HOOK_CALL_FRAME, ToDeliverd};
    use tambo_proto::frame::{FrameReader, write_frame};
    use tokio::net::UnixStream;

    fn hooks(dir: &Path) -> Arc<Hooks> {
        let cfg = Config::defaults(dir);
        Arc::new(Hooks::new(&cfg))
    }

    /// queued's end of a hook connection, served, and deliverd's end.
    fn connect(h: &Arc<Hooks>) -> (tokio::task::JoinHandle<()>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (r, w) = ours.into_split();
        let served = tokio::spawn(serve(
            h.clone(),
            FrameReader::new(r),
            w,
            2,
            Duration::from_secs(60),
        ));
        (served, theirs)
    }

    async fn wait_live(h: &Hooks, n: usize) {
        while h.live.load(Ordering::Acquire) != n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn without_deliverd_a_hook_fails_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let h = hooks(dir.path());
        let r = h
            .call(
                Hook::AliasExists {
                    address: "a@b".into(),
                },
                None,
            )
            .await;
        assert!(matches!(r, Err(HookError::NoDeliverd)), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn calls_are_answered_and_a_lost_connection_fails_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("hooks")).unwrap();
        std::fs::write(dir.path().join("hooks/rcpt"), "#!/bin/sh\n").unwrap();
        let h = hooks(dir.path());
        assert!(h.exists(Name::Rcpt) && !h.exists(Name::PostData));
        let (served, deliverd) = connect(&h);
        wait_live(&h, 1).await;
        let (r, mut w) = deliverd.into_split();
        let mut r = FrameReader::new(r);
        let asking = {
            let h = h.clone();
            tokio::spawn(async move {
                h.call(
                    Hook::AliasExists {
                        address: "a@b".into(),
                    },
                    None,
                )
                .await
            })
        };
        let call: ToDeliverd = r.read(MAX_HOOK_CALL_FRAME).await.unwrap().unwrap();
        let ToDeliverd::Hook(HookCall { call, hook }) = call else {
            panic!("{call:?}")
        };
        assert_eq!(
            hook,
            Hook::AliasExists {
                address: "a@b".into()
            }
        );
        let done = FromDeliverd::HookDone {
            call,
            outcome: HookOutcome::Exists(true),
        };
        write_frame(&mut w, &done).await.unwrap();
        assert!(matches!(
            asking.await.unwrap(),
            Ok(HookOutcome::Exists(true))
        ));
        // A second call, and deliverd goes away before answering.
        let asking = {
            let h = h.clone();
            tokio::spawn(async move {
                h.call(
                    Hook::Rcpt(tambo_proto::deliver::HookEnv {
                        remote_addr: "192.0.2.1:25".into(),
                        ehlo: "x".into(),
                        mail_from: String::new(),
                        rcpt_to: vec!["a@b".into()],
                        auth_as: String::new(),
                        on_tls: false,
                        from_local_domain: false,
                        spf: None,
                    }),
                    None,
                )
                .await
            })
        };
        let _: ToDeliverd = r.read(MAX_HOOK_CALL_FRAME).await.unwrap().unwrap();
        drop((r, w));
        let r = asking.await.unwrap();
        assert!(matches!(r, Err(HookError::Lost(_))), "{r:?}");
        served.await.unwrap();
        assert_eq!(h.live.load(Ordering::Acquire), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_answer_to_a_call_never_made_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let h = hooks(dir.path());
        let (served, deliverd) = connect(&h);
        wait_live(&h, 1).await;
        let (_r, mut w) = deliverd.into_split();
        let done = FromDeliverd::HookDone {
            call: 99,
            outcome: HookOutcome::Exists(true),
        };
        write_frame(&mut w, &done).await.unwrap();
        served.await.unwrap();
        assert_eq!(h.live.load(Ordering::Acquire), 0);
    }
}
