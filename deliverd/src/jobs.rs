//! The deliver.sock link: pull jobs from queued, run them, report results.

use std::fs::File;
use std::sync::Arc;

use tokio::io::BufWriter;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use tambo_common::config::Config;
use tambo_proto::Error;
use tambo_proto::deliver::{FromDeliverd, Job, Outcome, SecLevel, Target, ToDeliverd};
use tambo_proto::fd::FdReader;
use tambo_proto::frame::write_frame;
use tambo_proto::metrics::{self, names};

use crate::remote::Remote;
use crate::{lmtp, maildir, mda};

/// What every delivery may need.
pub struct Ctx {
    pub cfg: Arc<Config>,
    pub remote: Remote,
}

/// The result of a job: one outcome per recipient, and the security level
/// seen on the way (remote jobs).
type Done = (Vec<Outcome>, Option<SecLevel>);

/// Largest job frame: addresses, a pipe command line, forward hosts.
const MAX_JOB_FRAME: usize = tambo_proto::frame::MAX_SMALL_FRAME;

/// Serves one connection to queued until it closes. Deliveries still
/// running when it closes are abandoned (queued retries them).
pub async fn serve(ctx: Arc<Ctx>, stream: UnixStream) -> Result<(), Error> {
    let cfg = &ctx.cfg;
    let (r, w) = stream.into_split();
    let mut writer = BufWriter::new(w);
    write_frame(
        &mut writer,
        &FromDeliverd::Ready {
            slots: cfg.tambo.delivery_slots,
        },
    )
    .await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Done)>();
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
                Ok(Some((job, (outcomes, seen)))) => FromDeliverd::Done {
                    job,
                    // queued reads results up to a size that assumes
                    // capped texts (MAX_RESULT_FRAME).
                    outcomes: outcomes.into_iter().map(Outcome::capped).collect(),
                    seen,
                },
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
        let ToDeliverd::Job(job) = msg else {
            break Err(Error::Unexpected("a hook call on the delivery connection"));
        };
        let Some(fd) = reader.take_fd() else {
            break Err(Error::MissingFd);
        };
        let (ctx, tx) = (ctx.clone(), tx.clone());
        running.spawn(async move {
            let id = job.job;
            let done = deliver(&ctx, &job, File::from(fd)).await;
            let _ = tx.send((id, done));
        });
        // Reap finished tasks so the set does not grow.
        while running.try_join_next().is_some() {}
    };
    running.abort_all();
    results.abort();
    result
}

/// One delivery attempt: one outcome per recipient of the job.
pub async fn deliver(ctx: &Ctx, job: &Job, message: File) -> Done {
    let cfg = &*ctx.cfg;
    let label = match job.target {
        Target::Local => "email:local",
        Target::Remote => "email:remote",
        Target::Pipe(_) => "pipe",
        Target::Forward(_) => "forward",
    };
    metrics::add_label(names::QUEUE_DELIVER_ATTEMPTS, label, job.to.len() as u64);
    let family = match &job.target {
        Target::Local if cfg.tambo.lmtp_address.is_some() => "Courier.LMTP",
        Target::Local if cfg.tambo.maildir.is_some() => "Courier.Maildir",
        Target::Local => "Courier.MDA",
        Target::Remote => "Courier.SMTP.Deliver",
        Target::Forward(_) => "Courier.SMTP.Forward",
        Target::Pipe(_) => "Courier.Pipe",
    };
    let mut trace =
        tambo_proto::trace::Trace::new(family, format!("{} from=<{}>", job.queue_id, job.from));
    let (outcomes, seen) = if job.to.is_empty() {
        (Vec::new(), None)
    } else {
        match &job.target {
            Target::Local => (local(cfg, job, message).await, None),
            Target::Pipe(cmdline) => (vec![pipe(cfg, cmdline, message).await], None),
            Target::Remote | Target::Forward(_) => ctx.remote.deliver(job, message).await,
        }
    };
    // Cut here, before logging: a hostile server's 64 KiB replies must not
    // reach the log (or queued) whole.
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(Outcome::capped).collect();
    for (to, outcome) in job.to.iter().zip(&outcomes) {
        match outcome {
            Outcome::Delivered => {
                tracing::info!(id = %job.queue_id, %to, "delivered ({label})");
                trace.event(format!("{to}: delivered"));
            }
            Outcome::TempFail(t) => {
                tracing::info!(id = %job.queue_id, %to, "temporary failure ({label}): {t}");
                trace.error(format!("{to}: temporary failure: {t}"));
            }
            Outcome::PermFail(t) => {
                tracing::info!(id = %job.queue_id, %to, "permanent failure ({label}): {t}");
                trace.error(format!("{to}: permanent failure: {t}"));
            }
        }
    }
    (outcomes, seen)
}

/// Local mail: LMTP for every recipient at once, or the Maildir writer or
/// the MDA for each.
async fn local(cfg: &Config, job: &Job, message: File) -> Vec<Outcome> {
    if let Some(address) = &cfg.tambo.lmtp_address {
        return lmtp::deliver(cfg, address, job, message).await;
    }
    let mut outcomes = Vec::with_capacity(job.to.len());
    for (i, to) in job.to.iter().enumerate() {
        // Every recipient reads the message from its start (clones share
        // one offset; local_one rewinds).
        let file = match message.try_clone() {
            Ok(f) => f,
            Err(e) => {
                outcomes.push(Outcome::TempFail(format!("cannot reuse the message: {e}")));
                continue;
            }
        };
        outcomes.push(local_one(cfg, job, to, job.positions.get(i).copied(), file).await);
    }
    outcomes
}

async fn local_one(
    cfg: &Config,
    job: &Job,
    to: &str,
    position: Option<u32>,
    mut message: File,
) -> Outcome {
    let from = job.from.as_str();
    use std::io::{Seek, SeekFrom};
    // Clones share one offset: start every recipient at the top.
    if let Err(e) = message.seek(SeekFrom::Start(0)) {
        return Outcome::TempFail(format!("cannot read the message: {e}"));
    }
    let timeout = cfg.testing.mda_timeout.unwrap_or(mda::TIMEOUT);
    match &cfg.tambo.maildir {
        Some(template) => match maildir::expand(template, to) {
            Ok(dir) => {
                let (id, to, maybe) = (job.queue_id.clone(), to.to_string(), job.maybe_delivered);
                let pause = cfg.testing.maildir_pause;
                tokio::task::spawn_blocking(move || {
                    let key = maildir::Recipient {
                        address: &to,
                        position,
                    };
                    maildir::deliver(&dir, &mut message, &id, key, maybe, pause)
                })
                .await
                .unwrap_or_else(|e| Outcome::TempFail(format!("Maildir delivery task failed: {e}")))
            }
            Err(e) => Outcome::PermFail(e),
        },
        None => match mda::expand_args(&cfg.mail_delivery_agent_args, from, to) {
            Ok(args) => {
                mda::run("MDA", &cfg.mail_delivery_agent_bin, &args, message, timeout).await
            }
            Err(e) => Outcome::PermFail(e),
        },
    }
}

async fn pipe(cfg: &Config, cmdline: &str, message: File) -> Outcome {
    let timeout = cfg.testing.mda_timeout.unwrap_or(mda::TIMEOUT);
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
