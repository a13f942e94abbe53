//! The deliver.sock link: pull jobs from queued, run them, report results.

use std::fs::File;
use std::sync::Arc;

use tokio::io::BufWriter;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use tambo_common::config::Config;
use tambo_proto::Error;
use tambo_proto::deliver::{FromDeliverd, Job, Outcome, Target, ToDeliverd};
use tambo_proto::fd::FdReader;
use tambo_proto::frame::write_frame;
use tambo_proto::metrics::{self, names};

use crate::{maildir, mda};

/// Largest job frame: addresses, a pipe command line, forward hosts.
const MAX_JOB_FRAME: usize = tambo_proto::frame::MAX_SMALL_FRAME;

/// Serves one connection to queued until it closes. Deliveries still
/// running when it closes are abandoned (queued retries them).
pub async fn serve(cfg: Arc<Config>, stream: UnixStream) -> Result<(), Error> {
    let (r, w) = stream.into_split();
    let mut writer = BufWriter::new(w);
    write_frame(
        &mut writer,
        &FromDeliverd::Ready {
            slots: cfg.tambo.delivery_slots,
        },
    )
    .await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Outcome)>();
    // Results as they come, and a heartbeat when there is nothing to say,
    // so queued can tell a quiet deliverd from a dead one.
    let heartbeat = tambo_proto::keepalive_every(
        cfg.testing
            .ipc_idle_timeout
            .unwrap_or(tambo_proto::deliver::IDLE_TIMEOUT),
    );
    let results = tokio::spawn(async move {
        loop {
            let msg = match tokio::time::timeout(heartbeat, rx.recv()).await {
                Ok(Some((job, outcome))) => FromDeliverd::Done { job, outcome },
                Ok(None) => break,
                Err(_) => FromDeliverd::Heartbeat,
            };
            write_frame(&mut writer, &msg).await?;
        }
        Ok::<(), Error>(())
    });
    let mut reader = FdReader::new(r);
    let mut running = JoinSet::new();
    let result = loop {
        let msg = match reader.read_frame::<ToDeliverd>(MAX_JOB_FRAME).await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let ToDeliverd::Job(job) = msg;
        let Some(fd) = reader.take_fd() else {
            break Err(Error::MissingFd);
        };
        let (cfg, tx) = (cfg.clone(), tx.clone());
        running.spawn(async move {
            let id = job.job;
            let outcome = deliver(&cfg, &job, File::from(fd)).await;
            let _ = tx.send((id, outcome));
        });
        // Reap finished tasks so the set does not grow.
        while running.try_join_next().is_some() {}
    };
    running.abort_all();
    results.abort();
    result
}

/// One delivery attempt.
pub async fn deliver(cfg: &Config, job: &Job, message: File) -> Outcome {
    let label = match job.target {
        Target::Local => "email:local",
        Target::Remote => "email:remote",
        Target::Pipe(_) => "pipe",
        Target::Forward(_) => "forward",
    };
    metrics::inc_label(names::QUEUE_DELIVER_ATTEMPTS, label);
    let timeout = cfg.testing.mda_timeout.unwrap_or(mda::TIMEOUT);
    let outcome = match &job.target {
        Target::Local => match &cfg.tambo.maildir {
            Some(template) => match maildir::expand(template, &job.to) {
                Ok(dir) => {
                    let (mut message, id) = (message, job.queue_id.clone());
                    tokio::task::spawn_blocking(move || maildir::deliver(&dir, &mut message, &id))
                        .await
                        .unwrap_or_else(|e| {
                            Outcome::TempFail(format!("Maildir delivery task failed: {e}"))
                        })
                }
                Err(e) => Outcome::PermFail(e),
            },
            None => match mda::expand_args(&cfg.mail_delivery_agent_args, &job.from, &job.to) {
                Ok(args) => {
                    mda::run("MDA", &cfg.mail_delivery_agent_bin, &args, message, timeout).await
                }
                Err(e) => Outcome::PermFail(e),
            },
        },
        Target::Pipe(cmdline) => {
            let mut parts = cmdline.split_whitespace().map(str::to_string);
            match parts.next() {
                Some(bin) => {
                    mda::run(
                        "pipe command",
                        &bin,
                        &parts.collect::<Vec<_>>(),
                        message,
                        timeout,
                    )
                    .await
                }
                None => Outcome::PermFail("empty pipe command".into()),
            }
        }
        // Remote SMTP comes with its own issue; until then such mail waits
        // in the queue (a temporary failure) rather than bouncing.
        Target::Remote | Target::Forward(_) => Outcome::TempFail(
            "remote SMTP delivery is not implemented in this version of tambo".into(),
        ),
    };
    match &outcome {
        Outcome::Delivered => {
            tracing::info!(id = %job.queue_id, to = %job.to, "delivered ({label})")
        }
        Outcome::TempFail(t) => {
            tracing::info!(id = %job.queue_id, to = %job.to, "temporary failure ({label}): {t}")
        }
        Outcome::PermFail(t) => {
            tracing::info!(id = %job.queue_id, to = %job.to, "permanent failure ({label}): {t}")
        }
    }
    outcome
}
