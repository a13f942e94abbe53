//! monitor.sock: one connection per process, which registers and then
//! pushes counter increases (an empty batch is a heartbeat).
//!
//! Every peer is treated as possibly hostile: at most
//! [`MAX_MONITOR_CONNECTIONS`] at once, frames of at most
//! [`MAX_REGISTER_FRAME`] then [`MAX_MONITOR_FRAME`] bytes and
//! [`MAX_DELTAS_PER_FRAME`] deltas, and silence for the idle timeout
//! ([`MONITOR_IDLE_TIMEOUT`]) closes the connection. Anything else out of
//! place closes that connection only, with one log line, counted in
//! `tambo/ipc/errors` (`monitord`) or `tambo/ipc/refused` (`monitor…`).
//! Nothing is ever written back after the hello.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use tambo_proto::frame::FrameReader;
use tambo_proto::identity::Identities;
use tambo_proto::metrics::names;
use tambo_proto::monitor::{
    MAX_DELTAS_PER_FRAME, MAX_MONITOR_CONNECTIONS, MAX_MONITOR_FRAME, MAX_REGISTER_FRAME,
    MONITOR_IDLE_TIMEOUT, MonitorMessage,
};
use tambo_proto::{Error, Role, hello};

use crate::collector::{Budget, Shared, lock};

/// What every monitor.sock connection shares.
pub struct Listener {
    totals: Shared,
    ids: Identities,
    connections: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl Listener {
    /// `idle_timeout` replaces [`MONITOR_IDLE_TIMEOUT`] (a test knob).
    pub fn new(totals: Shared, ids: Identities, idle_timeout: Option<Duration>) -> Self {
        Listener {
            totals,
            ids,
            connections: Arc::new(Semaphore::new(MAX_MONITOR_CONNECTIONS)),
            idle_timeout: idle_timeout.unwrap_or(MONITOR_IDLE_TIMEOUT),
        }
    }
}

/// Serves one process's connection until it closes. Over the connection
/// cap, the connection is closed at once, before anything is read.
pub async fn serve(l: Arc<Listener>, mut stream: UnixStream) {
    let Ok(_permit) = l.connections.clone().try_acquire_owned() else {
        lock(&l.totals).count(names::IPC_REFUSED, Some("monitor:max_connections"));
        log_refusal();
        return;
    };
    let peer = match hello::accept(
        &mut stream,
        Role::Monitord,
        &[Role::Smtpd, Role::Queued, Role::Deliverd, Role::Ctl],
        &l.ids,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            lock(&l.totals).count(names::IPC_REFUSED, Some("monitor"));
            tracing::warn!("monitor.sock: refused a connection: {e}");
            return;
        }
    };
    let mut reader = FrameReader::new(stream);
    // The pusher sends its registration right after the hello.
    let first = tokio::time::timeout(
        hello::HELLO_TIMEOUT,
        reader.read::<MonitorMessage>(MAX_REGISTER_FRAME),
    )
    .await;
    let id = match first {
        Ok(Ok(Some(MonitorMessage::Register {
            role,
            pid,
            version,
            flags,
        }))) if role == peer.role => {
            tracing::info!(
                uid = peer.uid,
                pid,
                "monitor.sock: {} registered (version {})",
                role.name(),
                version.escape_debug()
            );
            lock(&l.totals).register(role, pid, version, flags)
        }
        other => {
            let why = match other {
                Err(_) => Error::Idle(hello::HELLO_TIMEOUT),
                Ok(Err(e)) => e,
                Ok(Ok(None)) => return,
                Ok(Ok(Some(MonitorMessage::Register { .. }))) => {
                    Error::Unexpected("Register with another role than the hello's")
                }
                Ok(Ok(Some(MonitorMessage::Deltas(_)))) => Error::Unexpected("Deltas"),
            };
            lock(&l.totals).count(names::IPC_ERRORS, Some("monitord"));
            tracing::warn!(
                uid = peer.uid,
                pid = ?peer.pid,
                "monitor.sock: expected a registration from {}: {why}; closing",
                peer.role.name()
            );
            return;
        }
    };
    let mut budget = Budget::new(peer.role);
    let result: Result<(), Error> = async {
        loop {
            let msg =
                match tokio::time::timeout(l.idle_timeout, reader.read(MAX_MONITOR_FRAME)).await {
                    Err(_) => return Err(Error::Idle(l.idle_timeout)),
                    Ok(r) => match r? {
                        Some(m) => m,
                        None => return Ok(()),
                    },
                };
            match msg {
                MonitorMessage::Deltas(deltas) if deltas.len() <= MAX_DELTAS_PER_FRAME => {
                    let mut t = lock(&l.totals);
                    for d in &deltas {
                        t.apply(&mut budget, d);
                    }
                }
                MonitorMessage::Deltas(_) => {
                    return Err(Error::Unexpected("Deltas over MAX_DELTAS_PER_FRAME"));
                }
                MonitorMessage::Register { .. } => {
                    return Err(Error::Unexpected("second Register"));
                }
            }
        }
    }
    .await;
    let mut t = lock(&l.totals);
    if let Err(e) = result {
        t.count(names::IPC_ERRORS, Some("monitord"));
        tracing::warn!(
            uid = peer.uid,
            pid = ?peer.pid,
            "monitor.sock: {e}; closing connection from {}",
            peer.role.name()
        );
    }
    t.unregister(id);
}

/// Logs a refusal over the cap at most once a second, so a flood does not
/// flood the log too.
fn log_refusal() {
    use std::sync::Mutex;
    use std::time::Instant;
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        *last = Some(Instant::now());
        tracing::warn!(
            "monitor.sock: refusing a connection: {MAX_MONITOR_CONNECTIONS} already open"
        );
    }
}
