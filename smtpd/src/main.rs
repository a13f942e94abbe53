//! tambo-smtpd binary: flags, config, listeners, then [`tambo_smtpd`]'s
//! sessions. See the library's docs for what smtpd may and may not do.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use tambo_common::config::ListenAddr;
use tambo_common::daemon;
use tambo_common::sockets::IpcSocket;
use tambo_proto::Role;
use tambo_proto::submit::{MailLogEvent, Mode};
use tambo_smtpd::{maillog, server, session, spf, tls};

/// System's allocator, sampled for heap profiles (see
/// `tambo_common::profile::heap`).
#[cfg(feature = "profile")]
#[global_allocator]
static ALLOCATOR: tambo_common::profile::heap::Sampler = tambo_common::profile::heap::Sampler;

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
    let supervised = daemon::under_supervisor();
    let mut listeners: Vec<(Mode, std::net::TcpListener)> = Vec::new();
    for m in cfg.smtp_modes() {
        let inherited: Vec<std::net::TcpListener> = sockets
            .take_named(m.fd_name)
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect();
        if supervised {
            // `tambo run` passes exactly what the config asks for.
            listeners.extend(inherited.into_iter().map(|l| (m.mode, l)));
            continue;
        }
        let mut inherited = Some(inherited);
        for addr in m.addrs {
            match addr {
                ListenAddr::Systemd => match inherited.take() {
                    Some(l) if !l.is_empty() => {
                        listeners.extend(l.into_iter().map(|l| (m.mode, l)))
                    }
                    // REFERENCE §1.1: a mode with no socket only gets a
                    // warning.
                    Some(_) => tracing::warn!(
                        "{}: key {}: \"systemd\" is listed, but no socket named \"{}\" was passed (FileDescriptorName={}): that listener is off",
                        cfg.file_path().display(),
                        m.key,
                        m.fd_name,
                        m.fd_name
                    ),
                    None => {}
                },
                ListenAddr::Addr(a) => match tambo_common::sockets::listen_tcp(*a) {
                    Ok(l) => listeners.push((m.mode, l)),
                    Err(e) => {
                        return daemon::startup_failed(format!(
                            "{}: key {}: cannot listen on {a}: {e}",
                            cfg.file_path().display(),
                            m.key
                        ));
                    }
                },
            }
        }
    }
    if listeners.is_empty() {
        return daemon::startup_failed(format!(
            "no listening socket: set smtp_address, submission_address or submission_over_tls_address in {}",
            cfg.file_path().display()
        ));
    }
    // SPF at MAIL (REFERENCE §2.6), on the system's resolver (or the
    // test's, `[testing] dns_server`): built here, since resolv.conf is
    // out of reach once smtpd is locked down. One for all sessions, so they
    // share the resolver's cache.
    let resolver = match tambo_common::dns::resolver(&cfg) {
        Ok(r) => r,
        Err(e) => return daemon::startup_failed(e),
    };
    if let Err(e) = daemon::drop_privileges(Role::Smtpd, &ids) {
        return daemon::startup_failed(format!("cannot drop privileges: {e}"));
    }
    if let Err(e) = tambo_common::sandbox::lock_down(Role::Smtpd, &cfg) {
        return daemon::startup_failed(format!("cannot lock smtpd down: {e}"));
    }
    let rt = match daemon::runtime(None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        // SIGHUP: queued reloads the certificates; smtpd looks for them.
        let hup = Arc::new(tokio::sync::Notify::new());
        let h = hup.clone();
        daemon::on_sighup(move || {
            tracing::info!("SIGHUP: asking queued for its certificates");
            h.notify_one();
        });
        daemon::push_metrics(Role::Smtpd, &flags, &cfg, &ids);
        maillog::start(IpcSocket::Submit.path(&cfg), ids.clone());
        // TLS: the chains from queued over the key link, fetched in the
        // background (queued may not be up yet); until then STARTTLS is not
        // offered and 465 refuses handshakes.
        let keys = Arc::new(tls::KeyClient::new(
            IpcSocket::Submit.path(&cfg),
            ids.clone(),
        ));
        let link_keepalive = tambo_proto::keepalive_every(
            cfg.testing
                .ipc_idle_timeout
                .unwrap_or(tambo_proto::submit::IDLE_TIMEOUT),
        );
        tokio::spawn(keys.clone().keep_alive(link_keepalive));
        let tls = tls::Tls::new(cfg.hostname.clone(), keys);
        let t = tls.clone();
        let period = cfg.reload_period();
        tokio::spawn(async move {
            t.clone().refresh_until_ready().await;
            t.follow(period, hup).await;
        });
        let spf = Arc::new(spf::SpfChecker::new(resolver));
        let sessions = server::Sessions::new(server::Caps {
            total: cfg.tambo.max_sessions,
            per_client: cfg.tambo.max_sessions_per_client,
        });
        if cfg.haproxy_incoming {
            // Said once: a direct client is closed without a word, which is
            // puzzling to debug without knowing this.
            tracing::info!("haproxy_incoming: every connection must start with a PROXY header");
        }
        for (mode, l) in listeners {
            let mut scfg = session::SessionConfig::new(
                cfg.hostname.clone(),
                cfg.max_data_size(),
                IpcSocket::Submit.path(&cfg),
                ids.clone(),
                mode,
            );
            if let Some(t) = cfg.testing.smtp_command_timeout {
                scfg.command_timeout = t;
            }
            if let Some(t) = cfg.testing.smtp_first_deadline {
                scfg.first_deadline = t;
            }
            scfg.haproxy = cfg.haproxy_incoming;
            // A client that dawdles between commands or inside DATA must
            // never have its link (and its transaction) closed by queued.
            scfg.link_keepalive = link_keepalive;
            scfg.tls = Some(tls.clone());
            scfg.spf = Some(spf.clone());
            scfg.relay_networks = cfg.tambo.relay_networks.clone();
            let l = match daemon::tokio_tcp(l) {
                Ok(l) => l,
                Err(e) => return daemon::startup_failed(format!("SMTP listener: {e}")),
            };
            let what = match mode {
                Mode::Smtp => "SMTP",
                Mode::Submission => "submission",
                Mode::SubmissionTls => "submission+TLS",
            };
            match l.local_addr() {
                Ok(a) => {
                    tracing::info!("smtpd listening on {a} ({what})");
                    maillog::log(MailLogEvent::Listening {
                        what: what.into(),
                        addr: a.to_string(),
                    });
                }
                Err(e) => tracing::warn!("listener without address: {e}"),
            }
            tokio::spawn(server::run(l, Arc::new(scfg), sessions.clone()));
        }
        daemon::notify_ready();
        daemon::wait_for_shutdown().await;
        tracing::info!("smtpd stopping");
        ExitCode::SUCCESS
    })
}
