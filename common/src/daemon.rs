//! What every tambo daemon does the same way at startup: its flags and its
//! debug log.

use std::path::PathBuf;

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

/// Makes a Unix socket path ready to bind: creates the runtime directory
/// if needed, and removes a stale socket file — but refuses if another
/// process is still listening on it.
pub fn prepare_socket(path: &std::path::Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening on it",
            ));
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// The first steps every daemon takes, in the same order: parse the
/// flags, answer `--version`, start the debug log, load the config (refusing a bad one
/// with its one clear line), build the runtime. `Err` is the exit code to
/// return at once.
pub fn boot(
    binary: &'static str,
    about: &'static str,
    worker_threads: Option<usize>,
) -> Result<(DaemonFlags, Config, tokio::runtime::Runtime), std::process::ExitCode> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = DaemonFlags::command()
        .name(binary)
        .about(about)
        .get_matches();
    let flags = DaemonFlags::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if flags.version {
        println!("{}", crate::build::version_line(binary));
        return Err(std::process::ExitCode::SUCCESS);
    }
    init_logging();
    follow_supervisor()?;
    let cfg = flags.load_config().map_err(|e| {
        tracing::error!("{e}");
        std::process::ExitCode::FAILURE
    })?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    let rt = builder.enable_all().build().map_err(|e| {
        tracing::error!("cannot start the runtime: {e}");
        std::process::ExitCode::FAILURE
    })?;
    Ok((flags, cfg, rt))
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

/// Set by `tambo run` in its children's environment.
pub const SUPERVISOR_ENV: &str = "TAMBO_SUPERVISOR_PID";

/// Under `tambo run`, ask the kernel for SIGTERM when the supervisor dies,
/// so a killed supervisor never leaves daemons behind holding the sockets.
/// If it is already gone (it died before this ran), exit now.
fn follow_supervisor() -> Result<(), std::process::ExitCode> {
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
        return Err(std::process::ExitCode::FAILURE);
    }
    Ok(())
}
