//! tambo-queued: the trusted core. Owns the queue, decides every recipient,
//! holds users and aliases (and later keys), and schedules deliveries.
//!
//! Holds: the queue directory (and its lock), the config directory (read),
//! submit.sock and deliver.sock.
//! Must never: open a network socket other than AF_UNIX, exec anything, or
//! answer 250 (through smtpd) before a message is fsync'd.
#![forbid(unsafe_code)]

mod admin;
mod auth;
mod certs;
mod dirsync;
mod dispatch;
mod dkim;
mod domaininfo;
mod dovecot;
mod dsn;
mod handshake;
mod hooks;
mod item;
mod keylink;
mod local;
mod maillog;
mod policy;
mod pool;
mod queue;
mod retry;
mod session;
mod signing;
mod spool;
mod srs;
mod submit;

use std::process::ExitCode;
use std::sync::Arc;

use tambo_common::daemon;
use tambo_common::domains::Domains;
use tambo_common::sockets::{self, IpcSocket};
use tambo_proto::Role;
use tambo_proto::activation::Inherited;
use tambo_proto::identity::Identities;
use tambo_proto::metrics::{self, names};

/// Items `/debug/queue` shows (the oldest; it says how many more there
/// are): about 60 KiB of text, within monitord's 128 KiB for the page.
const QUEUE_PAGE_ITEMS: usize = 200;

/// What the reloads last saw of the files they watch.
struct Reloads {
    certs: certs::FilesState,
    domains: tambo_common::domains::FilesState,
}

/// Loads users and aliases again when their files changed since `last`
/// (or when `force`, on SIGHUP). A file that does not load keeps the
/// previous users and aliases of every domain in use, with one line per
/// change, never one per period: the server goes on serving what it had
/// (chasquid exits instead, and a typo stops its mail).
fn reload_domains(
    q: &queue::Queue,
    c: &tambo_common::config::Config,
    force: bool,
    last: &mut tambo_common::domains::FilesState,
) {
    let now = tambo_common::domains::files_state(&c.config_dir);
    if !force && &now == last {
        return;
    }
    *last = now;
    let mut trace = tambo_proto::trace::Trace::new(
        "Auth.Reload",
        if force { "SIGHUP" } else { "files changed" },
    );
    match Domains::load(c) {
        Ok(d) => {
            let (n, users): (usize, usize) = d
                .iter()
                .fold((0, 0), |(n, u), (_, dom)| (n + 1, u + dom.users.len()));
            q.set_domains(d);
            trace.event(format!("{n} domains, {users} users"));
            let why = if force { "SIGHUP: " } else { "" };
            tracing::info!("{why}users and aliases reloaded ({n} domains, {users} users)");
        }
        Err(e) => {
            trace.error(format!("kept the previous ones: {e}"));
            metrics::inc_label(names::CONFIG_RELOAD_ERRORS, "domains");
            tracing::error!("users and aliases not reloaded, keeping the previous ones: {e}");
        }
    }
}

/// `--check_config`: every file queued reads at startup, read by the
/// same code (so with the same errors) and as the same user, with nothing
/// else done: no lock, no socket. What it found goes to standard output.
fn check_config(cfg: &tambo_common::config::Config) -> ExitCode {
    let domains = match Domains::load(cfg) {
        Ok(d) => d,
        Err(e) => return daemon::startup_failed(e),
    };
    let dkim = match dkim::DkimKeys::load(cfg) {
        Ok(k) => k,
        Err(e) => return daemon::startup_failed(e),
    };
    for (name, d) in domains.iter() {
        println!(
            "domain {name}: {} users, {} aliases, {} DKIM keys",
            d.users.len(),
            d.aliases.len(),
            dkim.count(name)
        );
    }
    match certs::Certs::load(&cfg.config_dir) {
        Ok(c) => println!("certificates: {}", c.ids().len()),
        Err(e) => return daemon::startup_failed(e),
    }
    ExitCode::SUCCESS
}

/// System's allocator, sampled for heap profiles (see
/// `tambo_common::profile::heap`).
#[cfg(feature = "profile")]
#[global_allocator]
static ALLOCATOR: tambo_common::profile::heap::Sampler = tambo_common::profile::heap::Sampler;

fn main() -> ExitCode {
    let started = match daemon::boot(
        Role::Queued,
        "tambo-queued",
        "tambo's queue and policy daemon",
    ) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let daemon::Started {
        flags,
        cfg,
        ids,
        mut sockets,
    } = started;
    if flags.check_config {
        // Read as queued will read them: as its user.
        if let Err(e) = daemon::drop_privileges(Role::Queued, &ids) {
            return daemon::startup_failed(format!("cannot drop privileges: {e}"));
        }
        return check_config(&cfg);
    }
    // Its state must stay its own once it is not root (DESIGN §1).
    let state = [cfg.queue_dir(), cfg.domaininfo_dir()];
    if let Err(e) = daemon::own_state_dirs(Role::Queued, &ids, &cfg.data_dir, &state) {
        return daemon::startup_failed(format!(
            "cannot give the queue directories to queued's user: {e}"
        ));
    }
    // The order matters: lock the queue before anything else (a second
    // queued on the same data dir stops here), bind the sockets before
    // cleaning the queue (one that cannot serve never touches a file).
    // The lock file is opened as root, but never through a link.
    let queue_dir = cfg.queue_dir();
    let spool = match spool::Spool::open(&queue_dir, cfg.testing.fail_queue_writes) {
        Ok(s) => s.fail_sync_if(cfg.testing.fail_dir_sync_if_exists.clone()),
        Err(e) => {
            return daemon::startup_failed(format!(
                "{}: key data_dir: cannot open the queue directory {}: {e}",
                cfg.file_path().display(),
                queue_dir.display()
            ));
        }
    };
    let _queue_lock = match spool.lock() {
        Ok(l) => l,
        Err(e) => {
            return daemon::startup_failed(format!(
                "another queued owns the queue: {e}; refusing to start"
            ));
        }
    };
    // The IPC sockets, if nobody handed them over, are bound while root
    // (the runtime directory may be root's); from here on queued is its
    // own user, so every file it reads or writes — keys, users, the queue
    // and its lock — is read the way a reload will read it, and nothing a
    // compromised earlier run left in its directories is opened as root.
    let mut socket_locks = Vec::new();
    let mut listener = |which: IpcSocket| -> Result<std::os::unix::net::UnixListener, ExitCode> {
        take_or_bind(&mut sockets, which, &cfg, &ids, &mut socket_locks)
    };
    let submit = match listener(IpcSocket::Submit) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let deliver = match listener(IpcSocket::Deliver) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let local = match listener(IpcSocket::Local) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if let Err(e) = daemon::drop_privileges(Role::Queued, &ids) {
        return daemon::startup_failed(format!("cannot drop privileges: {e}"));
    }
    let cfg = Arc::new(cfg);
    // Taken before the files are read: a change made meanwhile is seen by
    // the first periodic reload.
    let domains_state = tambo_common::domains::files_state(&cfg.config_dir);
    let domains = match Domains::load(&cfg) {
        Ok(d) => d,
        Err(e) => return daemon::startup_failed(e),
    };
    // The DKIM keys: read here, and nowhere else; a bad one stops startup.
    let dkim = match dkim::DkimKeys::load(&cfg) {
        Ok(k) => Arc::new(k),
        Err(e) => return daemon::startup_failed(e),
    };
    for (name, d) in domains.iter() {
        tracing::info!(
            "domain {name}: {} users, {} aliases, {} DKIM keys",
            d.users.len(),
            d.aliases.len(),
            dkim.count(name)
        );
    }
    // The TLS keys: read here, and nowhere else.
    let certs = match certs::Certs::load(&cfg.config_dir) {
        Ok(c) => c,
        Err(e) => return daemon::startup_failed(e),
    };
    let loaded = match spool.load() {
        Ok(l) => l,
        Err(e) => {
            return daemon::startup_failed(format!(
                "cannot read the queue directory {}: {e}",
                queue_dir.display()
            ));
        }
    };
    for (path, why) in &loaded.unreadable {
        tracing::error!(
            "unreadable queue item {} (left in place; remove it and its d: file to discard it): {why}",
            path.display()
        );
    }
    metrics::global().add(
        names::QUEUE_UNREADABLE_ITEMS,
        None,
        loaded.unreadable.len() as u64,
    );
    let domaininfo = match domaininfo::DomainInfo::load(&cfg.domaininfo_dir()) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            return daemon::startup_failed(format!(
                "cannot read the domaininfo directory {}: {e}",
                cfg.domaininfo_dir().display()
            ));
        }
    };
    // The mail log, opened as queued's user; written by a thread started
    // after the lockdown, so bound by it.
    let mail_log = match maillog::open(&cfg) {
        Ok(w) => w,
        Err(e) => return daemon::startup_failed(e),
    };
    if let Err(e) = tambo_common::sandbox::lock_down(Role::Queued, &cfg) {
        return daemon::startup_failed(format!("cannot lock queued down: {e}"));
    }
    maillog::start(mail_log);
    // One worker: see daemon::runtime.
    let rt = match daemon::runtime(Some(1)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let queue = Arc::new(queue::Queue::new(
            cfg.clone(),
            domains,
            spool,
            domaininfo,
            dkim,
        ));
        let certs_state = certs::files_state(&cfg.config_dir);
        daemon::push_metrics(Role::Queued, &flags, &cfg, &ids);
        let (submit, deliver, local) = match (
            daemon::tokio_unix(submit),
            daemon::tokio_unix(deliver),
            daemon::tokio_unix(local),
        ) {
            (Ok(s), Ok(d), Ok(l)) => (s, d, l),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return daemon::startup_failed(format!("IPC listener: {e}"));
            }
        };
        tracing::info!(
            "queue loaded: {} items, {} unreadable, {} unfinished new items removed, {} interrupted removals finished, {} bodies without an item set aside, {} temp or unused files removed",
            loaded.items.len(),
            loaded.unreadable.len(),
            loaded.torn,
            loaded.removals_finished,
            loaded.set_aside,
            loaded.removed_temp
        );
        for item in loaded.items {
            queue.start(item, queue::Origin::Loaded);
        }
        if let Some(dovecot) = queue.dovecot.clone() {
            // Only a warning: Dovecot may come up after us, and each lookup
            // looks for it again (REFERENCE §5.5). Not awaited, so a Dovecot
            // that hangs cannot hold up startup.
            tokio::spawn(async move {
                match dovecot.reachable().await {
                    Ok(()) => tracing::info!("Dovecot fallback on: {}", dovecot.describe()),
                    Err(e) => tracing::warn!(
                        "Dovecot fallback on, but Dovecot cannot be reached now: {e}; \
                         AUTH and RCPT for users only Dovecot knows get temporary errors until it can"
                    ),
                }
            });
        }
        tracing::info!(
            "queued listening on {} and {}",
            IpcSocket::Submit.path(&cfg).display(),
            IpcSocket::Deliver.path(&cfg).display()
        );
        let ids = Arc::new(ids);
        // Bounded pools for what peers can make queued compute, one for TLS
        // signatures and one for password hashes: a signature takes
        // microseconds, a hash ~50 ms, and an AUTH flood must not make
        // every handshake wait behind it.
        let signatures = Arc::new(pool::CpuPool::for_this_machine());
        let hashes = Arc::new(pool::CpuPool::for_this_machine());
        // smtpd polls for new certificates every reload period: the keys
        // they replace keep signing for two periods and a margin.
        let keys = Arc::new(keylink::KeyService::new(
            certs,
            signatures,
            cfg.reload_period() * 2 + std::time::Duration::from_secs(10),
            cfg.tambo.max_tls_signatures_per_second,
        ));
        auth::warm_up();
        let auth = Arc::new(auth::Service {
            pool: hashes,
            budget: auth::FailureBudget::default(),
        });
        // Reloads: users, aliases and certificates every reload period
        // when their files changed, and on SIGHUP whatever they look like;
        // domaininfo on SIGHUP. One reload at a time, each reading the
        // files when it runs, so an older read can never put back older
        // files; a file that does not load keeps the previous data in use.
        let reloads = Arc::new(std::sync::Mutex::new(Reloads {
            certs: certs_state,
            domains: domains_state,
        }));
        let (q, c, k, r) = (queue.clone(), cfg.clone(), keys.clone(), reloads.clone());
        daemon::on_sighup(move || {
            let (q, c, k, r) = (q.clone(), c.clone(), k.clone(), r.clone());
            // Reading the files blocks: off the runtime's threads.
            maillog::reopen();
            tokio::task::spawn_blocking(move || {
                let mut last = r.lock().unwrap_or_else(|e| e.into_inner());
                match q.domaininfo.reload() {
                    Ok(n) => tracing::info!("SIGHUP: domaininfo re-read ({n} domains)"),
                    Err(e) => {
                        metrics::inc_label(names::CONFIG_RELOAD_ERRORS, "domaininfo");
                        tracing::error!("SIGHUP: cannot re-read domaininfo, keeping what is in memory: {e}")
                    }
                }
                reload_domains(&q, &c, true, &mut last.domains);
                k.reload(&c.config_dir, true, &mut last.certs);
            });
        });
        let (q, c, k) = (queue.clone(), cfg.clone(), keys.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(c.reload_period());
            tick.tick().await;
            loop {
                tick.tick().await;
                let (q, c, k, r) = (q.clone(), c.clone(), k.clone(), reloads.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    let mut last = r.lock().unwrap_or_else(|e| e.into_inner());
                    reload_domains(&q, &c, false, &mut last.domains);
                    k.reload(&c.config_dir, false, &mut last.certs);
                })
                .await;
            }
        });
        // /debug/queue: the queue pushed to monitord when it changed (and
        // once a minute, so the date it shows stays recent).
        let q = queue.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut sent_at: Option<std::time::Instant> = None;
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tick.tick().await;
                let version = q.version();
                if last != Some(version)
                    || sent_at.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(60))
                {
                    // Only the oldest items: the page holds 128 KiB at
                    // most, a few hundred of them.
                    let (total, items) = q.snapshot_head(QUEUE_PAGE_ITEMS);
                    metrics::set_queue_snapshot(admin::dump(&items, total));
                    last = Some(version);
                    sent_at = Some(std::time::Instant::now());
                }
            }
        });
        let ll = Arc::new(local::Listener::new(queue.clone(), auth.clone()));
        tokio::spawn(daemon::accept_unix(local, "local.sock", move |s| {
            local::serve(ll.clone(), s)
        }));
        let l = Arc::new(submit::Listener::new(
            queue.clone(),
            keys,
            auth,
            (*ids).clone(),
            daemon::nofile_limit(),
        ));
        tokio::spawn(daemon::accept_unix(submit, "submit.sock", move |s| {
            submit::serve(l.clone(), s)
        }));
        let dispatcher = queue.dispatcher.clone();
        tokio::spawn(daemon::accept_unix(deliver, "deliver.sock", move |s| {
            dispatch::serve(dispatcher.clone(), ids.clone(), s)
        }));
        daemon::notify_ready();
        daemon::wait_for_shutdown().await;
        tracing::info!("queued stopping");
        queue.sync_before_exit().await;
        tokio::task::spawn_blocking(maillog::flush).await.ok();
        ExitCode::SUCCESS
    })
}

/// The socket `which`, as handed over (systemd, `tambo run`) or bound here.
fn take_or_bind(
    inherited: &mut Inherited,
    which: IpcSocket,
    cfg: &tambo_common::config::Config,
    ids: &Identities,
    locks: &mut Vec<tambo_common::lockfile::LockFile>,
) -> Result<std::os::unix::net::UnixListener, ExitCode> {
    if let Some(fd) = inherited.take_named(which.name()).pop() {
        return Ok(fd.into());
    }
    let path = which.path(cfg);
    match sockets::bind(&path, which.access(ids)) {
        Ok(b) => {
            locks.push(b.lock);
            Ok(b.listener)
        }
        Err(e) => Err(daemon::startup_failed(format!(
            "cannot listen on {}: {e}",
            path.display()
        ))),
    }
}
