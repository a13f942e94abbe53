//! tambo-queued: the trusted core. Owns the queue, decides every recipient,
//! holds users and aliases (and later keys), and schedules deliveries.
//!
//! Holds: the queue directory, the config directory (read), submit.sock and
//! deliver.sock.
//! Must never: open a network socket other than AF_UNIX, exec anything, or
//! answer 250 (through smtpd) before a message is fsync'd.
#![forbid(unsafe_code)]

mod dirsync;
mod dispatch;
mod dsn;
mod item;
mod policy;
mod queue;
mod retry;
mod spool;
mod submit;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::UnixListener;

use tambo_common::daemon;
use tambo_common::domains::Domains;
use tambo_proto::Role;

fn main() -> ExitCode {
    let (flags, cfg, rt) =
        match daemon::boot("tambo-queued", "tambo's queue and policy daemon", None) {
            Ok(v) => v,
            Err(code) => return code,
        };
    let cfg = Arc::new(cfg);
    let domains = match Domains::load(&cfg) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, d) in domains.iter() {
        tracing::info!(
            "domain {name}: {} users, {} aliases",
            d.users.len(),
            d.aliases.len()
        );
    }
    let spool = match spool::Spool::open(&cfg.queue_dir(), cfg.testing.fail_queue_writes) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(
                "{}: key data_dir: cannot open the queue directory {}: {e}",
                cfg.config_dir.join("tambo.conf").display(),
                cfg.queue_dir().display()
            );
            return ExitCode::FAILURE;
        }
    };
    let loaded = match spool.load() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "cannot read the queue directory {}: {e}",
                cfg.queue_dir().display()
            );
            return ExitCode::FAILURE;
        }
    };
    for (path, why) in &loaded.unreadable {
        tracing::error!(
            "unreadable queue item {} (left in place): {why}",
            path.display()
        );
    }
    rt.block_on(async move {
        let submit = match bind(&cfg.submit_socket()) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", cfg.submit_socket().display());
                return ExitCode::FAILURE;
            }
        };
        let deliver = match bind(&cfg.deliver_socket()) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", cfg.deliver_socket().display());
                return ExitCode::FAILURE;
            }
        };
        tambo_proto::metrics::spawn_pusher(
            cfg.monitor_socket(),
            Role::Queued,
            flags.as_pairs(),
            tambo_common::build::VERSION.into(),
        );
        let queue = Arc::new(queue::Queue::new(cfg.clone(), domains, spool));
        tracing::info!(
            "queue loaded: {} items, {} unreadable, {} orphan files removed",
            loaded.items.len(),
            loaded.unreadable.len(),
            loaded.removed_orphans
        );
        for item in loaded.items {
            queue.start(item);
        }
        tracing::info!(
            "queued listening on {} and {}",
            cfg.submit_socket().display(),
            cfg.deliver_socket().display()
        );
        let q = queue.clone();
        tokio::spawn(daemon::accept_unix(submit, "submit.sock", move |s| {
            submit::serve(q.clone(), s)
        }));
        let dispatcher = queue.dispatcher.clone();
        tokio::spawn(daemon::accept_unix(deliver, "deliver.sock", move |s| {
            dispatch::serve(dispatcher.clone(), s)
        }));
        daemon::wait_for_shutdown().await;
        tracing::info!("queued stopping");
        ExitCode::SUCCESS
    })
}

/// Binds a Unix socket, replacing a stale file but never a live socket of
/// another running instance.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    tambo_common::daemon::prepare_socket(path)?;
    UnixListener::bind(path)
}
