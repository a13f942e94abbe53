//! Hands delivery jobs to deliverd, by its pull (DESIGN §2).
//!
//! Send loops put jobs into one channel; each deliverd connection takes at
//! most as many as it said it has slots for, sends each with a read-only
//! descriptor of the message, and routes the results back. If the
//! connection drops, its jobs in flight end as temporary failures, so they
//! are retried; no job waits on a dead deliverd.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, oneshot};

use tambo_proto::deliver::{FromDeliverd, Job, Outcome, ToDeliverd};
use tambo_proto::frame::{encode, read_frame};
use tambo_proto::metrics::{self, names};
use tambo_proto::{Role, fd, hello};

/// A job waiting for a deliverd slot.
pub struct PendingJob {
    pub job: Job,
    pub body: PathBuf,
    pub reply: oneshot::Sender<Outcome>,
}

pub struct Dispatcher {
    tx: mpsc::UnboundedSender<PendingJob>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<PendingJob>>,
}

impl Default for Dispatcher {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

impl Dispatcher {
    /// Queues a job; the receiver gets its outcome once deliverd reports.
    pub fn submit(&self, job: Job, body: PathBuf) -> oneshot::Receiver<Outcome> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(p)) = self.tx.send(PendingJob { job, body, reply }) {
            let _ = p.reply.send(Outcome::TempFail("dispatcher closed".into()));
        }
        rx
    }
}

type InFlight = Arc<Mutex<HashMap<u64, oneshot::Sender<Outcome>>>>;

/// Serves one deliverd connection until it closes.
pub async fn serve(dispatcher: Arc<Dispatcher>, mut stream: UnixStream) {
    let peer = match hello::accept(&mut stream, Role::Queued, &[Role::Deliverd]).await {
        Ok(p) => p,
        Err(e) => {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!("deliver.sock: refused a connection: {e}");
            return;
        }
    };
    tracing::info!(uid = peer.uid, pid = ?peer.pid, "deliver.sock: deliverd connected");
    let (r, w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let slots = match read_frame::<_, FromDeliverd>(&mut reader).await {
        Ok(Some(FromDeliverd::Ready { slots })) => slots.clamp(1, 1024) as usize,
        other => {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!("deliver.sock: expected Ready first, got {other:?}; closing");
            return;
        }
    };
    let in_flight: InFlight = Arc::default();
    let sem = Arc::new(Semaphore::new(slots));
    let mut results = tokio::spawn(read_results(reader, in_flight.clone(), sem.clone()));
    let mut next_job = 0u64;
    loop {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut results => break,
        };
        let pending = {
            let mut rx = dispatcher.rx.lock().await;
            tokio::select! {
                j = rx.recv() => j,
                _ = &mut results => None,
            }
        };
        let Some(mut pending) = pending else { break };
        next_job += 1;
        pending.job.job = next_job;
        let file = match tokio::task::block_in_place(|| std::fs::File::open(&pending.body)) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(id = %pending.job.queue_id, "cannot open the message body {}: {e}", pending.body.display());
                let _ = pending.reply.send(Outcome::TempFail(format!(
                    "queue could not open the message: {e}"
                )));
                continue;
            }
        };
        let bytes = match encode(&ToDeliverd::Job(pending.job.clone())) {
            Ok(b) => b,
            Err(e) => {
                let _ = pending
                    .reply
                    .send(Outcome::PermFail(format!("job cannot be encoded: {e}")));
                continue;
            }
        };
        lock(&in_flight).insert(next_job, pending.reply);
        if let Err(e) = fd::send_with_fd(w.as_ref(), &bytes, file.as_fd()).await {
            tracing::warn!("deliver.sock: sending a job failed: {e}");
            if let Some(reply) = lock(&in_flight).remove(&next_job) {
                let _ = reply.send(Outcome::TempFail("connection to deliverd lost".into()));
            }
            break;
        }
        // The slot comes back when the result arrives.
        permit.forget();
    }
    results.abort();
    let lost: Vec<_> = lock(&in_flight).drain().collect();
    if !lost.is_empty() {
        tracing::warn!(
            "deliverd went away with {} jobs in flight; they will be retried",
            lost.len()
        );
    }
    for (_, reply) in lost {
        let _ = reply.send(Outcome::TempFail(
            "connection to deliverd lost during delivery".into(),
        ));
    }
    tracing::info!("deliver.sock: deliverd disconnected");
}

async fn read_results(
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    in_flight: InFlight,
    sem: Arc<Semaphore>,
) {
    loop {
        match read_frame::<_, FromDeliverd>(&mut reader).await {
            Ok(Some(FromDeliverd::Done { job, outcome })) => match lock(&in_flight).remove(&job) {
                Some(reply) => {
                    let _ = reply.send(outcome);
                    sem.add_permits(1);
                }
                None => {
                    metrics::inc_label(names::IPC_ERRORS, "queued");
                    tracing::warn!("deliver.sock: result for unknown job {job}; closing");
                    return;
                }
            },
            Ok(Some(FromDeliverd::Ready { .. })) => {
                metrics::inc_label(names::IPC_ERRORS, "queued");
                tracing::warn!("deliver.sock: unexpected message Ready; closing");
                return;
            }
            Ok(None) => return,
            Err(e) => {
                metrics::inc_label(names::IPC_ERRORS, "queued");
                tracing::warn!("deliver.sock: {e}; closing");
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
