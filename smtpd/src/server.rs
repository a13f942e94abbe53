//! Listeners: accept connections, enforce the session caps, and give each
//! session its own task.
//!
//! Two caps (REFERENCE §2.1): all sessions together
//! (`[tambo] max_sessions`), and sessions from one client
//! (`[tambo] max_sessions_per_client`; an IPv4 address, or an IPv6 /64,
//! which is what one subscriber usually gets). A client over either gets
//! `421 4.7.0` and is closed before anything is read from it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use tambo_common::address::client_key;
use tambo_proto::metrics::{self, names};

use crate::session::{self, SessionConfig};

/// The two session caps.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: u32,
    pub per_client: u32,
}

/// Live sessions, counted globally and per client.
#[derive(Debug)]
pub struct Sessions {
    caps: Caps,
    inner: Mutex<Counts>,
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
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.sessions.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.client);
            }
        }
    }
}

impl Sessions {
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            inner: Mutex::default(),
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
        let n = c.per_client.entry(key).or_insert(0);
        if *n >= self.caps.per_client {
            return Err(Refusal::PerClient);
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            sessions: self.clone(),
            client: key,
        })
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
                let _ = stream.set_nodelay(true);
                match sessions.admit(peer.ip()) {
                    Ok(slot) => {
                        let cfg = cfg.clone();
                        tokio::spawn(async move {
                            session::serve(stream, peer, cfg).await;
                            drop(slot);
                        });
                    }
                    Err(why) => {
                        if sessions.should_log() {
                            tracing::info!(%peer, "refusing a session: {} reached", why.label());
                        }
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
