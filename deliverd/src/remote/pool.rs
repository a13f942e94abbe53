//! Open connections kept after a delivery, for the next message to the
//! same destination (REFERENCE §4.5; `smtp_connection_cache_time`).
//!
//! A connection is kept only when its last transaction went through and
//! nothing the server sent is left unread, for a short time, and at most
//! [`MAX_IDLE`] of them in all. A job takes only the connection to the
//! host whose turn it is (the MX order never bends to the pool), and
//! checks it again before use. Each is filed
//! under its destination (a domain's MX set, or a `via` list) and the host
//! it is connected to, and keeps the security level it was opened with:
//! a job takes one only if that level passes the job's own checks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tambo_proto::deliver::SecLevel;

use super::session::Session;

/// Most idle connections, all destinations together.
pub const MAX_IDLE: usize = 64;

pub struct Pool {
    /// How long a connection stays idle; zero: none is kept.
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// Oldest first.
    idle: VecDeque<Idle>,
}

struct Idle {
    id: u64,
    dest: String,
    host: String,
    session: Session,
}

impl Pool {
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Pool {
            ttl,
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hosts of `dest` with an idle connection whose level `fits`.
    pub fn hosts(&self, dest: &str, fits: impl Fn(SecLevel) -> bool) -> Vec<String> {
        let inner = self.lock();
        inner
            .idle
            .iter()
            .filter(|i| i.dest == dest && fits(i.session.level))
            .map(|i| i.host.clone())
            .collect()
    }

    /// The most recently parked connection to `host` for `dest` whose
    /// level `fits`.
    pub fn take(&self, dest: &str, host: &str, fits: impl Fn(SecLevel) -> bool) -> Option<Session> {
        let mut inner = self.lock();
        let pos = inner
            .idle
            .iter()
            .rposition(|i| i.dest == dest && i.host == host && fits(i.session.level))?;
        inner.idle.remove(pos).map(|i| i.session)
    }

    /// Parks `session`; it gets QUIT when its time is up, or when room is
    /// needed for a newer one.
    pub fn put(self: &Arc<Self>, dest: &str, host: &str, session: Session) {
        if self.ttl.is_zero() {
            tokio::spawn(session.conn.quit());
            return;
        }
        let id = {
            let mut inner = self.lock();
            while inner.idle.len() >= MAX_IDLE {
                if let Some(old) = inner.idle.pop_front() {
                    tokio::spawn(old.session.conn.quit());
                }
            }
            let id = inner.next_id;
            inner.next_id += 1;
            inner.idle.push_back(Idle {
                id,
                dest: dest.to_string(),
                host: host.to_string(),
                session,
            });
            id
        };
        let pool = Arc::downgrade(self);
        let ttl = self.ttl;
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let Some(pool) = pool.upgrade() else { return };
            let expired = {
                let mut inner = pool.lock();
                let pos = inner.idle.iter().position(|i| i.id == id);
                pos.and_then(|p| inner.idle.remove(p))
            };
            if let Some(i) = expired {
                i.session.conn.quit().await;
            }
        });
    }
}
