//! Opening an outgoing SMTP session on one host (REFERENCE §4.5 step 5):
//! connect, greeting, EHLO, STARTTLS when offered (and a plain retry if it
//! fails), and the security checks a session must pass before use.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;

use tambo_proto::deliver::SecLevel;
use tambo_proto::metrics::names;

use super::meter::Meter;
use super::source::connect_from;
use super::tls::TlsClient;
use crate::smtp::client::{greeting, hello};
use crate::smtp::{Conn, Extensions, Failure, Protocol, Stage, Stream};

/// An open session, ready for MAIL FROM.
pub struct Session {
    pub conn: Conn,
    pub ext: Extensions,
    pub level: SecLevel,
}

/// The limits of a session.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting to one host (all its addresses).
    pub connect: Duration,
    /// A whole session, from the connection to the end of the data; for a
    /// cached connection, each new use.
    pub session: Duration,
    /// Any single wait for the server, within the session.
    pub wait: Duration,
    /// The first command on a cached connection (MAIL) and its reply. A
    /// connection the server dropped or forgot while idle often gives no
    /// answer at all; a new one must not wait the whole session for it.
    pub reuse: Duration,
}

impl Timeouts {
    pub const CONNECT: Duration = Duration::from_secs(60);
    pub const SESSION: Duration = Duration::from_secs(10 * 60);
    pub const REUSE: Duration = Duration::from_secs(30);

    /// The defaults, or `[testing] smtp_out_timeout` in their place.
    pub fn new(testing: Option<Duration>) -> Self {
        match testing {
            Some(t) => Timeouts {
                connect: Self::CONNECT.min(t),
                session: t,
                wait: t,
                reuse: Self::REUSE.min(t),
            },
            None => Timeouts {
                connect: Self::CONNECT,
                session: Self::SESSION,
                wait: Self::SESSION,
                reuse: Self::REUSE,
            },
        }
    }
}

/// Makes sessions.
pub struct Dialer {
    /// Our name in EHLO, IDNA-ASCII.
    pub hello: String,
    /// `[tambo] outgoing_source_address`: at most one per family.
    pub sources: Vec<IpAddr>,
    pub timeouts: Timeouts,
    pub tls: TlsClient,
    pub meter: Meter,
}

/// Why STARTTLS did not give a usable session.
enum TlsFailed {
    /// STARTTLS was refused or the handshake failed: retry without TLS.
    Retry(String),
    /// TLS worked but the session failed after it (EHLO): a real failure.
    After(Failure),
}

impl Dialer {
    /// Opens a session on `host` at one of `addrs`, by the end of
    /// `deadline`.
    pub async fn open(
        &self,
        host: &str,
        addrs: &[SocketAddr],
        deadline: Instant,
    ) -> Result<Session, Failure> {
        let (tcp, addr) = self.connect(host, addrs, deadline).await?;
        let mut conn = Conn::new(Stream::Tcp(tcp), deadline, self.timeouts.wait);
        greeting(&mut conn, host).await?;
        let ext = hello(&mut conn, Protocol::Smtp, &self.hello, host).await?;
        if !ext.starttls {
            self.meter.inc_label(names::SMTP_OUT_TLS_COUNT, "plain");
            return Ok(Session {
                conn,
                ext,
                level: SecLevel::Plain,
            });
        }
        match self.starttls(conn, host).await {
            Ok(session) => return Ok(session),
            Err(TlsFailed::After(f)) => return Err(f),
            Err(TlsFailed::Retry(why)) => {
                self.meter
                    .inc_label(names::SMTP_OUT_TLS_COUNT, "tls:failed");
                tracing::info!(%host, %addr, "STARTTLS failed ({}); retrying without TLS", why.escape_debug());
            }
        }
        // The same address again, in plain text (as chasquid does): a
        // broken TLS stack should not stop mail, and domaininfo and
        // MTA-STS still refuse the downgrade where they must.
        let (tcp, _) = self.connect(host, &[addr], deadline).await?;
        let mut conn = Conn::new(Stream::Tcp(tcp), deadline, self.timeouts.wait);
        greeting(&mut conn, host).await?;
        let ext = hello(&mut conn, Protocol::Smtp, &self.hello, host).await?;
        self.meter.inc_label(names::SMTP_OUT_TLS_COUNT, "plain");
        Ok(Session {
            conn,
            ext: Extensions {
                starttls: false,
                ..ext
            },
            level: SecLevel::Plain,
        })
    }

    /// STARTTLS, the handshake (SNI = `host`), and EHLO again (RFC 3207
    /// §4.2: nothing learnt before TLS is kept).
    async fn starttls(&self, mut conn: Conn, host: &str) -> Result<Session, TlsFailed> {
        match conn.command("STARTTLS").await {
            Ok(r) if r.is_positive() => {}
            Ok(r) => return Err(TlsFailed::Retry(r.to_string())),
            Err(e) => return Err(TlsFailed::Retry(e.to_string())),
        }
        let (deadline, wait) = (conn.deadline(), conn.wait());
        let (tcp, budget) = conn
            .into_tcp()
            .map_err(|e| TlsFailed::Retry(e.to_string()))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| TlsFailed::Retry(format!("{host:?} cannot be a TLS server name: {e}")))?;
        let (connector, verdict) = self
            .tls
            .connector()
            .map_err(|e| TlsFailed::Retry(e.to_string()))?;
        let until = deadline.min(Instant::now() + wait);
        let tls = match tokio::time::timeout_at(until, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(TlsFailed::Retry(format!("TLS handshake: {e}"))),
            Err(_) => return Err(TlsFailed::Retry("TLS handshake timed out".into())),
        };
        let (level, why) = verdict.level();
        match why {
            None => self
                .meter
                .inc_label(names::SMTP_OUT_TLS_COUNT, "tls:secure"),
            Some(why) => {
                self.meter
                    .inc_label(names::SMTP_OUT_TLS_COUNT, "tls:insecure");
                tracing::debug!(%host, "TLS with a certificate that does not verify: {why}");
            }
        }
        let mut conn = Conn::resume(Stream::Tls(Box::new(tls)), budget, deadline, wait);
        let ext = hello(&mut conn, Protocol::Smtp, &self.hello, host)
            .await
            .map_err(TlsFailed::After)?;
        Ok(Session {
            conn,
            ext: Extensions {
                starttls: false,
                ..ext
            },
            level,
        })
    }

    /// Connects to the first of `addrs` that answers. Each address gets an
    /// equal share of the connect time left, so one that drops packets
    /// cannot use it all.
    async fn connect(
        &self,
        host: &str,
        addrs: &[SocketAddr],
        deadline: Instant,
    ) -> Result<(TcpStream, SocketAddr), Failure> {
        let until = deadline.min(Instant::now() + self.timeouts.connect);
        let mut last = String::from("no address to connect to");
        for (i, &addr) in addrs.iter().enumerate() {
            let now = Instant::now();
            if now >= until {
                last = format!("{addr}: timed out");
                break;
            }
            let share = (until - now) / (addrs.len() - i) as u32;
            match tokio::time::timeout(share, connect_from(&self.sources, addr)).await {
                Ok(Ok(s)) => {
                    self.meter.inc(names::SMTP_OUT_CONNECTIONS);
                    return Ok((s, addr));
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        Err(Failure::temporary(format!(
            "{}: {last} ({host})",
            Stage::Connect
        )))
    }

    /// The checks a session must pass for a job (REFERENCE §4.5–4.7): not
    /// below the recipient domain's recorded level, and TLS_SECURE under
    /// an MTA-STS policy in `enforce` mode. Failing either is temporary: a
    /// misconfiguration may be fixed, and the DSN comes at give-up time.
    pub fn check(
        &self,
        level: SecLevel,
        required: SecLevel,
        domain: &str,
        sts_enforce: bool,
        host: &str,
    ) -> Result<(), Failure> {
        if level < required {
            self.meter
                .inc_label(names::SMTP_OUT_SECURITY_LEVEL_CHECKS, "fail");
            return Err(Failure::temporary(format!(
                "security level check failed: the connection is {}, and {} is recorded for {domain} ({host})",
                level.name(),
                required.name()
            )));
        }
        self.meter
            .inc_label(names::SMTP_OUT_SECURITY_LEVEL_CHECKS, "pass");
        if sts_enforce {
            if level != SecLevel::TlsSecure {
                self.meter.inc_label(names::SMTP_OUT_STS_SECURITY, "fail");
                return Err(Failure::temporary(format!(
                    "the MTA-STS policy of {domain} requires TLS with a valid certificate, and the connection is {} ({host})",
                    level.name()
                )));
            }
            self.meter.inc_label(names::SMTP_OUT_STS_SECURITY, "pass");
        }
        Ok(())
    }
}
