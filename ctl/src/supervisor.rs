//! The supervisor (like OpenSMTPD's parent or Postfix's master): checks the
//! config, starts each daemon, restarts a daemon that dies (with backoff),
//! and on SIGTERM or Ctrl-C stops them all and exits 0.
//!
//! Started as a normal user, every daemon runs as that user (development);
//! dropping each to its own system user comes with privilege separation.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use tambo_common::config::Config;
use tambo_common::domains::Domains;

/// The daemons, spawned in this order without waiting for each other:
/// every client retries (smtpd answers 421 until queued is up, deliverd and
/// the metric pushers reconnect), so no start order is needed for
/// correctness.
pub const DAEMONS: [&str; 4] = [
    "tambo-monitord",
    "tambo-queued",
    "tambo-deliverd",
    "tambo-smtpd",
];

/// A daemon up this long has its backoff reset.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a daemon gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs everything until a signal; exit code 0 on a clean stop.
pub async fn run(config_dir: &Path, overrides: Option<String>) -> ExitCode {
    // Refuse a bad config here, with its one clear line, rather than have
    // every daemon fail and restart in a loop.
    let cfg = match Config::load(config_dir, overrides.as_deref()) {
        Ok(c) => c.resolve_paths(),
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = Domains::load(&cfg) {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    let bin_dir = match std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        Some(d) => d,
        None => {
            tracing::error!("cannot find the directory of the tambo binary");
            return ExitCode::FAILURE;
        }
    };
    for d in DAEMONS {
        if !bin_dir.join(d).is_file() {
            tracing::error!(
                "{} not found next to tambo; build the whole workspace (cargo build --release)",
                bin_dir.join(d).display()
            );
            return ExitCode::FAILURE;
        }
    }
    if nix::unistd::getuid().is_root() {
        tracing::warn!(
            "running as root: every daemon runs as root too; per-daemon users come with privilege separation"
        );
    } else {
        tracing::info!(
            "running as a normal user: every daemon runs as this user, without privilege dropping"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for d in DAEMONS {
        let mut args = vec!["--config_dir".to_string(), config_dir.display().to_string()];
        if let Some(o) = &overrides {
            args.push("--config_overrides".into());
            args.push(o.clone());
        }
        tasks.push(tokio::spawn(keep_running(
            bin_dir.join(d),
            args,
            stop_rx.clone(),
        )));
    }
    tambo_common::daemon::wait_for_shutdown().await;
    tracing::info!("stopping every daemon");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    tracing::info!("all daemons stopped");
    ExitCode::SUCCESS
}

/// Starts `bin` and restarts it whenever it exits, until told to stop.
async fn keep_running(bin: PathBuf, args: Vec<String>, mut stop: watch::Receiver<bool>) {
    let name = bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let mut child = match Command::new(&bin)
            .args(&args)
            .env(
                tambo_common::daemon::SUPERVISOR_ENV,
                std::process::id().to_string(),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot start {name}: {e}");
                if wait_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        tracing::info!("started {name} (pid {})", child.id().unwrap_or(0));
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(status) = exited else {
            stop_child(&name, &mut child).await;
            return;
        };
        let how = match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > HEALTHY_AFTER {
            backoff = Duration::from_secs(1);
        }
        tracing::error!(
            "{name} exited ({how}); restarting in {}s",
            backoff.as_secs()
        );
        if wait_or_stop(&mut stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Sleeps `d`; true if a stop was requested meanwhile.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

async fn stop_child(name: &str, child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(_) => tracing::info!("{name} stopped"),
        Err(_) => {
            tracing::warn!(
                "{name} did not stop in {}s; killing it",
                STOP_GRACE.as_secs()
            );
            let _ = child.kill().await;
        }
    }
}
