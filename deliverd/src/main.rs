//! tambo-deliverd: delivers what queued hands it — local mail through the
//! MDA, tambo's Maildir writer or LMTP, pipe aliases, remote SMTP — and
//! runs the hooks (and the DKIM verification of incoming mail) on queued's
//! behalf. The only tambo process that runs other programs.
//!
//! Holds: two deliver.sock links (deliveries, hooks), one read-only
//! descriptor per job or post-data call.
//! Must never: open the queue directory, read users or keys, or accept
//! network connections.
#![forbid(unsafe_code)]

mod calls;
mod children;
use tambo_common::dkimverify as dkim;
mod hookconn;
mod hooks;
mod jobs;
mod lmtp;
mod maildir;
mod mda;
mod remote;
mod roots;
mod smtp;
mod sts;
mod supervise;
mod template;
#[cfg(test)]
mod testutil;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;

use tambo_common::daemon;
use tambo_proto::identity::Identities;
use tambo_proto::{Error, Role, hello};

/// System's allocator, sampled for heap profiles (see
/// `tambo_common::profile::heap`).
#[cfg(feature = "profile")]
#[global_allocator]
static ALLOCATOR: tambo_common::profile::heap::Sampler = tambo_common::profile::heap::Sampler;

fn main() -> ExitCode {
    // A session of its own, first thing: every program deliverd runs is
    // then in it (a program cannot join another session's process group),
    // so a supervisor can find and kill exactly what deliverd left behind
    // if deliverd dies; and no terminal's signals reach deliverd directly.
    // Under systemd it already leads a session of its own (setsid would
    // fail with EPERM): nothing to do, nothing to warn about.
    let own_session = match nix::unistd::getsid(None) {
        Ok(sid) if sid == nix::unistd::getpid() => Ok(sid),
        _ => nix::unistd::setsid(),
    };
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
    // Its one piece of state, the MTA-STS cache, stays its own once it is
    // not root; then root goes, before any thread or program starts: the
    // MDA, pipe commands and hooks run as deliverd's user.
    let state = [cfg.sts_cache_dir()];
    if let Err(e) = daemon::own_state_dirs(Role::Deliverd, &ids, &cfg.data_dir, &state) {
        return daemon::startup_failed(format!(
            "cannot give the MTA-STS cache to deliverd's user: {e}"
        ));
    }
    // The Maildir tree's root, if missing, is made now and given to
    // deliverd's user: once locked down, deliverd may write beneath it only
    // if it exists.
    if let Err(e) = daemon::own_dir(
        Role::Deliverd,
        &ids,
        tambo_common::sandbox::maildir_root_of(&cfg).as_deref(),
    ) {
        return daemon::startup_failed(format!("cannot make the Maildir root: {e}"));
    }
    if let Err(e) = daemon::drop_privileges(Role::Deliverd, &ids) {
        return daemon::startup_failed(format!("cannot drop privileges: {e}"));
    }
    // resolv.conf and the roots are read before the lockdown: they are
    // often links into /run or elsewhere, which it does not reach.
    let resolver = match tambo_common::dns::resolver(&cfg) {
        Ok(r) => r,
        Err(e) => return daemon::startup_failed(e),
    };
    let roots = match roots::load(&cfg) {
        Ok(r) => r,
        Err(e) => return daemon::startup_failed(e),
    };
    if let Err(e) = tambo_common::sandbox::lock_down(Role::Deliverd, &cfg) {
        return daemon::startup_failed(format!("cannot lock deliverd down: {e}"));
    }
    // One worker: see daemon::runtime.
    let rt = match daemon::runtime(Some(1)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The user lookup behind USER and LOGNAME may block (NSS): done once,
    // before any delivery waits on it.
    let _ = mda::environment();
    let cfg = Arc::new(cfg);
    rt.block_on(async move {
        let (ctx, hook_ctx) = match setup(cfg.clone(), resolver, roots) {
            Ok((ctx, hook_ctx)) => (Arc::new(ctx), Arc::new(hook_ctx)),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let path = cfg.deliver_socket();
        let idle = cfg.testing.ipc_idle_timeout;
        daemon::on_sighup(|| tracing::info!("SIGHUP: deliverd has nothing to reload"));
        daemon::push_metrics(Role::Deliverd, &flags, &cfg, &ids);
        daemon::notify_ready();
        // Tasks of their own, on the worker: run here, in block_on, the
        // links would be read on the main thread, and every job would
        // cost a wake-up of the worker besides.
        let (p, i) = (path.clone(), ids.clone());
        let deliveries = tokio::spawn(async move {
            keep_connected("deliveries", &p, &i, |stream| {
                jobs::serve(ctx.clone(), stream)
            })
            .await
        });
        let mut hooks = tokio::spawn(async move {
            keep_connected("hooks", &path, &ids, |stream| {
                hookconn::serve(hook_ctx.clone(), stream, idle)
            })
            .await
        });
        let mut deliveries = deliveries;
        // The links never end on their own: one that does has panicked,
        // and deliverd exits with a failure so that its supervisor
        // (systemd's Restart=on-failure, `tambo run`) starts it again.
        let code = tokio::select! {
            r = &mut deliveries => link_ended("deliveries", r),
            r = &mut hooks => link_ended("hooks", r),
            _ = daemon::wait_for_shutdown() => ExitCode::SUCCESS,
        };
        // The links stop taking jobs; one still running on the worker
        // may start an MDA meanwhile, which kill_all's closing flag kills.
        deliveries.abort();
        hooks.abort();
        // Killed before exiting: an MDA left running would go on
        // delivering a message queued hands out again after the restart.
        let killed = children::LIVE.kill_all();
        tracing::info!("deliverd stopping; killed {killed} process group(s) still running");
        code
    })
}

/// A link's task that ended, which only a panic makes it do.
fn link_ended(what: &str, r: Result<(), tokio::task::JoinError>) -> ExitCode {
    match r {
        Err(e) => tracing::error!("the {what} link to queued failed: {e}"),
        Ok(()) => tracing::error!("the {what} link to queued ended"),
    }
    ExitCode::FAILURE
}

/// What remote delivery needs, made once: the resolver, the roots, the
/// MTA-STS cache (and its refresh task); and what hook calls need: the
/// hooks' place and the DKIM verifier, on the same resolver.
fn setup(
    cfg: Arc<tambo_common::config::Config>,
    resolver: hickory_resolver::TokioResolver,
    roots: Arc<rustls::RootCertStore>,
) -> Result<(jobs::Ctx, calls::Ctx), String> {
    let hook_ctx = calls::Ctx {
        hooks: hooks::Hooks::new(&cfg),
        auth: Arc::new(mail_auth::MessageAuthenticator(resolver.clone())),
    };
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
    Ok((jobs::Ctx { cfg, remote }, hook_ctx))
}

/// Connects to queued and serves the connection (`what` it is for) with
/// `serve`, reconnecting with backoff whenever it ends.
async fn keep_connected<F, Fut>(
    what: &'static str,
    path: &std::path::Path,
    ids: &Identities,
    mut serve: F,
) where
    F: FnMut(UnixStream) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match hello::connect(path, Role::Deliverd, Role::Queued, ids).await {
            Ok(stream) => {
                tracing::info!("connected to queued at {} ({what})", path.display());
                warned = false;
                backoff = Duration::from_millis(100);
                if let Err(e) = serve(stream).await {
                    tracing::warn!("deliver.sock ({what}): {e}");
                } else {
                    tracing::info!("queued closed the connection ({what})");
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(
                        "cannot reach queued at {} ({what}): {e}; retrying",
                        path.display()
                    );
                    warned = true;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
