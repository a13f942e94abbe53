//! tambo-smtpd binary: flags, config, listeners, then [`tambo_smtpd`]'s
//! sessions. See the library's docs for what smtpd may and may not do.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use tambo_common::config::ListenAddr;
use tambo_common::daemon;
use tambo_proto::Role;
use tambo_proto::submit::Mode;
use tambo_smtpd::{server, session};

fn main() -> ExitCode {
    let (flags, cfg, rt) = match daemon::boot("tambo-smtpd", "tambo's SMTP server", None) {
        Ok(v) => v,
        Err(code) => return code,
    };
    rt.block_on(async move {
        // Bind first: a port we cannot have is a startup error.
        let mut listeners = Vec::new();
        for addr in &cfg.smtp_address {
            match addr {
                ListenAddr::Systemd => {
                    tracing::warn!(
                        "smtp_address \"systemd\": socket activation is not supported yet; skipped"
                    );
                }
                ListenAddr::Addr(a) => match tokio::net::TcpListener::bind(a).await {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        tracing::error!(
                            "{}: key smtp_address: cannot listen on {a}: {e}",
                            cfg.config_dir.join("tambo.conf").display()
                        );
                        return ExitCode::FAILURE;
                    }
                },
            }
        }
        for (key, list) in [
            ("submission_address", &cfg.submission_address),
            (
                "submission_over_tls_address",
                &cfg.submission_over_tls_address,
            ),
        ] {
            if !list.is_empty() {
                tracing::warn!("{key} is set, but submission is not implemented yet; ignored");
            }
        }
        if listeners.is_empty() {
            tracing::error!(
                "no listening socket: set smtp_address in {}",
                cfg.config_dir.join("tambo.conf").display()
            );
            return ExitCode::FAILURE;
        }
        tambo_proto::metrics::spawn_pusher(
            cfg.monitor_socket(),
            Role::Smtpd,
            flags.as_pairs(),
            tambo_common::build::VERSION.into(),
        );
        let mut scfg = session::SessionConfig::new(
            cfg.hostname.clone(),
            cfg.max_data_size(),
            cfg.submit_socket(),
            Mode::Smtp,
        );
        if let Some(t) = cfg.testing.smtp_command_timeout {
            scfg.command_timeout = t;
        }
        let scfg = Arc::new(scfg);
        for l in listeners {
            match l.local_addr() {
                Ok(a) => tracing::info!("smtpd listening on {a} (SMTP)"),
                Err(e) => tracing::warn!("listener without address: {e}"),
            }
            tokio::spawn(server::run(l, scfg.clone()));
        }
        daemon::wait_for_shutdown().await;
        tracing::info!("smtpd stopping");
        ExitCode::SUCCESS
    })
}
