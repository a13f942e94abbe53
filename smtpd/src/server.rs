//! Listeners: accept connections, enforce the session caps, read the
//! PROXY header when behind a proxy, and give each session its own task.
//!
//! Two caps (REFERENCE §2.1): all sessions together
//! (`[tambo] max_sessions`), and sessions from one client
//! (`[tambo] max_sessions_per_client`; an IPv4 address, or an IPv6 /64,
//! which is what one subscriber usually gets). A client over either gets
//! `421 4.7.0` and is closed before anything is read from it.
//!
//! With `haproxy_incoming` every connection comes from the proxy, and the
//! client is only known once its PROXY header is read. So the global cap is
//! still taken at accept, counting raw connections (a flood that never
//! sends a header stays bounded, each for at most the first deadline), and
//! the per-client cap is taken by the connection's task after the header,
//! for the client the header names.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use tambo_common::address::client_key;
use tambo_common::loglimit::{LogLimiter, skipped};
use tambo_proto::metrics::{self, names};

use crate::proxy::{self, Failure, Header, Kind};
use crate::session::{self, SessionConfig};

/// The two session caps.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: u32,
    pub per_client: u32,
}

/// Live sessions, counted globally and per client; and the rate limits of
/// the listeners' log lines.
#[derive(Debug)]
pub struct Sessions {
    caps: Caps,
    inner: Mutex<Counts>,
    /// One per kind of refused PROXY header: whoever can reach the port
    /// must not be able to flood the log.
    proxy_logs: [LogLimiter; Kind::ALL.len()],
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_client: HashMap<IpAddr, u32>,
    /// When a refusal was last logged (refusals are logged at most once a
    /// second, so a flood cannot flood the log too).
    last_logged: Option<Instant>,
}

/// Which cap refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerClient,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_sessions",
            Refusal::PerClient => "max_sessions_per_client",
        }
    }
}

/// A session slot; given back when dropped.
pub struct Slot {
    sessions: Arc<Sessions>,
    /// The client key it counts against, once known.
    client: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.sessions.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(key) = self.client
            && let Some(n) = c.per_client.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&key);
            }
        }
    }
}

impl Slot {
    /// Counts this slot against its client's cap too, now that the client
    /// is known (behind a proxy: from the header).
    pub fn admit_client(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.client.is_some() {
            return Ok(());
        }
        let key = client_key(ip);
        let mut c = self.sessions.lock();
        Sessions::count_client(&mut c, key, self.sessions.caps)?;
        self.client = Some(key);
        Ok(())
    }
}

impl Sessions {
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            inner: Mutex::default(),
            proxy_logs: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a session from `ip`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let key = client_key(ip);
        let mut c = self.lock();
        if c.total >= self.caps.total {
            return Err(Refusal::Total);
        }
        Self::count_client(&mut c, key, self.caps)?;
        c.total += 1;
        Ok(Slot {
            sessions: self.clone(),
            client: Some(key),
        })
    }

    /// Takes a slot under the global cap only, for a connection whose
    /// client is not known yet; see [`Slot::admit_client`].
    pub fn admit_connection(self: &Arc<Self>) -> Result<Slot, Refusal> {
        let mut c = self.lock();
        if c.total >= self.caps.total {
            return Err(Refusal::Total);
        }
        c.total += 1;
        Ok(Slot {
            sessions: self.clone(),
            client: None,
        })
    }

    /// One more session for `key`, if under its cap. A refused key leaves
    /// no entry behind.
    fn count_client(c: &mut Counts, key: IpAddr, caps: Caps) -> Result<(), Refusal> {
        let n = c.per_client.get(&key).copied().unwrap_or(0);
        if n >= caps.per_client {
            return Err(Refusal::PerClient);
        }
        c.per_client.insert(key, n + 1);
        Ok(())
    }

    /// Whether a refusal should be logged now.
    fn should_log(&self) -> bool {
        let mut c = self.lock();
        let now = Instant::now();
        if c.last_logged
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return false;
        }
        c.last_logged = Some(now);
        true
    }
}

/// Accepts on `listener` forever.
pub async fn run(listener: TcpListener, cfg: Arc<SessionConfig>, sessions: Arc<Sessions>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // The first deadline runs from here: header, handshake and
                // greeting together.
                let deadline = tokio::time::Instant::now() + cfg.first_deadline;
                let _ = stream.set_nodelay(true);
                let slot = if cfg.haproxy {
                    sessions.admit_connection()
                } else {
                    sessions.admit(peer.ip())
                };
                match slot {
                    Ok(slot) => {
                        tokio::spawn(connection(stream, peer, cfg.clone(), slot, deadline));
                    }
                    Err(why) => {
                        sessions.log_refusal(peer, why);
                        tokio::spawn(refuse(stream, cfg.hostname.clone(), why));
                    }
                }
            }
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One accepted connection: its PROXY header if behind a proxy, then its
/// session, holding `slot` throughout.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    cfg: Arc<SessionConfig>,
    mut slot: Slot,
    deadline: tokio::time::Instant,
) {
    let client = if cfg.haproxy {
        // Read from the socket itself, exactly the header's bytes: the
        // session's reader (or on 465 the TLS handshake) starts right
        // after it.
        let client = match proxy::read_header(&mut stream, deadline).await {
            Ok(Header::Proxy { src, .. }) => src,
            Ok(Header::Local) => peer,
            Err(f) => {
                slot.sessions.proxy_failed(peer, &f);
                return;
            }
        };
        if let Err(why) = slot.admit_client(client.ip()) {
            slot.sessions.log_refusal(client, why);
            drop(slot);
            refuse(stream, cfg.hostname.clone(), why).await;
            return;
        }
        tracing::debug!(%peer, %client, "PROXY header");
        client
    } else {
        peer
    };
    session::serve(stream, client, cfg, deadline).await;
    drop(slot);
}

impl Sessions {
    fn log_refusal(&self, client: SocketAddr, why: Refusal) {
        if self.should_log() {
            tracing::info!(peer = %client, "refusing a session: {} reached", why.label());
        }
    }

    /// A refused PROXY header: counted, logged at most once a second per
    /// kind, and the connection closed without a reply (REFERENCE §2.1:
    /// whatever is on the other end does not speak the protocol, and a
    /// reply would only tell it what listens here).
    fn proxy_failed(&self, peer: SocketAddr, f: &Failure) {
        let kind = f.kind();
        metrics::inc_label(names::SMTP_IN_PROXY_ERRORS, kind.label());
        if kind == Kind::Closed {
            // A proxy's plain TCP health check connects and closes: not
            // worth a line every few seconds.
            tracing::debug!(%peer, "closing: {f}");
            return;
        }
        if let Some(n) = self.proxy_logs[kind.index()].allow() {
            tracing::info!(%peer, "closing without a reply: {f}{}", skipped(n));
        }
    }
}

async fn refuse(mut stream: TcpStream, hostname: String, why: Refusal) {
    metrics::inc_label(names::SMTP_IN_SESSIONS_REFUSED, why.label());
    metrics::inc_label(names::SMTP_IN_RESPONSE_CODE_COUNT, "421");
    let msg = format!("421 4.7.0 {hostname} Too many connections, try again later\r\n");
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(msg.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_globally_and_per_client() {
        let s = Sessions::new(Caps {
            total: 3,
            per_client: 2,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = s.admit(a).unwrap();
        let _s2 = s.admit(a).unwrap();
        assert_eq!(s.admit(a).err(), Some(Refusal::PerClient));
        let _s3 = s.admit(b).unwrap();
        assert_eq!(s.admit(b).err(), Some(Refusal::Total));
        drop(s1);
        let _s4 = s.admit(a).unwrap();
    }

    #[test]
    fn ipv6_clients_count_by_64() {
        let x: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(x), client_key(y));
        assert_ne!(client_key(x), client_key(z));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let s = Sessions::new(Caps {
            total: 10,
            per_client: 1,
        });
        let _one = s.admit(x).unwrap();
        assert_eq!(s.admit(y).err(), Some(Refusal::PerClient));
        assert!(s.admit(z).is_ok());
    }
}
