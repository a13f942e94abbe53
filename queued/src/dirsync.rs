//! Group commit for the queue directory.
//!
//! Every new, renamed or removed queue file needs a directory fsync before
//! it is durable. Concurrent sessions share one: a caller asks for a sync
//! and waits for the next fsync that *starts* after its request, so its own
//! rename is covered; everything that queued up during one fsync is covered
//! by the next. Under load this turns one directory fsync per message into
//! one per batch (DESIGN §4).
//!
//! A failed directory fsync is final: after it, the kernel may have dropped
//! the dirty state it could not write (and report success next time), so
//! nothing that depends on the directory can be trusted until queued
//! restarts and re-reads the queue. Every later sync fails at once, and
//! the queue refuses new mail (451) meanwhile.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use tambo_proto::metrics::{self, names};

use crate::spool::Spool;

type Waiter = oneshot::Sender<Result<(), Arc<io::Error>>>;

/// A handle on the syncer: clones share it.
#[derive(Clone)]
pub struct DirSync {
    tx: mpsc::UnboundedSender<Waiter>,
    failed: Arc<AtomicBool>,
    /// Directory fsyncs made (the metric, but this syncer's own; read by
    /// the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    fsyncs: Arc<AtomicU64>,
    /// A [`DirSync::sync_soon`] is waiting for its turn.
    soon: Arc<AtomicBool>,
}

/// How long a removal may wait to be made durable ([`DirSync::sync_soon`]).
pub const SOON: Duration = Duration::from_millis(100);

impl DirSync {
    /// Starts the syncing thread for `spool`'s directory; it ends when
    /// the last handle is dropped.
    ///
    /// A thread of its own, not a task that hands each fsync to the
    /// blocking pool: a request wakes it directly, and its answer wakes
    /// the waiter directly, two thread switches fewer on the path of
    /// every put.
    pub fn start(spool: Spool) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        let failed = Arc::new(AtomicBool::new(false));
        let failed2 = failed.clone();
        let fsyncs = Arc::new(AtomicU64::new(0));
        let counted = fsyncs.clone();
        let syncer = move || {
            let mut first_error: Option<Arc<io::Error>> = None;
            while let Some(first) = rx.blocking_recv() {
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let result = match &first_error {
                    Some(e) => Err(e.clone()),
                    None => {
                        let r = spool.sync_dir().map_err(Arc::new);
                        metrics::inc(names::QUEUE_DIR_SYNCS);
                        counted.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = &r {
                            tracing::error!(
                                "fsync of the queue directory failed: {e}; refusing new mail until queued restarts"
                            );
                            failed2.store(true, Ordering::SeqCst);
                            first_error = Some(e.clone());
                        }
                        r
                    }
                };
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("dirsync".into())
            .spawn(syncer)
        {
            // Every sync then fails ("stopped"): no new mail is taken.
            tracing::error!("cannot start the queue directory's syncer: {e}");
            failed.store(true, Ordering::SeqCst);
        }
        Self {
            tx,
            failed,
            fsyncs,
            soon: Arc::default(),
        }
    }

    /// Directory fsyncs made so far.
    #[cfg(test)]
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Whether a directory fsync has ever failed in this process.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Makes every directory change made before this call durable within
    /// [`SOON`], without waiting: for removals of delivered items. Until
    /// then a crash may bring an item back, and its delivery is tried
    /// again (tambo's Maildir recognises what it already has; other
    /// targets may get it twice), as it could before the removal. Under
    /// load this is one directory fsync per interval instead of one per
    /// message (a sync for new mail in between covers them too). A
    /// failure is logged by the syncer, like any.
    pub fn sync_soon(&self) {
        if self.soon.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tx, soon) = (self.tx.clone(), self.soon.clone());
        tokio::spawn(async move {
            tokio::time::sleep(SOON).await;
            // Cleared before the request: a removal that saw it set is
            // older than the request, so the fsync after it covers it.
            soon.store(false, Ordering::Release);
            let (w, rx) = oneshot::channel();
            if tx.send(w).is_ok() {
                let _ = rx.await;
            }
        });
    }

    /// Returns once every directory change made before this call is
    /// durable.
    pub async fn sync(&self) -> io::Result<()> {
        let rx = self.request()?.0;
        answer(rx.await)
    }

    /// Asks for a sync of every directory change made before this call,
    /// without waiting: from a blocking job, which goes on with its own
    /// fsyncs meanwhile (they can share a journal commit) and then waits
    /// with [`Requested::wait`].
    pub fn request(&self) -> io::Result<Requested> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .map_err(|_| io::Error::other("directory syncer stopped"))?;
        Ok(Requested(rx))
    }
}

/// A sync asked for with [`DirSync::request`].
pub struct Requested(oneshot::Receiver<Result<(), Arc<io::Error>>>);

impl Requested {
    /// Blocks until the sync is done: only off the runtime's threads.
    pub fn wait(self) -> io::Result<()> {
        answer(self.0.blocking_recv())
    }
}

fn answer(r: Result<Result<(), Arc<io::Error>>, oneshot::error::RecvError>) -> io::Result<()> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
        Err(_) => Err(io::Error::other("directory syncer stopped")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn removals_are_synced_soon_and_together() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let ds = DirSync::start(spool);
        let started = std::time::Instant::now();
        for _ in 0..100 {
            ds.sync_soon();
        }
        assert_eq!(ds.fsyncs(), 0, "nobody waits for it");
        let wait_for = |n: u64| {
            let ds = &ds;
            async move {
                while ds.fsyncs() < n {
                    assert!(started.elapsed() < Duration::from_secs(10), "no fsync");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        wait_for(1).await;
        assert!(started.elapsed() >= SOON);
        // One fsync for all hundred: nothing else follows.
        tokio::time::sleep(SOON * 3).await;
        assert_eq!(ds.fsyncs(), 1);
        // A later removal starts a new interval.
        ds.sync_soon();
        wait_for(2).await;
    }

    #[tokio::test]
    async fn concurrent_syncs_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let ds = Arc::new(DirSync::start(spool));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let ds = ds.clone();
            tasks.push(tokio::spawn(async move { ds.sync().await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let pending: u64 = tambo_proto::metrics::global()
            .take()
            .iter()
            .filter(|d| d.var == names::QUEUE_DIR_SYNCS)
            .map(|d| d.value)
            .sum();
        assert!(
            (1..50).contains(&pending),
            "{pending} fsyncs for 50 concurrent requests"
        );
    }

    #[tokio::test]
    async fn a_failed_sync_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let trigger = dir.path().join("fail");
        let spool = Spool::open(&dir.path().join("q"), false)
            .unwrap()
            .fail_sync_if(Some(trigger.clone()));
        let ds = DirSync::start(spool);
        ds.sync().await.unwrap();
        assert!(!ds.has_failed());
        std::fs::write(&trigger, b"").unwrap();
        assert!(ds.sync().await.is_err());
        // The disk is "fine" again, but the failure sticks.
        std::fs::remove_file(&trigger).unwrap();
        assert!(ds.sync().await.is_err());
        assert!(ds.has_failed());
    }
}
