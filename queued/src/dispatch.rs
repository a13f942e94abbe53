//! Hands delivery jobs to deliverd, by its pull (DESIGN §2).
//!
//! Send loops put jobs into one channel; each deliverd connection takes at
//! most as many as it said it has slots for, sends each with a read-only
//! descriptor of the message, and routes the results back. If the
//! connection drops, its jobs in flight end as temporary failures, so they
//! are retried; no job waits on a dead deliverd.
//!
//! Nothing deliverd says is trusted further than it must be: a job that
//! gets no result within [`JOB_DEADLINE`] fails temporarily (its slot stays
//! taken until a late result frees it, and a connection whose every slot
//! is taken that way is closed); failure texts are cut to
//! [`MAX_FAILURE_TEXT`] and cleaned of control characters; a silent
//! connection is closed after [`IDLE_TIMEOUT`].

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use tambo_common::loglimit::{LogLimiter, skipped};
use tambo_proto::deliver::{FromDeliverd, Job, MAX_RESULT_FRAME, Outcome, SecLevel, ToDeliverd};
use tambo_proto::frame::{FrameReader, MAX_SMALL_FRAME, encode};
use tambo_proto::identity::Identities;
use tambo_proto::metrics::{self, names};
use tambo_proto::{Error, Role, fd, hello};

/// Longest a job may go without a result. Local deliveries time out after
/// 30 s; remote ones try up to 5 MX hosts for 10 minutes each.
pub const JOB_DEADLINE: Duration = Duration::from_secs(60 * 60);

/// Longest failure text kept from deliverd (it reaches DSNs and logs).
pub use tambo_proto::deliver::MAX_FAILURE_TEXT;

/// A deliverd connection that sends nothing (not even its heartbeat) for
/// this long is closed.
pub use tambo_proto::deliver::IDLE_TIMEOUT;

/// Most deliver.sock connections at once (deliverd holds two, one for
/// deliveries and one for hooks; a restart may overlap the old ones
/// briefly).
pub const MAX_CONNECTIONS: usize = 4;

/// How long sending one job may take before deliverd counts as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// A job waiting for a deliverd slot.
pub struct PendingJob {
    pub job: Job,
    pub body: PathBuf,
    pub reply: oneshot::Sender<JobResult>,
}

/// What came of a job: one outcome per recipient, in the job's order, and
/// the security level deliverd saw (remote jobs).
#[derive(Debug, Clone, PartialEq)]
pub struct JobResult {
    pub outcomes: Vec<Outcome>,
    pub seen: Option<SecLevel>,
}

impl JobResult {
    /// The same temporary failure for each of `n` recipients.
    pub fn temp_fail(n: usize, text: &str) -> Self {
        Self {
            outcomes: vec![Outcome::TempFail(text.to_string()); n],
            seen: None,
        }
    }

    /// The same permanent failure for each of `n` recipients.
    pub fn perm_fail(n: usize, text: &str) -> Self {
        Self {
            outcomes: vec![Outcome::PermFail(text.to_string()); n],
            seen: None,
        }
    }
}

pub struct Dispatcher {
    tx: mpsc::UnboundedSender<PendingJob>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<PendingJob>>,
    connections: Arc<Semaphore>,
    deadline: Duration,
    idle_timeout: Duration,
    /// One per kind of refusal a peer can cause, so none floods the log.
    refused_stranger: LogLimiter,
    refused_full: LogLimiter,
    refused_hello: LogLimiter,
    /// Where a hook connection goes.
    pub hooks: Arc<crate::hooks::Hooks>,
}

impl Dispatcher {
    pub fn new(
        deadline: Option<Duration>,
        idle_timeout: Option<Duration>,
        hooks: Arc<crate::hooks::Hooks>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            deadline: deadline.unwrap_or(JOB_DEADLINE),
            idle_timeout: idle_timeout.unwrap_or(IDLE_TIMEOUT),
            refused_stranger: LogLimiter::new(),
            refused_full: LogLimiter::new(),
            refused_hello: LogLimiter::new(),
            hooks,
        }
    }

    /// Queues a job; the receiver gets its result once deliverd reports.
    pub fn submit(&self, job: Job, body: PathBuf) -> oneshot::Receiver<JobResult> {
        let (reply, rx) = oneshot::channel();
        // Results are read up to a size that assumes this bound
        // (MAX_RESULT_FRAME); the queue's rounds never exceed it.
        if job.to.is_empty() || job.to.len() > tambo_proto::deliver::MAX_RECIPIENTS_PER_JOB {
            tracing::error!(id = %job.queue_id, "internal error: a job of {} recipients", job.to.len());
            let _ = reply.send(JobResult::temp_fail(
                job.to.len(),
                "internal error: a delivery job of the wrong size",
            ));
            return rx;
        }
        if let Err(mpsc::error::SendError(p)) = self.tx.send(PendingJob { job, body, reply }) {
            let n = p.job.to.len();
            let _ = p.reply.send(JobResult::temp_fail(n, "dispatcher closed"));
        }
        rx
    }
}

/// A job handed to deliverd: where its result goes, and the timer of its
/// deadline (stopped when the result arrives, so timers never pile up).
struct InFlight {
    reply: oneshot::Sender<JobResult>,
    /// How many recipients the job has: the result must have as many
    /// outcomes.
    recipients: usize,
    deadline: Option<tokio::task::AbortHandle>,
}

/// The jobs of one connection.
#[derive(Default)]
struct Jobs {
    in_flight: HashMap<u64, InFlight>,
    /// Jobs past their deadline: already failed, their slots still taken
    /// until a late result arrives.
    expired: HashSet<u64>,
}

struct Conn {
    jobs: Mutex<Jobs>,
    slots: usize,
    free: Semaphore,
    /// Woken when the connection must close (every slot expired).
    close: Notify,
}

impl Conn {
    fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A result arrived: deliver it, and free the slot. Err if the job was
    /// never handed out, or the result does not have one outcome per
    /// recipient (the job then fails temporarily).
    fn finish(
        &self,
        job: u64,
        outcomes: Vec<Outcome>,
        seen: Option<SecLevel>,
    ) -> Result<(), Error> {
        let mut jobs = self.jobs();
        if let Some(f) = jobs.in_flight.remove(&job) {
            if let Some(t) = f.deadline {
                t.abort();
            }
            if outcomes.len() != f.recipients {
                let _ = f.reply.send(JobResult::temp_fail(
                    f.recipients,
                    "deliverd reported a result of the wrong shape",
                ));
                self.free.add_permits(1);
                return Err(Error::Unexpected(
                    "a result with the wrong number of outcomes",
                ));
            }
            let _ = f.reply.send(JobResult {
                outcomes: outcomes.into_iter().map(clean).collect(),
                seen,
            });
        } else if jobs.expired.remove(&job) {
            tracing::warn!(
                "deliver.sock: late result for job {job} ignored (already failed at its deadline)"
            );
        } else {
            return Err(Error::Unexpected("result for a job never handed out"));
        }
        self.free.add_permits(1);
        Ok(())
    }

    /// A job's deadline passed without a result.
    fn expire(&self, job: u64, deadline: Duration) {
        let mut jobs = self.jobs();
        let Some(f) = jobs.in_flight.remove(&job) else {
            return;
        };
        metrics::inc(names::QUEUE_JOBS_EXPIRED);
        tracing::warn!(
            "deliver.sock: no result for job {job} within {deadline:?}; it will be retried"
        );
        let _ = f.reply.send(JobResult::temp_fail(
            f.recipients,
            &format!(
                "deliverd did not report a result within {}s",
                deadline.as_secs()
            ),
        ));
        jobs.expired.insert(job);
        if jobs.expired.len() >= self.slots {
            self.close.notify_one();
        }
    }
}

/// Cuts a failure text to [`MAX_FAILURE_TEXT`] bytes (at a character
/// boundary) and replaces control characters with spaces.
fn clean(outcome: Outcome) -> Outcome {
    let fix = |t: String| -> String {
        let mut end = t.len().min(MAX_FAILURE_TEXT);
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t[..end]
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    match outcome {
        Outcome::Delivered => Outcome::Delivered,
        Outcome::TempFail(t) => Outcome::TempFail(fix(t)),
        Outcome::PermFail(t) => Outcome::PermFail(fix(t)),
    }
}

/// Serves one deliverd connection until it closes.
pub async fn serve(dispatcher: Arc<Dispatcher>, ids: Arc<Identities>, mut stream: UnixStream) {
    let d = &dispatcher;
    // A stranger is turned away before it costs a slot or a hello timeout.
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    if !uid.is_some_and(|u| ids.allows(Role::Deliverd, u)) {
        metrics::inc_label(names::IPC_REFUSED, "deliver");
        if let Some(n) = d.refused_stranger.allow() {
            tracing::warn!(
                "deliver.sock: refused a connection: peer uid {} may not use this socket{}",
                uid.map_or("unknown".into(), |u| u.to_string()),
                skipped(n)
            );
        }
        return;
    }
    let Ok(_permit) = d.connections.clone().try_acquire_owned() else {
        metrics::inc_label(names::IPC_REFUSED, "deliver:max_connections");
        if let Some(n) = d.refused_full.allow() {
            tracing::warn!(
                "deliver.sock: refusing a connection: {MAX_CONNECTIONS} already open{}",
                skipped(n)
            );
        }
        return;
    };
    let peer = match hello::accept(&mut stream, Role::Queued, &[Role::Deliverd], &ids).await {
        Ok(p) => p,
        Err(e) => {
            metrics::inc_label(names::IPC_REFUSED, "deliver");
            if let Some(n) = d.refused_hello.allow() {
                tracing::warn!("deliver.sock: refused a connection: {e}{}", skipped(n));
            }
            return;
        }
    };
    tracing::info!(uid = peer.uid, pid = ?peer.pid, "deliver.sock: deliverd connected");
    let (r, w) = stream.into_split();
    let mut reader = FrameReader::new(r);
    let ready = tokio::time::timeout(hello::HELLO_TIMEOUT, reader.read(MAX_SMALL_FRAME)).await;
    let slots = match ready {
        Ok(Ok(Some(FromDeliverd::Ready { slots }))) => slots.clamp(1, 1024) as usize,
        Ok(Ok(Some(FromDeliverd::HookReady { slots }))) => {
            let slots = slots.clamp(1, 1024) as usize;
            let hooks = dispatcher.hooks.clone();
            return crate::hooks::serve(hooks, reader, w, slots, dispatcher.idle_timeout).await;
        }
        other => {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!("deliver.sock: expected Ready first, got {other:?}; closing");
            return;
        }
    };
    let conn = Arc::new(Conn {
        jobs: Mutex::default(),
        slots,
        free: Semaphore::new(slots),
        close: Notify::new(),
    });
    let mut results = tokio::spawn(read_results(reader, conn.clone(), dispatcher.idle_timeout));
    let mut next_job = 0u64;
    loop {
        let permit = tokio::select! {
            p = conn.free.acquire() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut results => break,
            _ = conn.close.notified() => {
                tracing::warn!("deliver.sock: every slot is held by a job past its deadline; closing");
                break;
            }
        };
        let pending = {
            let mut rx = dispatcher.rx.lock().await;
            tokio::select! {
                j = rx.recv() => j,
                _ = &mut results => None,
                _ = conn.close.notified() => None,
            }
        };
        let Some(mut pending) = pending else { break };
        next_job += 1;
        pending.job.job = next_job;
        let file = match tokio::task::block_in_place(|| std::fs::File::open(&pending.body)) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(id = %pending.job.queue_id, "cannot open the message body {}: {e}", pending.body.display());
                let _ = pending.reply.send(JobResult::temp_fail(
                    pending.job.to.len(),
                    &format!("queue could not open the message: {e}"),
                ));
                continue;
            }
        };
        let bytes = match encode(&ToDeliverd::Job(pending.job.clone())) {
            // deliverd refuses (and drops the connection on) job frames
            // over its limit: such a job could never be delivered, and
            // would take the jobs in flight with it on every retry.
            Ok(b) if b.len() - 4 <= MAX_SMALL_FRAME => b,
            Ok(b) => {
                tracing::error!(id = %pending.job.queue_id, "a delivery job of {} bytes is over the {MAX_SMALL_FRAME}-byte limit", b.len());
                let _ = pending.reply.send(JobResult::perm_fail(
                    pending.job.to.len(),
                    "the delivery job is too large to hand to deliverd (a pipe command, forward list or sender too long)",
                ));
                continue;
            }
            Err(e) => {
                let _ = pending.reply.send(JobResult::perm_fail(
                    pending.job.to.len(),
                    &format!("job cannot be encoded: {e}"),
                ));
                continue;
            }
        };
        conn.jobs().in_flight.insert(
            next_job,
            InFlight {
                reply: pending.reply,
                recipients: pending.job.to.len(),
                deadline: None,
            },
        );
        let sent = tokio::time::timeout(
            SEND_TIMEOUT,
            fd::send_with_fd(w.as_ref(), &bytes, file.as_fd()),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::warn!("deliver.sock: sending a job failed or timed out; closing");
            if let Some(f) = conn.jobs().in_flight.remove(&next_job) {
                let _ = f.reply.send(JobResult::temp_fail(
                    f.recipients,
                    "connection to deliverd lost",
                ));
            }
            break;
        }
        // The slot comes back when the result arrives.
        permit.forget();
        let (c, job, deadline) = (conn.clone(), next_job, dispatcher.deadline);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            c.expire(job, deadline);
        });
        match conn.jobs().in_flight.get_mut(&next_job) {
            Some(f) => f.deadline = Some(timer.abort_handle()),
            // The result came first.
            None => timer.abort(),
        }
    }
    results.abort();
    let lost: Vec<_> = conn.jobs().in_flight.drain().collect();
    for (_, f) in &lost {
        if let Some(t) = &f.deadline {
            t.abort();
        }
    }
    if !lost.is_empty() {
        tracing::warn!(
            "deliverd went away with {} jobs in flight; they will be retried",
            lost.len()
        );
    }
    for (_, f) in lost {
        let _ = f.reply.send(JobResult::temp_fail(
            f.recipients,
            "connection to deliverd lost during delivery",
        ));
    }
    tracing::info!("deliver.sock: deliverd disconnected");
}

async fn read_results(mut reader: FrameReader<OwnedReadHalf>, conn: Arc<Conn>, idle: Duration) {
    loop {
        // A result holds one outcome (with its failure text) per recipient
        // of the job: larger than the other frames.
        let msg = match tokio::time::timeout(idle, reader.read(MAX_RESULT_FRAME)).await {
            Err(_) => Err(Error::Idle(idle)),
            Ok(r) => r,
        };
        let result = match msg {
            Ok(Some(FromDeliverd::Done {
                job,
                outcomes,
                seen,
            })) => conn.finish(job, outcomes, seen),
            Ok(Some(FromDeliverd::Heartbeat)) => Ok(()),
            Ok(Some(FromDeliverd::Ready { .. } | FromDeliverd::HookReady { .. })) => {
                Err(Error::Unexpected("Ready"))
            }
            Ok(Some(FromDeliverd::HookDone { .. })) => Err(Error::Unexpected(
                "a hook result on the delivery connection",
            )),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            metrics::inc_label(names::IPC_ERRORS, "queued");
            tracing::warn!("deliver.sock: {e}; closing");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_of_the_wrong_size_are_refused_before_deliverd() {
        let cfg = tambo_common::config::Config::defaults(std::path::Path::new("/nonexistent"));
        let d = Dispatcher::new(None, None, Arc::new(crate::hooks::Hooks::new(&cfg)));
        for n in [0, tambo_proto::deliver::MAX_RECIPIENTS_PER_JOB + 1] {
            let job = Job {
                job: 0,
                queue_id: "q".into(),
                from: String::new(),
                to: vec!["x@example.org".into(); n],
                target: tambo_proto::deliver::Target::Remote,
                security: None,
                maybe_delivered: false,
                positions: Vec::new(),
            };
            let r = d.submit(job, PathBuf::from("/nonexistent")).await.unwrap();
            assert_eq!(r.outcomes.len(), n);
            assert!(r.outcomes.iter().all(|o| matches!(o, Outcome::TempFail(_))));
        }
    }

    #[test]
    fn failure_texts_are_cut_and_cleaned() {
        let long = format!("550 {}\r\nInjected: yes\u{1b}[31m", "é".repeat(2000));
        let Outcome::PermFail(t) = clean(Outcome::PermFail(long)) else {
            panic!()
        };
        assert!(t.len() <= MAX_FAILURE_TEXT);
        assert!(!t.chars().any(char::is_control), "{t:?}");
        assert!(t.starts_with("550 éé"));
        assert_eq!(clean(Outcome::Delivered), Outcome::Delivered);
    }

    #[tokio::test]
    async fn a_result_stops_its_deadline_timer() {
        let conn = Arc::new(Conn {
            jobs: Mutex::default(),
            slots: 1,
            free: Semaphore::new(0),
            close: Notify::new(),
        });
        let (tx, _rx) = oneshot::channel();
        let c = conn.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            c.expire(1, Duration::from_secs(3600));
        });
        conn.jobs().in_flight.insert(
            1,
            InFlight {
                reply: tx,
                recipients: 1,
                deadline: Some(timer.abort_handle()),
            },
        );
        assert_eq!(
            Arc::strong_count(&conn),
            2,
            "the timer holds the connection"
        );
        conn.finish(1, vec![Outcome::Delivered], None).unwrap();
        assert!(timer.await.unwrap_err().is_cancelled());
        assert_eq!(Arc::strong_count(&conn), 1, "and lets it go");
    }

    #[tokio::test]
    async fn expired_jobs_fail_and_late_results_free_their_slots() {
        let conn = Conn {
            jobs: Mutex::default(),
            slots: 2,
            free: Semaphore::new(0),
            close: Notify::new(),
        };
        let job = |reply| InFlight {
            reply,
            recipients: 1,
            deadline: None,
        };
        let (tx1, rx1) = oneshot::channel();
        let (tx2, _rx2) = oneshot::channel();
        conn.jobs().in_flight.insert(1, job(tx1));
        conn.jobs().in_flight.insert(2, job(tx2));
        conn.expire(1, Duration::from_secs(1));
        assert!(matches!(
            rx1.await.unwrap().outcomes[..],
            [Outcome::TempFail(_)]
        ));
        // The late result is not an error, and frees the slot.
        conn.finish(1, vec![Outcome::Delivered], None).unwrap();
        assert_eq!(conn.free.available_permits(), 1);
        // A result for a job never handed out is.
        assert!(conn.finish(99, vec![Outcome::Delivered], None).is_err());
        // Both slots expired: the connection is told to close.
        let (tx3, _rx3) = oneshot::channel();
        conn.jobs().in_flight.insert(3, job(tx3));
        conn.expire(2, Duration::from_secs(1));
        conn.expire(3, Duration::from_secs(1));
        let closed = tokio::time::timeout(Duration::from_millis(100), conn.close.notified()).await;
        assert!(closed.is_ok());
    }
}
