//! The supervisor (like Postfix's master or OpenSMTPD's parent): checks the
//! config, creates every socket the daemons serve, starts each daemon with
//! its sockets, follows them to readiness, replaces one that dies, passes
//! SIGHUP on, and on SIGTERM or Ctrl-C stops them all and exits 0. A
//! daemon that cannot start stops the whole system with its reason.
//!
//! The pieces: [`sockets`] creates what the daemons inherit, [`notify`]
//! receives their readiness and failure reasons, [`reaper`] collects every
//! exited process (daemons and orphans alike) and routes what it learns,
//! [`orphans`] kills what deliverd leaves running when it dies, and
//! [`child`] runs one daemon's lifecycle; this module ties them together.
//!
//! Started as a normal user, every daemon runs as that user (development).
//! Started as root, smtpd and monitord drop to their users themselves;
//! queued and deliverd stay root until privilege separation lands.

mod child;
mod notify;
mod orphans;
mod reaper;
mod sockets;

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use tambo_common::config::{Config, ConfigError};
use tambo_common::daemon;
use tambo_common::domains::Domains;
use tambo_proto::Role;
use tambo_proto::activation::Inherited;
use tambo_proto::identity::{Identities, NoSuchUser};

use child::{Launcher, Order, Report, Watcher};
use notify::NotifySocket;
use reaper::Registry;
use sockets::Sockets;

/// The four daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Daemon {
    Monitord,
    Queued,
    Deliverd,
    Smtpd,
}

impl Daemon {
    /// Started in this order without waiting for each other: their sockets
    /// exist before any starts, so a client's connection waits in the
    /// backlog until its server is up, whatever the order.
    pub const ALL: [Daemon; 4] = [
        Daemon::Monitord,
        Daemon::Queued,
        Daemon::Deliverd,
        Daemon::Smtpd,
    ];

    pub fn binary(self) -> &'static str {
        match self {
            Daemon::Monitord => "tambo-monitord",
            Daemon::Queued => "tambo-queued",
            Daemon::Deliverd => "tambo-deliverd",
            Daemon::Smtpd => "tambo-smtpd",
        }
    }
}

/// Why `tambo run` cannot start; each is one line naming the key or path.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{}: {source}", file.display())]
    Users { file: PathBuf, source: NoSuchUser },
    #[error("cannot find the directory of the tambo binary")]
    NoBinDir,
    #[error(
        "{} not found next to tambo; build the whole workspace (cargo build --release)",
        .0.display()
    )]
    MissingBinary(PathBuf),
    #[error("cannot create the runtime directory {}: {source}", path.display())]
    RuntimeDir { path: PathBuf, source: io::Error },
    #[error("another tambo supervisor uses this runtime directory: {source}")]
    Locked { path: PathBuf, source: io::Error },
    #[error("{}: key {key}: cannot listen on {addr}: {source}", file.display())]
    Listen {
        file: PathBuf,
        key: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(
        "no listening socket: set smtp_address, submission_address or submission_over_tls_address in {}, or pass sockets named smtp, submission or submission_tls",
        file.display()
    )]
    NoListener { file: PathBuf },
    #[error("cannot listen on {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("cannot create the notification socket {}: {source}", path.display())]
    Notify { path: PathBuf, source: io::Error },
}

/// Everything checked and created, nothing started yet.
pub struct Prepared {
    ids: Identities,
    sockets: Sockets,
    notify: NotifySocket,
    bin_dir: PathBuf,
    args: Vec<OsString>,
}

impl Prepared {
    /// The SMTP addresses actually bound (port 0 resolved), by mode.
    pub fn smtp_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        self.sockets.smtp_addrs()
    }

    /// The monitoring HTTP address actually bound.
    pub fn monitoring_addr(&self) -> Option<SocketAddr> {
        self.sockets.monitoring_addr()
    }
}

/// Checks what can be checked before any daemon starts, each problem as
/// one line, and creates every socket the daemons will inherit. Must run
/// inside the tokio runtime; `inherited` are the sockets systemd passed to
/// `tambo` itself, taken before anything else opened a descriptor.
pub fn prepare(
    config_dir: &Path,
    overrides: Option<String>,
    mut inherited: Inherited,
) -> Result<Prepared, SetupError> {
    // A bad config is refused here, with its one clear line, rather than
    // have every daemon fail with it.
    let cfg = Config::load(config_dir, overrides.as_deref())?.resolve_paths();
    Domains::load(&cfg)?;
    let ids =
        Identities::resolve(&cfg.role_users(), Role::Ctl).map_err(|source| SetupError::Users {
            file: cfg.file_path(),
            source,
        })?;
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or(SetupError::NoBinDir)?;
    for d in Daemon::ALL {
        let bin = bin_dir.join(d.binary());
        if !bin.is_file() {
            return Err(SetupError::MissingBinary(bin));
        }
    }
    let sockets = Sockets::open(&cfg, &ids, &mut inherited)?;
    let notify_path = cfg.tambo.runtime_dir.join(notify::FILE_NAME);
    let notify = NotifySocket::bind(&notify_path).map_err(|source| SetupError::Notify {
        path: notify_path,
        source,
    })?;
    let mut args: Vec<OsString> = vec!["--config_dir".into(), config_dir.into()];
    if let Some(o) = overrides {
        args.push("--config_overrides".into());
        args.push(o.into());
    }
    Ok(Prepared {
        ids,
        sockets,
        notify,
        bin_dir,
        args,
    })
}

/// `tambo run`: prepares, then serves until a signal.
pub async fn run(config_dir: &Path, overrides: Option<String>, inherited: Inherited) -> ExitCode {
    match prepare(config_dir, overrides, inherited) {
        Ok(p) => serve(p).await,
        Err(e) => daemon::startup_failed(e),
    }
}

/// Runs the daemons until SIGTERM or SIGINT (exit 0), or until one cannot
/// run (exit 1, with its reason).
pub async fn serve(p: Prepared) -> ExitCode {
    // Handlers first: from here SIGHUP no longer kills the supervisor, and
    // no child can exit unseen.
    let signals = (
        signal(SignalKind::child()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    let (Ok(sigchld), Ok(mut term), Ok(mut int), Ok(mut hup)) = signals else {
        return daemon::startup_failed("cannot install the signal handlers");
    };
    // MDA and pipe processes that deliverd leaves behind come to us, not to
    // init (which in a container may never reap them).
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(
            "cannot become a child subreaper ({e}): processes orphaned by deliverd go to init"
        );
    }
    tracing::info!("{}", p.ids.describe());
    if nix::unistd::geteuid().is_root() {
        tracing::info!(
            "running as root: each daemon drops to its own user, with no capabilities and no_new_privs (a role whose user is root stays root, and says so)"
        );
    } else {
        tracing::info!(
            "running as a normal user: every daemon runs as this user, without privilege dropping"
        );
    }

    let registry = Arc::new(Registry::default());
    let launcher = Arc::new(Launcher {
        bin_dir: p.bin_dir,
        args: p.args,
        notify_path: p.notify.path().to_path_buf(),
        sockets: Arc::new(p.sockets),
        registry: registry.clone(),
    });
    let reaper = tokio::spawn(reaper::run(registry, sigchld, p.notify));

    let (stop_tx, stop_rx) = watch::channel(false);
    let (up_tx, up_rx) = watch::channel(false);
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let mut orders = Vec::new();
    let mut watchers = Vec::new();
    for d in Daemon::ALL {
        let (order_tx, order_rx) = mpsc::unbounded_channel();
        orders.push(order_tx);
        let w = Watcher::new(
            d,
            launcher.clone(),
            order_rx,
            report_tx.clone(),
            stop_rx.clone(),
            up_rx.clone(),
        );
        watchers.push(tokio::spawn(w.run()));
    }
    drop(report_tx);

    let mut ready = HashSet::new();
    let code = loop {
        tokio::select! {
            report = reports.recv() => match report {
                Some(Report::Ready(d)) => {
                    ready.insert(d);
                    if ready.len() == Daemon::ALL.len() && !*up_tx.borrow() {
                        up_tx.send_replace(true);
                        tracing::info!("all daemons are ready");
                        // To systemd, when `tambo run` is a Type=notify unit.
                        daemon::notify_ready();
                    }
                }
                Some(Report::Down(d)) => {
                    ready.remove(&d);
                }
                Some(Report::Failed(why)) => {
                    break daemon::startup_failed(format!("{why}; stopping tambo"));
                }
                None => {
                    tracing::error!("every daemon watcher ended; stopping tambo");
                    break ExitCode::FAILURE;
                }
            },
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping every daemon");
                break ExitCode::SUCCESS;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping every daemon");
                break ExitCode::SUCCESS;
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: passing it on to every ready daemon");
                for o in &orders {
                    let _ = o.send(Order::Reload);
                }
            }
        }
    };
    stop_tx.send_replace(true);
    for w in watchers {
        let _ = w.await;
    }
    reaper.abort();
    tracing::info!("all daemons stopped");
    code
}
