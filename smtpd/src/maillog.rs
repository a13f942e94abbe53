//! smtpd's side of the mail log (REFERENCE §8): what it sees (listeners,
//! AUTH results, refused commands) goes to queued, which writes the one
//! mail log; smtpd has no disk.
//!
//! One link per process, opened when there is something to say: sessions
//! put events in a bounded queue and never wait (a full queue drops the
//! event and counts it), so a flood of bad commands costs queued one
//! connection and a budget of lines, never a link per session.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use tambo_common::loglimit::{LogLimiter, skipped};
use tambo_proto::frame::encode;
use tambo_proto::hello;
use tambo_proto::identity::Identities;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{MailLogEvent, SubmitRequest};
use tambo_proto::{Error, Role};

/// Events waiting to be sent at most.
const QUEUE: usize = 4096;

/// How long one write to queued may take before the link is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

static TX: OnceLock<mpsc::Sender<MailLogEvent>> = OnceLock::new();

/// Starts the task that carries events to queued over `socket`. Call it
/// inside the runtime, once.
pub fn start(socket: PathBuf, ids: Identities) {
    let (tx, rx) = mpsc::channel(QUEUE);
    if TX.set(tx).is_ok() {
        tokio::spawn(run(socket, ids, rx));
    }
}

/// Queues an event for the mail log; never waits.
pub fn log(ev: MailLogEvent) {
    if let Some(tx) = TX.get()
        && tx.try_send(ev).is_err()
    {
        metrics::inc(names::MAILLOG_DROPPED);
    }
}

async fn connect(socket: &Path, ids: &Identities) -> Result<OwnedWriteHalf, Error> {
    let stream = hello::connect(socket, Role::Smtpd, Role::Queued, ids).await?;
    let (_, mut w) = stream.into_split();
    w.write_all(&encode(&SubmitRequest::LogLink)?).await?;
    Ok(w)
}

async fn send(w: &mut OwnedWriteHalf, ev: &MailLogEvent) -> Result<(), Error> {
    let frame = encode(&SubmitRequest::Log(ev.clone()))?;
    tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&frame))
        .await
        .map_err(|_| Error::Io(std::io::ErrorKind::TimedOut.into()))??;
    Ok(())
}

async fn run(socket: PathBuf, ids: Identities, mut rx: mpsc::Receiver<MailLogEvent>) {
    let mut link: Option<OwnedWriteHalf> = None;
    let failures = LogLimiter::new();
    while let Some(ev) = rx.recv().await {
        // Twice at most: the link queued closed while idle is found dead
        // at the first write, and a fresh one carries the event.
        let mut sent = false;
        for _ in 0..2 {
            if link.is_none() {
                match connect(&socket, &ids).await {
                    Ok(w) => link = Some(w),
                    Err(e) => {
                        if let Some(n) = failures.allow() {
                            tracing::warn!("mail log: cannot reach queued: {e}{}", skipped(n));
                        }
                        break;
                    }
                }
            }
            if let Some(w) = link.as_mut() {
                match send(w, &ev).await {
                    Ok(()) => {
                        sent = true;
                        break;
                    }
                    Err(_) => link = None,
                }
            }
        }
        if !sent {
            metrics::inc(names::MAILLOG_DROPPED);
        }
    }
}
