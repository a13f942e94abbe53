//! monitor.sock: one connection per process, which registers and then
//! pushes counter increases (an empty batch is a heartbeat).
//!
//! monitor.sock may be open to every local user (mode 0666 when the group
//! `tambo` does not exist), so a connection whose uid (SO_PEERCRED) could
//! play none of the pushing roles is closed as soon as it is accepted,
//! before it takes one of the connection slots or gets a hello timeout:
//! strangers cannot crowd out the daemons. Those refusals, and the ones
//! over the cap or at the hello, are counted each but logged at most once
//! a second per kind ([`LogLimiter`]).
//!
//! Every other peer is still treated as possibly hostile: at most
//! [`MAX_MONITOR_CONNECTIONS`] at once, frames of at most
//! [`MAX_REGISTER_FRAME`] then [`MAX_MONITOR_FRAME`] bytes and
//! [`MAX_DELTAS_PER_FRAME`] deltas, and silence for the idle timeout
//! ([`MONITOR_IDLE_TIMEOUT`]) closes the connection. Anything else out of
//! place closes that connection only, with one log line, counted in
//! `tambo/ipc/errors` (`monitord`) or `tambo/ipc/refused` (`monitor…`).
//! After the hello, monitord writes only profile requests (`/debug/pprof`),
//! one at a time; a profile frame (up to
//! [`tambo_proto::monitor::MAX_PROFILE`]) is read only
//! while one is awaited, and one nobody asked for closes the connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use tambo_proto::frame::{FrameReader, write_frame};
use tambo_proto::identity::Identities;
use tambo_proto::metrics::names;
use tambo_proto::monitor::{
    MAX_DELTAS_PER_FRAME, MAX_MONITOR_CONNECTIONS, MAX_MONITOR_FRAME, MAX_REGISTER_FRAME,
    MONITOR_IDLE_TIMEOUT, MonitorMessage, ProfileRequest,
};
use tambo_proto::{Error, Role, hello};

use crate::collector::{Budget, Shared, lock};
use crate::text::escape;
use tambo_common::loglimit::{LogLimiter, skipped};

/// The roles that push counters to monitord.
const PUSHERS: [Role; 4] = [Role::Smtpd, Role::Queued, Role::Deliverd, Role::Ctl];

/// What every monitor.sock connection shares.
pub struct Listener {
    totals: Shared,
    ids: Identities,
    connections: Arc<Semaphore>,
    idle_timeout: Duration,
    /// One per kind of refusal, so a flood of one kind (strangers) does
    /// not hide the first line of another.
    strangers_log: LogLimiter,
    over_cap_log: LogLimiter,
    hello_log: LogLimiter,
}

impl Listener {
    /// `idle_timeout` replaces [`MONITOR_IDLE_TIMEOUT`] (a test knob).
    pub fn new(totals: Shared, ids: Identities, idle_timeout: Option<Duration>) -> Self {
        Listener {
            totals,
            ids,
            connections: Arc::new(Semaphore::new(MAX_MONITOR_CONNECTIONS)),
            idle_timeout: idle_timeout.unwrap_or(MONITOR_IDLE_TIMEOUT),
            strangers_log: LogLimiter::new(),
            over_cap_log: LogLimiter::new(),
            hello_log: LogLimiter::new(),
        }
    }
}

/// Serves one process's connection until it closes. A peer whose uid
/// may push nothing, and any connection over the cap, is closed at once,
/// before anything is read.
pub async fn serve(l: Arc<Listener>, mut stream: UnixStream) {
    // Before the permit: a stranger must not hold a slot, even for the
    // hello timeout.
    let stranger = match stream.peer_cred() {
        Ok(c) if l.ids.allows_any(&PUSHERS, c.uid()) => None,
        Ok(c) => Some(format!(
            "uid {} (pid {}) may play none of {}",
            c.uid(),
            c.pid().map_or_else(|| "unknown".into(), |p| p.to_string()),
            PUSHERS.map(Role::name).join(", ")
        )),
        Err(e) => Some(format!("no peer credentials: {e}")),
    };
    if let Some(why) = stranger {
        lock(&l.totals).count(names::IPC_REFUSED, Some("monitor"));
        if let Some(n) = l.strangers_log.allow() {
            tracing::warn!(
                "monitor.sock: refused a connection at once: {why}{}",
                skipped(n)
            );
        }
        return;
    }
    let Ok(_permit) = l.connections.clone().try_acquire_owned() else {
        lock(&l.totals).count(names::IPC_REFUSED, Some("monitor:max_connections"));
        if let Some(n) = l.over_cap_log.allow() {
            tracing::warn!(
                "monitor.sock: refusing a connection: {MAX_MONITOR_CONNECTIONS} already open{}",
                skipped(n)
            );
        }
        return;
    };
    let peer = match hello::accept(&mut stream, Role::Monitord, &PUSHERS, &l.ids).await {
        Ok(p) => p,
        Err(e) => {
            lock(&l.totals).count(names::IPC_REFUSED, Some("monitor"));
            if let Some(n) = l.hello_log.allow() {
                tracing::warn!(
                    "monitor.sock: refused a connection: {}{}",
                    escape(&e.to_string()),
                    skipped(n)
                );
            }
            return;
        }
    };
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r);
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
            instance,
            config,
        }))) if role == peer.role => {
            tracing::info!(
                uid = peer.uid,
                pid,
                "monitor.sock: {} registered (version {})",
                role.name(),
                escape(&version)
            );
            let mut t = lock(&l.totals);
            let first = t.first_time(role, instance);
            let id = t.register(role, pid, version, flags, config);
            let (tx, asks) = tokio::sync::mpsc::channel(1);
            t.set_profiler(id, tx);
            (id, first, pid, asks)
        }
        other => {
            let why = match other {
                Err(_) => Error::Idle(hello::HELLO_TIMEOUT),
                Ok(Err(e)) => e,
                Ok(Ok(None)) => return,
                Ok(Ok(Some(MonitorMessage::Register { .. }))) => {
                    Error::Unexpected("Register with another role than the hello's")
                }
                Ok(Ok(Some(_))) => Error::Unexpected("not a Register"),
            };
            lock(&l.totals).count(names::IPC_ERRORS, Some("monitord"));
            tracing::warn!(
                uid = peer.uid,
                pid = ?peer.pid,
                "monitor.sock: expected a registration from {}: {}; closing",
                peer.role.name(),
                escape(&why.to_string())
            );
            return;
        }
    };
    let (id, first, pid, mut asks) = id;
    // The profile asked of this process and not answered yet: at most one.
    let mut pending: Option<(u64, crate::pprof::Reply)> = None;
    // One the HTTP client gave up on: its late answer is dropped quietly.
    let mut abandoned: Option<u64> = None;
    let mut asked = 0u64;
    let mut budget = Budget::new(peer.role);
    // The baseline comes first; once anything else came, none is taken.
    let mut baseline_open = true;
    let result: Result<(), Error> = async {
        loop {
            // Room for a profile only while one is awaited.
            let max = if pending.is_some() {
                tambo_proto::frame::MAX_FRAME
            } else {
                MAX_MONITOR_FRAME
            };
            // In this order: a frame, a given-up ask, then a new ask (so
            // an ask made right after another was given up is taken).
            let msg = tokio::select! {
                biased;
                // FrameReader::read keeps what it read when dropped.
                r = tokio::time::timeout(l.idle_timeout, reader.read(max)) => match r {
                    Err(_) => return Err(Error::Idle(l.idle_timeout)),
                    Ok(r) => match r? {
                        Some(m) => m,
                        None => return Ok(()),
                    },
                },
                // The HTTP client gave up (it timed out, or went away): the
                // next ask may go, and the process says busy if it must.
                () = async {
                    match pending.as_mut() {
                        Some((_, reply)) => reply.closed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    abandoned = pending.take().map(|(id, _)| id);
                    continue;
                }
                Some((kind, reply)) = asks.recv() => {
                    if pending.is_some() {
                        let _ = reply.send(Err(
                            "a profile of this process is being taken; try again when it is done"
                                .into(),
                        ));
                        continue;
                    }
                    asked += 1;
                    let req = ProfileRequest { id: asked, kind };
                    tokio::time::timeout(Duration::from_secs(2), write_frame(&mut w, &req))
                        .await
                        .map_err(|_| Error::Io(std::io::ErrorKind::TimedOut.into()))??;
                    pending = Some((asked, reply));
                    continue;
                }
            };
            match msg {
                MonitorMessage::Profile { id, .. } if abandoned == Some(id) => abandoned = None,
                MonitorMessage::Profile { id, result } => match pending.take() {
                    Some((want, reply)) if want == id => {
                        // The HTTP client may have given up: nobody to tell.
                        let _ = reply.send(result);
                    }
                    _ => return Err(Error::Unexpected("a profile monitord did not ask for")),
                },
                MonitorMessage::Baseline(deltas) if deltas.len() <= MAX_DELTAS_PER_FRAME => {
                    if !baseline_open {
                        return Err(Error::Unexpected("Baseline after other messages"));
                    }
                    // A reconnection to this monitord: counted already.
                    if first {
                        let mut t = lock(&l.totals);
                        for d in &deltas {
                            t.apply(&mut budget, d);
                        }
                    }
                    continue;
                }
                MonitorMessage::Baseline(_) => {
                    return Err(Error::Unexpected("Baseline over MAX_DELTAS_PER_FRAME"));
                }
                MonitorMessage::Traces(traces)
                    if traces.len() <= tambo_proto::trace::MAX_PER_FRAME =>
                {
                    let mut t = lock(&l.totals);
                    for rec in traces {
                        if !t.traces.add(peer.role, pid, rec) {
                            t.count(names::MONITORD_DROPPED_DELTAS, Some("traces"));
                        }
                    }
                }
                MonitorMessage::Traces(_) => {
                    return Err(Error::Unexpected("Traces over MAX_PER_FRAME"));
                }
                MonitorMessage::Active(traces)
                    if traces.len() <= tambo_proto::trace::MAX_ACTIVE =>
                {
                    let mut t = lock(&l.totals);
                    if !t.set_active(id, traces) {
                        t.count(names::MONITORD_DROPPED_DELTAS, Some("traces"));
                    }
                }
                MonitorMessage::Active(_) => {
                    return Err(Error::Unexpected("Active over MAX_ACTIVE"));
                }
                MonitorMessage::State(text) => {
                    if text.len() > tambo_proto::monitor::MAX_STATE {
                        return Err(Error::Unexpected("a state over MAX_STATE"));
                    }
                    lock(&l.totals).set_state(id, text);
                }
                MonitorMessage::Queue(text) => {
                    if peer.role != Role::Queued {
                        return Err(Error::Unexpected("a queue snapshot not from queued"));
                    }
                    // Frames may be larger while a profile is awaited.
                    if text.len() > tambo_proto::monitor::MAX_QUEUE_SNAPSHOT {
                        return Err(Error::Unexpected(
                            "a queue snapshot over MAX_QUEUE_SNAPSHOT",
                        ));
                    }
                    lock(&l.totals).queue = Some(text);
                }
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
            baseline_open = false;
        }
    }
    .await;
    let mut t = lock(&l.totals);
    if let Err(e) = result {
        t.count(names::IPC_ERRORS, Some("monitord"));
        tracing::warn!(
            uid = peer.uid,
            pid = ?peer.pid,
            "monitor.sock: {}; closing connection from {}",
            escape(&e.to_string()),
            peer.role.name()
        );
    }
    t.unregister(id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::Totals;
    use std::sync::Mutex;
    use tambo_proto::frame::{read_frame, write_frame};
    use tambo_proto::hello::Hello;
    use tambo_proto::identity::Account;
    use tambo_proto::monitor::ProfileKind;
    use tokio::io::AsyncReadExt;

    fn listener(ids: Identities) -> (Arc<Listener>, Shared) {
        let totals: Shared = Arc::new(Mutex::new(Totals::new()));
        (Arc::new(Listener::new(totals.clone(), ids, None)), totals)
    }

    /// Every role runs as another user, and root is no one: this process
    /// (root or not) is a stranger.
    fn others() -> Identities {
        Identities::development(Account {
            uid: 4_000_000,
            gid: 4_000_000,
        })
        .without_root_exception()
    }

    fn me() -> Identities {
        Identities::development(Account {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        })
    }

    #[tokio::test]
    async fn strangers_are_closed_at_once_and_take_no_slot() {
        let (l, totals) = listener(others());
        // Twice the cap, all open at once, none saying a word.
        let mut clients = Vec::new();
        for _ in 0..2 * MAX_MONITOR_CONNECTIONS {
            let (ours, theirs) = UnixStream::pair().unwrap();
            tokio::spawn(serve(l.clone(), ours));
            clients.push(theirs);
        }
        // Each is closed well before the hello timeout would close it.
        tokio::time::timeout(hello::HELLO_TIMEOUT / 2, async {
            for c in &mut clients {
                let mut b = [0u8; 1];
                assert_eq!(c.read(&mut b).await.unwrap(), 0);
            }
        })
        .await
        .expect("strangers held their connections");
        assert_eq!(l.connections.available_permits(), MAX_MONITOR_CONNECTIONS);
        let t = lock(&totals);
        let refused = &t.maps[names::IPC_REFUSED];
        assert_eq!(
            refused.get("monitor"),
            Some(&(2 * MAX_MONITOR_CONNECTIONS as u64))
        );
        assert_eq!(refused.get("monitor:max_connections"), None, "{refused:?}");
    }

    #[tokio::test]
    async fn a_pusher_passes_the_check() {
        let (l, totals) = listener(me());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        tokio::spawn(serve(l.clone(), ours));
        write_frame(
            &mut theirs,
            &Hello {
                protocol_version: tambo_proto::PROTOCOL_VERSION,
                role: Role::Smtpd,
            },
        )
        .await
        .unwrap();
        let answer: Option<Hello> = read_frame(&mut theirs).await.unwrap();
        assert_eq!(answer.map(|h| h.role), Some(Role::Monitord));
        assert_eq!(
            l.connections.available_permits(),
            MAX_MONITOR_CONNECTIONS - 1
        );
        assert!(lock(&totals).maps[names::IPC_REFUSED].is_empty());
    }

    /// Connects as smtpd and registers; the client's end.
    async fn registered(l: &Arc<Listener>) -> UnixStream {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        tokio::spawn(serve(l.clone(), ours));
        write_frame(
            &mut theirs,
            &Hello {
                protocol_version: tambo_proto::PROTOCOL_VERSION,
                role: Role::Smtpd,
            },
        )
        .await
        .unwrap();
        let _: Option<Hello> = read_frame(&mut theirs).await.unwrap();
        write_frame(
            &mut theirs,
            &MonitorMessage::Register {
                role: Role::Smtpd,
                pid: 42,
                version: "v".into(),
                flags: vec![],
                instance: 1,
                config: String::new(),
            },
        )
        .await
        .unwrap();
        theirs
    }

    /// The process's profiler channel, once registered.
    async fn profiler(totals: &Shared) -> tokio::sync::mpsc::Sender<crate::pprof::Ask> {
        for _ in 0..500 {
            if let Some(tx) = lock(totals)
                .processes
                .iter()
                .find_map(|p| p.profiler.clone())
            {
                return tx;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never registered");
    }

    #[tokio::test]
    async fn a_profile_asked_is_answered_and_a_second_refused_meanwhile() {
        let (l, totals) = listener(me());
        let mut client = registered(&l).await;
        let tx = profiler(&totals).await;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send((ProfileKind::Heap, reply)).await.unwrap();
        let req: Option<ProfileRequest> = read_frame(&mut client).await.unwrap();
        let req = req.unwrap();
        assert_eq!(req.kind, ProfileKind::Heap);
        // Another while that one is out: refused at once.
        let (reply2, answer2) = tokio::sync::oneshot::channel();
        tx.send((ProfileKind::Cpu { seconds: 1 }, reply2))
            .await
            .unwrap();
        assert!(answer2.await.unwrap().unwrap_err().contains("being taken"));
        // A profile larger than any other frame is read, as it was asked.
        let big = vec![7u8; 2 * MAX_MONITOR_FRAME];
        write_frame(
            &mut client,
            &MonitorMessage::Profile {
                id: req.id,
                result: Ok(big.clone()),
            },
        )
        .await
        .unwrap();
        assert_eq!(answer.await.unwrap().unwrap(), big);
    }

    #[tokio::test]
    async fn a_profile_nobody_asked_for_closes_the_connection() {
        for id in [0, 1] {
            let (l, totals) = listener(me());
            let mut client = registered(&l).await;
            let tx = profiler(&totals).await;
            if id == 1 {
                // Asked, but answered under another id.
                let (reply, _answer) = tokio::sync::oneshot::channel();
                tx.send((ProfileKind::Heap, reply)).await.unwrap();
                let req: Option<ProfileRequest> = read_frame(&mut client).await.unwrap();
                assert_eq!(req.unwrap().id, 1);
            }
            let _ = write_frame(
                &mut client,
                &MonitorMessage::Profile {
                    id: 7,
                    result: Ok(vec![1]),
                },
            )
            .await;
            let mut b = [0u8; 1];
            assert_eq!(client.read(&mut b).await.unwrap(), 0, "id {id}");
            assert_eq!(
                lock(&totals).maps[names::IPC_ERRORS].get("monitord"),
                Some(&1)
            );
        }
    }

    #[tokio::test]
    async fn an_abandoned_profile_frees_the_process_and_its_late_answer_is_dropped() {
        let (l, totals) = listener(me());
        let mut client = registered(&l).await;
        let tx = profiler(&totals).await;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send((ProfileKind::Cpu { seconds: 30 }, reply))
            .await
            .unwrap();
        let first: ProfileRequest = read_frame(&mut client).await.unwrap().unwrap();
        // The HTTP client gives up.
        drop(answer);
        // The next ask goes through to the process.
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send((ProfileKind::Heap, reply)).await.unwrap();
        let second: ProfileRequest = read_frame(&mut client).await.unwrap().unwrap();
        assert_ne!(first.id, second.id);
        // The late answer to the first is dropped, the second delivered.
        for (id, result) in [(first.id, Ok(vec![1])), (second.id, Ok(vec![2]))] {
            write_frame(&mut client, &MonitorMessage::Profile { id, result })
                .await
                .unwrap();
        }
        assert_eq!(answer.await.unwrap().unwrap(), vec![2]);
        assert!(lock(&totals).maps[names::IPC_ERRORS].is_empty());
    }
}
