//! tambo-monitord: sums the counters every tambo process pushes and serves
//! them (with the debug pages) on `monitoring_address`.
//!
//! Holds: monitor.sock, the monitoring listener.
//! Must never: touch mail. It receives, one way, and answers nothing on
//! monitor.sock, so a slow or dead monitord can never slow or stop mail.
#![forbid(unsafe_code)]

mod collector;
mod expvar;
mod http;
mod openmetrics;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;

use tambo_common::daemon;

fn main() -> ExitCode {
    let (_flags, cfg, rt) =
        match daemon::boot("tambo-monitord", "tambo's monitoring daemon", Some(1)) {
            Ok(v) => v,
            Err(code) => return code,
        };
    rt.block_on(async move {
        let totals: collector::Shared = Arc::new(Mutex::new(collector::Totals::new()));
        let sock = cfg.monitor_socket();
        let listener = match daemon::prepare_socket(&sock).and_then(|_| UnixListener::bind(&sock)) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", sock.display());
                return ExitCode::FAILURE;
            }
        };
        if let Some(addr) = cfg.monitoring_address {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    match l.local_addr() {
                        Ok(a) => tracing::info!("monitoring listening on http://{a}/"),
                        Err(e) => tracing::warn!("monitoring listener without address: {e}"),
                    }
                    let site = Arc::new(http::Site {
                        totals: totals.clone(),
                        hostname: cfg.hostname.clone(),
                        cmdline: std::env::args().collect(),
                        started: chrono::Local::now(),
                    });
                    tokio::spawn(http::run(l, site));
                }
                Err(e) => {
                    tracing::error!(
                        "{}: key monitoring_address: cannot listen on {addr}: {e}",
                        cfg.config_dir.join("tambo.conf").display()
                    );
                    return ExitCode::FAILURE;
                }
            }
        } else {
            tracing::info!("monitoring_address is empty: no monitoring HTTP server");
        }
        tracing::info!("monitord listening on {}", sock.display());
        let t = totals.clone();
        tokio::spawn(daemon::accept_unix(listener, "monitor.sock", move |s| {
            collector::serve(t.clone(), s)
        }));
        daemon::wait_for_shutdown().await;
        tracing::info!("monitord stopping");
        ExitCode::SUCCESS
    })
}
