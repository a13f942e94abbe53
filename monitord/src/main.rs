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

use clap::Parser;
use tokio::net::UnixListener;

use tambo_common::daemon::{self, DaemonFlags};

#[derive(Parser)]
#[command(
    name = "tambo-monitord",
    about = "tambo's monitoring daemon",
    disable_version_flag = true
)]
struct Flags {
    #[command(flatten)]
    daemon: DaemonFlags,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    if flags.daemon.version {
        println!("{}", tambo_common::build::version_line("tambo-monitord"));
        return ExitCode::SUCCESS;
    }
    daemon::init_logging();
    let cfg = match flags.daemon.load_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(collector::serve(t.clone(), s));
                    }
                    Err(e) => {
                        tracing::warn!("monitor.sock accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        daemon::wait_for_shutdown().await;
        tracing::info!("monitord stopping");
        ExitCode::SUCCESS
    })
}
