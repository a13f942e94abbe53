//! Sums the counter increases every process pushes on monitor.sock.
//!
//! Counters only go up and are summed over all processes, so a process that
//! restarts simply keeps adding. The number of distinct keys is bounded, so
//! a misbehaving peer cannot make monitord grow without limit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::io::BufReader;
use tokio::net::UnixStream;

use tambo_proto::frame::read_frame;
use tambo_proto::identity::Identities;
use tambo_proto::metrics::{Kind, VARIABLES};
use tambo_proto::monitor::{Delta, MonitorMessage};
use tambo_proto::{Role, hello};

/// Most distinct (variable, label) pairs kept.
pub const MAX_KEYS: usize = 20_000;

/// A registered process.
#[derive(Debug, Clone)]
pub struct Process {
    pub role: Role,
    pub pid: u32,
    pub version: String,
    pub flags: Vec<(String, String)>,
    pub connected: bool,
}

#[derive(Debug, Default)]
pub struct Totals {
    pub counters: BTreeMap<String, u64>,
    pub maps: BTreeMap<String, BTreeMap<String, u64>>,
    pub processes: Vec<Process>,
    keys: usize,
    pub dropped: u64,
}

impl Totals {
    /// Every known variable starts at zero (or as an empty map), so
    /// dashboards see them before anything happens.
    pub fn new() -> Self {
        let mut t = Totals::default();
        for (name, kind, _) in VARIABLES {
            match kind {
                Kind::Counter => {
                    t.counters.insert(name.to_string(), 0);
                }
                Kind::Map => {
                    t.maps.insert(name.to_string(), BTreeMap::new());
                }
            }
        }
        t
    }

    pub fn apply(&mut self, d: &Delta) {
        match &d.label {
            None => {
                if let Some(v) = self.counters.get_mut(&d.var) {
                    *v = v.saturating_add(d.value);
                } else if self.keys < MAX_KEYS && !self.maps.contains_key(&d.var) {
                    self.keys += 1;
                    self.counters.insert(d.var.clone(), d.value);
                } else {
                    self.dropped += 1;
                }
            }
            Some(label) => {
                if self.counters.contains_key(&d.var) {
                    self.dropped += 1;
                    return;
                }
                let known = self.maps.contains_key(&d.var);
                if !known && self.keys >= MAX_KEYS {
                    self.dropped += 1;
                    return;
                }
                let map = self.maps.entry(d.var.clone()).or_default();
                if let Some(v) = map.get_mut(label) {
                    *v = v.saturating_add(d.value);
                } else if self.keys < MAX_KEYS {
                    self.keys += 1;
                    map.insert(label.clone(), d.value);
                } else {
                    self.dropped += 1;
                }
            }
        }
    }
}

pub type Shared = Arc<Mutex<Totals>>;

pub fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Totals> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one process's connection.
pub async fn serve(totals: Shared, mut stream: UnixStream, ids: Arc<Identities>) {
    let peer = match hello::accept(
        &mut stream,
        Role::Monitord,
        &[Role::Smtpd, Role::Queued, Role::Deliverd, Role::Ctl],
        &ids,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("monitor.sock: refused a connection: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut index = None;
    loop {
        match read_frame::<_, MonitorMessage>(&mut reader).await {
            Ok(Some(MonitorMessage::Register {
                role,
                pid,
                version,
                flags,
            })) if index.is_none() => {
                if role != peer.role {
                    tracing::warn!(
                        "monitor.sock: peer said {:?} in its hello but registers as {role:?}; closing",
                        peer.role
                    );
                    break;
                }
                tracing::info!(
                    uid = peer.uid,
                    pid,
                    "monitor.sock: {} registered (version {version})",
                    role.name()
                );
                let mut t = lock(&totals);
                t.processes.push(Process {
                    role,
                    pid,
                    version,
                    flags,
                    connected: true,
                });
                index = Some(t.processes.len() - 1);
            }
            Ok(Some(MonitorMessage::Deltas(deltas))) if index.is_some() => {
                let mut t = lock(&totals);
                for d in &deltas {
                    t.apply(d);
                }
            }
            Ok(Some(other)) => {
                let name = match other {
                    MonitorMessage::Register { .. } => "Register",
                    MonitorMessage::Deltas(_) => "Deltas",
                };
                tracing::warn!(
                    "monitor.sock: unexpected message {name} from {}; closing",
                    peer.role.name()
                );
                break;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(
                    "monitor.sock: {e}; closing connection from {}",
                    peer.role.name()
                );
                break;
            }
        }
    }
    if let Some(i) = index {
        let mut t = lock(&totals);
        if let Some(p) = t.processes.get_mut(i) {
            p.connected = false;
        }
        // Keep the list bounded across many restarts: forget old
        // disconnected entries beyond a few dozen.
        if t.processes.len() > 64 {
            t.processes.retain(|p| p.connected);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(var: &str, label: Option<&str>, value: u64) -> Delta {
        Delta {
            var: var.into(),
            label: label.map(String::from),
            value,
        }
    }

    #[test]
    fn sums_counters_and_maps() {
        let mut t = Totals::new();
        assert_eq!(t.counters["chasquid/queue/putCount"], 0);
        t.apply(&d("chasquid/queue/putCount", None, 2));
        t.apply(&d("chasquid/queue/putCount", None, 3));
        t.apply(&d("chasquid/smtpIn/commandCount", Some("EHLO"), 1));
        t.apply(&d("chasquid/smtpIn/commandCount", Some("EHLO"), 1));
        assert_eq!(t.counters["chasquid/queue/putCount"], 5);
        assert_eq!(t.maps["chasquid/smtpIn/commandCount"]["EHLO"], 2);
        // A label on a plain counter is refused, not mixed in.
        t.apply(&d("chasquid/queue/putCount", Some("x"), 1));
        assert_eq!(t.dropped, 1);
    }

    #[test]
    fn keys_are_bounded() {
        let mut t = Totals::new();
        for i in 0..MAX_KEYS + 5 {
            t.apply(&d("tambo/x", Some(&i.to_string()), 1));
        }
        assert_eq!(t.maps["tambo/x"].len(), MAX_KEYS);
        assert_eq!(t.dropped, 5);
    }
}
