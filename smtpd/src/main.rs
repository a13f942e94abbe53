//! tambo-smtpd binary: flags, config, listeners, then [`tambo_smtpd`]'s
//! sessions. See the library's docs for what smtpd may and may not do.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use tambo_common::config::ListenAddr;
use tambo_common::daemon;
use tambo_common::sockets::IpcSocket;
use tambo_proto::Role;
use tambo_proto::submit::Mode;
use tambo_smtpd::{server, session};

fn main() -> ExitCode {
    let started = match daemon::boot(Role::Smtpd, "tambo-smtpd", "tambo's SMTP server") {
        Ok(v) => v,
        Err(code) => return code,
    };
    let daemon::Started {
        flags,
        cfg,
        ids,
        mut sockets,
    } = started;
    // Listeners first: handed over (by systemd, or by `tambo run`, which
    // binds every configured address itself) or bound here; then root is
    // dropped; then the runtime starts.
    let inherited: Vec<std::net::TcpListener> = sockets
        .take_named("smtp")
        .into_iter()
        .map(std::net::TcpListener::from)
        .collect();
    let mut listeners = Vec::new();
    if daemon::under_supervisor() && !inherited.is_empty() {
        listeners = inherited;
    } else {
        let mut inherited = Some(inherited);
        for addr in &cfg.smtp_address {
            match addr {
                ListenAddr::Systemd => match inherited.take() {
                    Some(l) if !l.is_empty() => listeners.extend(l),
                    _ => {
                        return daemon::startup_failed(format!(
                            "{}: key smtp_address: \"systemd\" is listed, but no socket named \"smtp\" was passed (FileDescriptorName=smtp)",
                            cfg.file_path().display()
                        ));
                    }
                },
                ListenAddr::Addr(a) => match std::net::TcpListener::bind(a) {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        return daemon::startup_failed(format!(
                            "{}: key smtp_address: cannot listen on {a}: {e}",
                            cfg.file_path().display()
                        ));
                    }
                },
            }
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
        return daemon::startup_failed(format!(
            "no listening socket: set smtp_address in {}",
            cfg.file_path().display()
        ));
    }
    if let Err(e) = daemon::drop_privileges(Role::Smtpd, &ids) {
        return daemon::startup_failed(format!("cannot drop privileges: {e}"));
    }
    let rt = match daemon::runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        daemon::on_sighup(|| tracing::info!("SIGHUP: smtpd has nothing to reload"));
        daemon::push_metrics(Role::Smtpd, &flags, &cfg, &ids);
        let mut scfg = session::SessionConfig::new(
            cfg.hostname.clone(),
            cfg.max_data_size(),
            IpcSocket::Submit.path(&cfg),
            ids,
            Mode::Smtp,
        );
        if let Some(t) = cfg.testing.smtp_command_timeout {
            scfg.command_timeout = t;
        }
        // A client that dawdles between commands or inside DATA must never
        // have its link (and its transaction) closed by queued.
        scfg.link_keepalive = tambo_proto::keepalive_every(
            cfg.testing
                .ipc_idle_timeout
                .unwrap_or(tambo_proto::submit::IDLE_TIMEOUT),
        );
        let scfg = Arc::new(scfg);
        let sessions = server::Sessions::new(server::Caps {
            total: cfg.tambo.max_sessions,
            per_client: cfg.tambo.max_sessions_per_client,
        });
        for l in listeners {
            let l = match daemon::tokio_tcp(l) {
                Ok(l) => l,
                Err(e) => return daemon::startup_failed(format!("SMTP listener: {e}")),
            };
            match l.local_addr() {
                Ok(a) => tracing::info!("smtpd listening on {a} (SMTP)"),
                Err(e) => tracing::warn!("listener without address: {e}"),
            }
            tokio::spawn(server::run(l, scfg.clone(), sessions.clone()));
        }
        daemon::notify_ready();
        daemon::wait_for_shutdown().await;
        tracing::info!("smtpd stopping");
        ExitCode::SUCCESS
    })
}
