//! What every tambo daemon does the same way: its flags, its debug log,
//! inherited sockets, the open-files limit, dropping root, readiness and
//! startup failures reported to the supervisor (sd_notify), SIGHUP, and
//! its accept loops.

use std::path::PathBuf;
use std::process::ExitCode;

use tambo_proto::Role;
use tambo_proto::activation::Inherited;
use tambo_proto::identity::Identities;

use crate::config::{Config, ConfigError};

/// Flags every daemon takes (REFERENCE §1.1); [`boot`] parses them under
/// the daemon's own name.
#[derive(Debug, Clone, clap::Parser)]
#[command(disable_version_flag = true)]
pub struct DaemonFlags {
    /// Configuration directory.
    #[arg(
        long = "config_dir",
        alias = "config-dir",
        default_value = "/etc/tambo"
    )]
    pub config_dir: PathBuf,
    /// TOML applied on top of tambo.conf.
    #[arg(long = "config_overrides", alias = "config-overrides")]
    pub config_overrides: Option<String>,
    /// Print name, version and build date, and exit.
    #[arg(long)]
    pub version: bool,
    /// Load and check every file the daemon reads at startup, print what
    /// it found, and exit: 0 when it would start, else 1 with the same
    /// one-line error (`tambo check-config` runs this).
    #[arg(long = "check_config", alias = "check-config")]
    pub check_config: bool,
}

impl DaemonFlags {
    /// The explicitly given flags as `-name=value` lines, for registration
    /// with monitord (`/debug/flags`).
    pub fn as_pairs(&self) -> Vec<(String, String)> {
        let mut v = vec![(
            "config_dir".to_string(),
            self.config_dir.display().to_string(),
        )];
        if let Some(o) = &self.config_overrides {
            v.push(("config_overrides".into(), o.clone()));
        }
        v
    }

    /// Loads the config these flags point at, relative paths resolved.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        Config::load(&self.config_dir, self.config_overrides.as_deref()).map(Config::resolve_paths)
    }
}

/// Starts the debug log on stderr (the journal under systemd). The level
/// comes from `TAMBO_LOG` (an env-filter directive), default `info`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TAMBO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Resolves on SIGTERM or SIGINT. Daemons exit promptly, without draining:
/// whatever got a 250 is already on disk (REFERENCE §1.1).
pub async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot install signal handlers: {e}");
            std::future::pending::<()>().await
        }
    }
}

/// What [`boot`] hands a daemon: its flags, config, the uid of each role,
/// and the sockets it inherited (socket activation).
pub struct Started {
    pub flags: DaemonFlags,
    pub cfg: Config,
    pub ids: Identities,
    pub sockets: Inherited,
}

/// The first steps every daemon takes, in the same order: parse the flags,
/// answer `--version`, start the debug log, take inherited sockets (before
/// anything else opens a descriptor), raise the descriptor limit, load the
/// config and resolve the users of each role. A failure is logged as one
/// line, told to the supervisor, and returned as the exit code.
pub fn boot(role: Role, binary: &'static str, about: &'static str) -> Result<Started, ExitCode> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = DaemonFlags::command()
        .name(binary)
        .about(about)
        .get_matches();
    let flags = DaemonFlags::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if flags.version {
        println!("{}", crate::build::version_line(binary));
        return Err(ExitCode::SUCCESS);
    }
    if flags.check_config {
        // Plain lines for a person at a terminal: no time, level or target.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .without_time()
            .with_level(false)
            .with_target(false)
            .try_init();
    } else {
        init_logging();
    }
    restrict_umask();
    let sockets = Inherited::take()
        .map_err(|e| startup_failed(format!("cannot take the sockets passed to {binary}: {e}")))?;
    follow_supervisor()?;
    raise_nofile_limit();
    let cfg = flags.load_config().map_err(startup_failed)?;
    let ids = Identities::resolve(&cfg.role_users(), role)
        .map_err(|e| startup_failed(format!("{}: {e}", cfg.file_path().display())))?;
    // The files profiles point into, while /proc may still be read.
    #[cfg(feature = "profile")]
    if !flags.check_config {
        crate::profile::prepare();
        if let Some(rate) = cfg.testing.heap_profile_rate {
            crate::profile::heap::set_rate(rate);
        }
    }
    // Under `tambo run` the supervisor says this once for everyone.
    if !under_supervisor() {
        tracing::info!("{}", ids.describe());
    }
    Ok(Started {
        flags,
        cfg,
        ids,
        sockets,
    })
}

/// Files a daemon (or a program it runs) creates are private unless it
/// says otherwise: every file tambo means to share gets an explicit mode.
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// The daemon's tokio runtime. Built after sockets are bound and
/// privileges dropped, so its threads start with the final credentials.
///
/// `worker_threads`: `None` for one per core (smtpd: TLS and sessions
/// scale with connections), `Some(1)` for a daemon whose async side only
/// routes work (queued, deliverd, monitord): their file operations, fsyncs
/// and CPU-heavy work run on the blocking pool either way, and one worker
/// spares the wakeups a second one costs each time it is handed or steals
/// a task. Measured with `bench/smtp-load.sh` (issue 11): queued and
/// deliverd on one worker each took 15% less CPU per message and one
/// session ran 20% faster; smtpd on one worker ran its single session
/// slower, so it keeps one per core.
pub fn runtime(worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| startup_failed(format!("cannot start the runtime: {e}")))
}

/// Logs a fatal startup error as one line, tells the supervisor (systemd
/// or `tambo run`) why with `STATUS=`, and gives the exit code to return.
pub fn startup_failed(msg: impl std::fmt::Display) -> ExitCode {
    let msg = msg.to_string();
    tracing::error!("{msg}");
    let one_line: String = msg
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&one_line)]);
    ExitCode::FAILURE
}

/// Tells the supervisor (systemd or `tambo run`) the daemon is serving.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot report readiness to the supervisor: {e}");
    }
}

/// Whether `tambo run` started this process.
pub fn under_supervisor() -> bool {
    std::env::var_os(SUPERVISOR_ENV).is_some()
}

/// Raises the soft limit on open descriptors to the hard limit: every SMTP
/// session and IPC link is a descriptor, and the usual soft limit of 1024
/// is far below what the daemons are built to hold.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("cannot read the open-files limit: {e}");
            1024
        }
    }
}

/// The soft limit on open descriptors now.
pub fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Before [`drop_privileges`]: makes `dirs` (created if missing, mode
/// 0700) and everything in them belong to `role`'s user, so the daemon
/// can still use its state once it is not root — also state an earlier
/// run left as root's. `data_dir`, their parent, is made traversable
/// (0711) if root owns it. Symbolic links are neither followed nor
/// changed. A no-op when not root or when the role's user is root.
pub fn own_state_dirs(
    role: Role,
    ids: &Identities,
    data_dir: &std::path::Path,
    dirs: &[std::path::PathBuf],
) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !nix::unistd::geteuid().is_root() || ids.is_development() {
        return Ok(());
    }
    let Some(account) = ids.account(role) else {
        return Ok(());
    };
    if account.uid == 0 {
        return Ok(());
    }
    crate::safeio::create_dir_all_durable(data_dir, 0o711)?;
    let meta = std::fs::symlink_metadata(data_dir)?;
    if meta.uid() == 0 && meta.mode() & 0o001 == 0 {
        let mode = (meta.mode() & 0o7777) | 0o111;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(mode))?;
    }
    for dir in dirs {
        crate::safeio::create_dir_all_durable(dir, 0o700)?;
        // Its one writer's alone, whatever mode an earlier run left.
        if !std::fs::symlink_metadata(dir)?.is_symlink() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        chown_tree(dir, account.uid, account.gid)?;
    }
    Ok(())
}

/// Before [`drop_privileges`]: makes `dir` (if given and missing, mode
/// 0700) and gives it — not what is under it — to `role`'s user. A no-op
/// when not root, when it exists already, or when the role's user is root.
pub fn own_dir(role: Role, ids: &Identities, dir: Option<&std::path::Path>) -> std::io::Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    if dir.exists() || !nix::unistd::geteuid().is_root() || ids.is_development() {
        return Ok(());
    }
    let Some(account) = ids.account(role).filter(|a| a.uid != 0) else {
        return Ok(());
    };
    crate::safeio::create_dir_all_durable(dir, 0o700)?;
    std::os::unix::fs::lchown(dir, Some(account.uid), Some(account.gid))
}

/// Gives `path` and, if it is a directory, everything under it to
/// `uid:gid` — only what root owns (an earlier run as root left it) and
/// only through a descriptor opened without following links, so what the
/// check saw is what gets changed. Left alone, with a warning: links
/// (never followed), files with more than one name (a hard link planted
/// by a compromised earlier run could name /etc/shadow), anything owned by
/// a third user.
fn chown_tree(path: &std::path::Path, uid: u32, gid: u32) -> std::io::Result<()> {
    chown_at(path, path, uid, gid)
}

/// [`chown_tree`] of `path`, named `shown` in warnings. A directory's
/// entries are reached through its open descriptor (`/proc/self/fd/N`),
/// so a directory swapped for a link while this runs is never followed.
fn chown_at(
    path: &std::path::Path,
    shown: &std::path::Path,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // A file already the user's needs nothing: not even an open (a big
    // queue is mostly that, at every start).
    let seen = std::fs::symlink_metadata(path)?;
    if seen.is_file() && seen.uid() == uid && seen.gid() == gid {
        return Ok(());
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            tracing::warn!(
                "{}: a link in a state directory, left alone",
                shown.display()
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let owned = meta.uid() == uid && meta.gid() == gid;
    if !owned {
        if meta.uid() != 0 {
            tracing::warn!(
                "{}: owned by uid {}, left alone",
                shown.display(),
                meta.uid()
            );
            return Ok(());
        }
        if !meta.is_dir() && meta.nlink() > 1 {
            tracing::warn!(
                "{}: a file with {} names, left alone",
                shown.display(),
                meta.nlink()
            );
            return Ok(());
        }
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    if meta.is_dir() {
        let dir = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name();
            chown_at(&dir.join(&name), &shown.join(&name), uid, gid)?;
        }
    }
    Ok(())
}

/// Gives up root for `role`'s user: every capability out of the bounding,
/// inheritable and ambient sets (while root may still drop them), the
/// supplementary groups (the socket group if it exists), gid, uid — which
/// empties the permitted and effective sets — then no_new_privs, so
/// nothing this process runs can regain privileges; every set is checked
/// empty afterwards. A no-op when not root. Call it before the runtime
/// starts its threads.
pub fn drop_privileges(role: Role, ids: &Identities) -> std::io::Result<()> {
    use nix::unistd::{Gid, Uid, getresgid, getresuid, setgroups, setresgid, setresuid};
    if !nix::unistd::geteuid().is_root() || ids.is_development() {
        return Ok(());
    }
    let Some(account) = ids.account(role) else {
        return Ok(());
    };
    if account.uid == 0 {
        tracing::warn!("{} runs as root: its configured user is root", role.name());
        return Ok(());
    }
    let group =
        tambo_proto::identity::lookup_group(crate::sockets::SOCKET_GROUP).unwrap_or(account.gid);
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    // The bounding set needs CAP_SETPCAP to shrink: before the uid change.
    for set in [
        caps::CapSet::Bounding,
        caps::CapSet::Inheritable,
        caps::CapSet::Ambient,
    ] {
        caps::clear(None, set).map_err(|e| {
            std::io::Error::other(format!("cannot clear the {set:?} capabilities: {e}"))
        })?;
    }
    // The user's own supplementary groups, as systemd's User= and login
    // give them (an operator may have put tambo-queue in dovecot's group),
    // plus the socket group.
    let name = nix::unistd::User::from_uid(Uid::from_raw(account.uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .ok_or_else(|| std::io::Error::other("the role's user has no name"))?;
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    nix::unistd::initgroups(&cname, Gid::from_raw(account.gid)).map_err(std::io::Error::from)?;
    let mut groups = nix::unistd::getgroups().map_err(std::io::Error::from)?;
    if !groups.contains(&Gid::from_raw(group)) {
        groups.push(Gid::from_raw(group));
        setgroups(&groups).map_err(std::io::Error::from)?;
    }
    setresgid(gid, gid, gid).map_err(std::io::Error::from)?;
    setresuid(uid, uid, uid).map_err(std::io::Error::from)?;
    let r = getresuid().map_err(std::io::Error::from)?;
    let g = getresgid().map_err(std::io::Error::from)?;
    if [r.real, r.effective, r.saved] != [uid; 3] || [g.real, g.effective, g.saved] != [gid; 3] {
        return Err(std::io::Error::other("credentials did not change"));
    }
    nix::sys::prctl::set_no_new_privs().map_err(std::io::Error::from)?;
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
        caps::CapSet::Ambient,
        caps::CapSet::Bounding,
    ] {
        match caps::read(None, set) {
            Ok(c) if c.is_empty() => {}
            Ok(c) => {
                return Err(std::io::Error::other(format!(
                    "capabilities left in the {set:?} set: {c:?}"
                )));
            }
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
    // A change of credentials clears the parent-death signal: ask again,
    // or a killed supervisor would leave this daemon running.
    if follow_supervisor().is_err() {
        return Err(std::io::Error::other("the supervisor is gone"));
    }
    tracing::info!(
        "{} dropped root: now uid {}, gid {}",
        role.name(),
        account.uid,
        account.gid
    );
    Ok(())
}

/// Serves SIGHUP for the whole life of the daemon: `reload` runs on each
/// one. Without a handler SIGHUP would kill the process, and an operator's
/// reload would take mail down. Call it first thing in the runtime.
pub fn on_sighup<F>(reload: F)
where
    F: Fn() + Send + 'static,
{
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    reload();
                }
            });
        }
        Err(e) => tracing::error!("cannot install the SIGHUP handler: {e}"),
    }
}

/// Starts pushing this daemon's counters to monitord (see
/// [`tambo_proto::metrics`]); call it inside the runtime.
pub fn push_metrics(role: Role, flags: &DaemonFlags, cfg: &Config, ids: &Identities) {
    let heartbeat = match cfg.testing.ipc_idle_timeout {
        Some(idle) => tambo_proto::keepalive_every(idle),
        None => tambo_proto::metrics::HEARTBEAT,
    };
    tambo_proto::metrics::spawn_pusher(tambo_proto::metrics::Pusher {
        socket: crate::sockets::IpcSocket::Monitor.path(cfg),
        role,
        flags: flags.as_pairs(),
        version: crate::build::VERSION.into(),
        config: cfg.to_toml(),
        ids: ids.clone(),
        heartbeat,
        profiler: profiler(),
    });
}

#[cfg(feature = "profile")]
fn profiler() -> Option<tambo_proto::monitor::Profiler> {
    Some(crate::profile::run)
}

#[cfg(not(feature = "profile"))]
fn profiler() -> Option<tambo_proto::monitor::Profiler> {
    None
}

/// Converts an inherited or pre-bound std listener for tokio.
pub fn tokio_unix(
    l: std::os::unix::net::UnixListener,
) -> std::io::Result<tokio::net::UnixListener> {
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// Converts an inherited or pre-bound std listener for tokio.
pub fn tokio_tcp(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Accepts connections on a Unix socket forever, each served by its own
/// task. Accept errors (usually EMFILE) back off briefly instead of
/// spinning.
pub async fn accept_unix<F, Fut>(listener: tokio::net::UnixListener, what: &'static str, serve: F)
where
    F: Fn(tokio::net::UnixStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream));
            }
            Err(e) => {
                tracing::warn!("{what} accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Set by `tambo run` in its children's environment: its pid.
pub const SUPERVISOR_ENV: &str = tambo_proto::activation::SUPERVISOR_ENV;

/// Under `tambo run`, ask the kernel for SIGTERM when the supervisor dies,
/// so a killed supervisor never leaves daemons behind holding the sockets.
/// If it is already gone (it died before this ran), exit now.
fn follow_supervisor() -> Result<(), ExitCode> {
    let Some(pid) = std::env::var(SUPERVISOR_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return Ok(());
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        tracing::warn!("cannot ask to be stopped with the supervisor: {e}");
    }
    if nix::unistd::getppid().as_raw() != pid {
        tracing::error!("the supervisor (pid {pid}) is gone; exiting");
        return Err(ExitCode::FAILURE);
    }
    Ok(())
}

#[cfg(test)]
mod chown_tests {
    use super::chown_tree;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_roots_single_named_files_change_hands_and_links_are_not_followed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: chown needs root (CI is root)");
            return;
        }
        let (uid, gid) = (65534, 65534);
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("shadow");
        std::fs::write(&secret, "root's").unwrap();
        let state = tempfile::tempdir().unwrap();
        let d = state.path();
        std::fs::write(d.join("item"), "x").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/body"), "x").unwrap();
        std::fs::hard_link(&secret, d.join("planted-hard")).unwrap();
        std::os::unix::fs::symlink(&secret, d.join("planted-soft")).unwrap();
        std::fs::write(d.join("theirs"), "x").unwrap();
        std::os::unix::fs::chown(d.join("theirs"), Some(1), Some(1)).unwrap();
        chown_tree(d, uid, gid).unwrap();
        let owner = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().uid();
        assert_eq!(owner(d), uid);
        assert_eq!(owner(&d.join("item")), uid);
        assert_eq!(owner(&d.join("sub/body")), uid);
        assert_eq!(owner(&secret), 0, "a hard link's target stays root's");
        assert_eq!(owner(&d.join("planted-soft")), 0, "the link is left alone");
        assert_eq!(owner(&d.join("theirs")), 1);
    }
}
