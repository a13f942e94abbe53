//! One hook connection from deliverd: calls out, outcomes back.
//!
//! As on the delivery connection, deliverd is trusted no further than it
//! must be: an outcome for a call never made, or of the wrong size, closes
//! the connection; a silent connection is closed at its idle timeout; if
//! it drops, its calls in flight fail (temporarily) at once.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, oneshot};

use tambo_proto::deliver::{
    FromDeliverd, HookCall, HookOutcome, MAX_HOOK_CALL_FRAME, MAX_HOOK_RESULT_FRAME, ToDeliverd,
};
use tambo_proto::frame::{FrameReader, encode};
use tambo_proto::metrics::{self, names};
use tambo_proto::{Error, fd};

use super::{HookError, Hooks, Pending};

/// How long sending one call may take before deliverd counts as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls deliverd is running: where each answer goes, and when it is
/// overdue.
type Waiting = Mutex<HashMap<u64, (oneshot::Sender<Result<HookOutcome, HookError>>, Instant)>>;

/// Past the time its caller gave up, how long deliverd has to answer a
/// call before the connection counts as broken: a call it never answers
/// would hold its slot for good.
const OVERDUE: Duration = Duration::from_secs(60);

/// Serves one hook connection (its `HookReady` already read) until it
/// closes.
pub async fn serve(
    hooks: Arc<Hooks>,
    reader: FrameReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
    slots: usize,
    idle: Duration,
) {
    hooks.connected();
    tracing::info!("deliver.sock: deliverd's hook connection is up ({slots} at once)");
    let waiting: Arc<Waiting> = Arc::default();
    let free = Arc::new(Semaphore::new(slots));
    let mut results = tokio::spawn(read_outcomes(reader, waiting.clone(), free.clone(), idle));
    let mut next = 0u64;
    loop {
        let permit = tokio::select! {
            p = free.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut results => break,
        };
        let pending = {
            let mut rx = hooks.rx.lock().await;
            tokio::select! {
                p = rx.recv() => p,
                _ = &mut results => None,
            }
        };
        let Some(Pending {
            hook,
            body,
            reply,
            limit,
        }) = pending
        else {
            break;
        };
        // Its caller gave up (timed out, or the client left): running the
        // hook now would only take a slot, and could have effects (a
        // greylisting entry) for a transaction that is over.
        if reply.is_closed() {
            continue;
        }
        next += 1;
        let name = super::Name::of(&hook).file();
        let file = match &body {
            None => None,
            Some(path) => match tokio::task::block_in_place(|| std::fs::File::open(path)) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::error!("cannot open {} for the post-data hook: {e}", path.display());
                    let _ = reply.send(Err(HookError::Lost(name)));
                    continue;
                }
            },
        };
        let bytes = match encode(&ToDeliverd::Hook(HookCall { call: next, hook })) {
            Ok(b) if b.len() - 4 <= MAX_HOOK_CALL_FRAME => b,
            _ => {
                tracing::error!("a hook call does not fit its frame limit; refusing it");
                let _ = reply.send(Err(HookError::TooLarge(name)));
                continue;
            }
        };
        waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(next, (reply, Instant::now() + limit + OVERDUE));
        let sent = match &file {
            Some(f) => {
                tokio::time::timeout(
                    SEND_TIMEOUT,
                    fd::send_with_fd(w.as_ref(), &bytes, f.as_fd()),
                )
                .await
            }
            None => tokio::time::timeout(SEND_TIMEOUT, w.write_all(&bytes)).await,
        };
        if !matches!(sent, Ok(Ok(()))) {
            tracing::warn!("deliver.sock: sending a hook call failed or timed out; closing");
            break;
        }
        // The slot comes back with the outcome.
        permit.forget();
    }
    results.abort();
    let lost: Vec<_> = waiting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .collect();
    if !lost.is_empty() {
        tracing::warn!(
            "deliverd's hook connection went away with {} hooks running",
            lost.len()
        );
    }
    for (_, (reply, _)) in lost {
        let _ = reply.send(Err(HookError::Lost("any")));
    }
    hooks.disconnected().await;
    tracing::info!("deliver.sock: deliverd's hook connection closed");
}

async fn read_outcomes(
    mut reader: FrameReader<OwnedReadHalf>,
    waiting: Arc<Waiting>,
    free: Arc<Semaphore>,
    idle: Duration,
) {
    let mut check = tokio::time::interval(Duration::from_secs(10));
    loop {
        let read = tokio::time::timeout(idle, reader.read(MAX_HOOK_RESULT_FRAME));
        let msg = tokio::select! {
            r = read => match r {
                Err(_) => Err(Error::Idle(idle)),
                Ok(r) => r,
            },
            _ = check.tick() => {
                let now = Instant::now();
                let overdue = waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .any(|(_, at)| *at <= now);
                if overdue {
                    metrics::inc_label(names::IPC_ERRORS, "queued");
                    tracing::warn!("deliver.sock (hooks): a hook call got no answer long past its timeout; closing");
                    return;
                }
                continue;
            }
        };
        let result = match msg {
            Ok(Some(FromDeliverd::HookDone { call, outcome })) => {
                let reply = waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&call);
                match reply {
                    Some((r, _)) => {
                        let _ = r.send(Ok(outcome));
                        free.add_permits(1);
                        Ok(())
                    }
                    None => Err(Error::Unexpected("an outcome for a call never made")),
                }
            }
            Ok(Some(FromDeliverd::Heartbeat)) => Ok(()),
            Ok(Some(_)) => Err(Error::Unexpected("a delivery frame on the hook connection")),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!("deliver.sock (hooks): {e}; closing");
            return;
        }
    }
}
