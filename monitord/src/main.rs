//! tambo-monitord: sums the counters every tambo process pushes and serves
//! them (with the debug pages) on `monitoring_address`.
//!
//! Holds: monitor.sock, the monitoring listener.
//! Must never: touch mail. On monitor.sock it receives, and writes only
//! profile requests (one at a time, checked by the process), so a slow,
//! dead or compromised monitord can never slow, stop or steer mail.
#![forbid(unsafe_code)]

mod collector;
mod expvar;
mod http;
mod monitor_sock;
mod openmetrics;
mod pprof;
mod text;
mod traces;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use tambo_common::daemon;
use tambo_common::sockets::{self, IpcSocket};
use tambo_proto::Role;

fn main() -> ExitCode {
    let started = match daemon::boot(
        Role::Monitord,
        "tambo-monitord",
        "tambo's monitoring daemon",
    ) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let daemon::Started {
        cfg,
        ids,
        mut sockets,
        ..
    } = started;
    // Sockets first (inherited from systemd or `tambo run`, or bound here),
    // then root is dropped, then the runtime starts.
    let sock_path = IpcSocket::Monitor.path(&cfg);
    let mut _lock = None;
    let unix = match sockets.take_named(IpcSocket::Monitor.name()).pop() {
        Some(fd) => std::os::unix::net::UnixListener::from(fd),
        None => match sockets::bind(&sock_path, IpcSocket::Monitor.access(&ids)) {
            Ok(b) => {
                _lock = Some(b.lock);
                b.listener
            }
            Err(e) => {
                return daemon::startup_failed(format!(
                    "cannot listen on {}: {e}",
                    sock_path.display()
                ));
            }
        },
    };
    let http_listener = match (
        sockets.take_named("monitoring").pop(),
        cfg.monitoring_address,
    ) {
        (Some(fd), _) => Some(std::net::TcpListener::from(fd)),
        (None, Some(addr)) => match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                return daemon::startup_failed(format!(
                    "{}: key monitoring_address: cannot listen on {addr}: {e}",
                    cfg.file_path().display()
                ));
            }
        },
        (None, None) => None,
    };
    if let Err(e) = daemon::drop_privileges(Role::Monitord, &ids) {
        return daemon::startup_failed(format!("cannot drop privileges: {e}"));
    }
    if let Err(e) = tambo_common::sandbox::lock_down(Role::Monitord, &cfg) {
        return daemon::startup_failed(format!("cannot lock monitord down: {e}"));
    }
    let rt = match daemon::runtime(Some(1)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        daemon::on_sighup(|| tracing::info!("SIGHUP: monitord has nothing to reload"));
        let totals: collector::Shared = Arc::new(Mutex::new(collector::Totals::new()));
        let listener = match daemon::tokio_unix(unix) {
            Ok(l) => l,
            Err(e) => return daemon::startup_failed(format!("monitor.sock: {e}")),
        };
        if let Some(l) = http_listener {
            let l = match daemon::tokio_tcp(l) {
                Ok(l) => l,
                Err(e) => return daemon::startup_failed(format!("monitoring listener: {e}")),
            };
            match l.local_addr() {
                Ok(a) => tracing::info!("monitoring listening on http://{a}/"),
                Err(e) => tracing::warn!("monitoring listener without address: {e}"),
            }
            let site = Arc::new(http::Site {
                totals: totals.clone(),
                hostname: cfg.hostname.clone(),
                cmdline: std::env::args().collect(),
                started: chrono::Local::now(),
                config: cfg.to_toml(),
            });
            let idle = cfg.testing.http_idle_timeout.unwrap_or(http::IDLE_TIMEOUT);
            tokio::spawn(http::run(l, site, idle));
        } else {
            tracing::info!("monitoring_address is empty: no monitoring HTTP server");
        }
        tracing::info!("monitord listening on {}", sock_path.display());
        let monitor = Arc::new(monitor_sock::Listener::new(
            totals.clone(),
            ids,
            cfg.testing.ipc_idle_timeout,
        ));
        tokio::spawn(daemon::accept_unix(listener, "monitor.sock", move |s| {
            monitor_sock::serve(monitor.clone(), s)
        }));
        daemon::notify_ready();
        daemon::wait_for_shutdown().await;
        tracing::info!("monitord stopping");
        ExitCode::SUCCESS
    })
}
