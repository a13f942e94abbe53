//! tambo-deliverd: delivers what queued hands it — local mail through the
//! MDA or tambo's Maildir writer, pipe aliases (and later remote SMTP, LMTP
//! and hooks). The only tambo process that runs other programs.
//!
//! Holds: one deliver.sock link, one read-only descriptor per job.
//! Must never: open the queue directory, read users or keys, or accept
//! network connections.
#![forbid(unsafe_code)]

mod children;
mod jobs;
mod lmtp;
mod maildir;
mod mda;
mod remote;
mod roots;
mod smtp;
mod sts;
mod template;
#[cfg(test)]
mod testutil;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tambo_common::daemon;
use tambo_proto::identity::Identities;
use tambo_proto::{Role, hello};

fn main() -> ExitCode {
    // A session of its own, first thing: every program deliverd runs is
    // then in it (a program cannot join another session's process group),
    // so a supervisor can find and kill exactly what deliverd left behind
    // if deliverd dies; and no terminal's signals reach deliverd directly.
    let own_session = nix::unistd::setsid();
    let started = match daemon::boot(Role::Deliverd, "tambo-deliverd", "tambo's delivery daemon") {
        Ok(v) => v,
        Err(code) => return code,
    };
    let daemon::Started {
        flags, cfg, ids, ..
    } = started;
    if let Err(e) = own_session {
        tracing::warn!(
            "cannot start a session of its own ({e}); the supervisor may not find what deliverd leaves behind if it dies"
        );
    }
    if nix::unistd::geteuid().is_root() {
        tracing::warn!(
            "deliverd runs as root until privilege separation lands: MDA and pipe commands run as root"
        );
    }
    let rt = match daemon::runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The user lookup behind USER and LOGNAME may block (NSS): done once,
    // before any delivery waits on it.
    let _ = mda::environment();
    let cfg = Arc::new(cfg);
    rt.block_on(async move {
        let ctx = match setup(cfg.clone()) {
            Ok(ctx) => Arc::new(ctx),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        daemon::on_sighup(|| tracing::info!("SIGHUP: deliverd has nothing to reload"));
        daemon::push_metrics(Role::Deliverd, &flags, &cfg, &ids);
        daemon::notify_ready();
        tokio::select! {
            _ = pull_forever(ctx, ids) => {},
            _ = daemon::wait_for_shutdown() => {},
        }
        // Killed before exiting: an MDA left running would go on
        // delivering a message queued hands out again after the restart.
        let killed = children::LIVE.kill_all();
        tracing::info!("deliverd stopping; killed {killed} process group(s) still running");
        ExitCode::SUCCESS
    })
}

/// What remote delivery needs, made once: the resolver, the roots, the
/// MTA-STS cache (and its refresh task).
fn setup(cfg: Arc<tambo_common::config::Config>) -> Result<jobs::Ctx, String> {
    let resolver = tambo_common::dns::resolver(&cfg)?;
    let roots = roots::load(&cfg)?;
    let sts = Arc::new(sts::Sts::new(
        cfg.sts_cache_dir(),
        resolver.clone(),
        roots.clone(),
        cfg.testing.sts_https_port.unwrap_or(443),
    ));
    let period = cfg
        .testing
        .sts_refresh_period
        .unwrap_or(Duration::from_secs(10 * 60));
    tokio::spawn(sts.clone().refresh_forever(period));
    let remote = remote::Remote::new(cfg.clone(), resolver, roots, sts);
    Ok(jobs::Ctx { cfg, remote })
}

/// Connects to queued and serves jobs, reconnecting with backoff.
async fn pull_forever(ctx: Arc<jobs::Ctx>, ids: Identities) {
    let path = ctx.cfg.deliver_socket();
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match hello::connect(&path, Role::Deliverd, Role::Queued, &ids).await {
            Ok(stream) => {
                tracing::info!("connected to queued at {}", path.display());
                warned = false;
                backoff = Duration::from_millis(100);
                if let Err(e) = jobs::serve(ctx.clone(), stream).await {
                    tracing::warn!("deliver.sock: {e}");
                } else {
                    tracing::info!("queued closed the connection");
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!("cannot reach queued at {}: {e}; retrying", path.display());
                    warned = true;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
