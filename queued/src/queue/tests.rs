//! The put on disk: one file with its item, and a put that fails or
//! comes too late leaves nothing that could be delivered later.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tambo_common::config::Config;
use tambo_common::domains::{Domain, Domains};
use tambo_common::users::UserDb;

use super::ids::READY_FILES;
use super::{FromSession, PutError, Queue};
use crate::dkim::DkimKeys;
use crate::domaininfo::DomainInfo;
use crate::spool::Spool;

pub(crate) fn queue(dir: &Path) -> Arc<Queue> {
    queue_with(dir, None, None)
}

/// A queue whose directory syncs fail while `fail_sync_if` exists, and
/// take at least `sync_delay`.
fn queue_with(
    dir: &Path,
    fail_sync_if: Option<std::path::PathBuf>,
    sync_delay: Option<Duration>,
) -> Arc<Queue> {
    let cfg = Config::defaults(dir);
    let users = UserDb::parse("ann !\n", Path::new("users")).unwrap();
    let domains = Domains::from_parts([(
        "example.org".to_string(),
        Domain {
            users,
            aliases: Default::default(),
        },
    )]);
    let mut spool = Spool::open(&dir.join("queue"), false)
        .unwrap()
        .fail_sync_if(fail_sync_if);
    spool.sync_delay = sync_delay;
    let info = Arc::new(DomainInfo::load(&dir.join("domaininfo")).unwrap());
    Arc::new(Queue::new(
        Arc::new(cfg),
        domains,
        spool,
        info,
        Arc::new(DkimKeys::default()),
    ))
}

const BODY: &[u8] = b"Subject: x\r\n\r\nbody\r\n";

/// A put as a session makes it, with `budget` before smtpd gives up.
async fn put(q: &Arc<Queue>, budget: Duration) -> (Result<(), PutError>, String) {
    let id = q.reserve_id(false).unwrap();
    let mut w = q.body_writer(&id).unwrap();
    w.write(BODY).unwrap();
    (put_body(q, &id, w, budget).await, id)
}

/// The end of [`put`], for a body received already.
async fn put_body(
    q: &Arc<Queue>,
    id: &str,
    w: crate::spool::BodyWriter,
    budget: Duration,
) -> Result<(), PutError> {
    let session = FromSession {
        deadline: Some(Instant::now() + budget),
        body: Some(w),
        ..Default::default()
    };
    q.put(
        id.to_string(),
        "a@remote.example".into(),
        vec!["ann@example.org".into()],
        "127.0.0.1:1".into(),
        false,
        session,
    )
    .await
}

/// Waits until the batch of ready files a first put started is made (one
/// of them taken since, by the next reservation at the latest).
async fn wait_ready(q: &Queue) {
    let started = Instant::now();
    while q.ids().ready.len() < READY_FILES - 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "none made ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The queue's files, but for the empty ones made ready for new messages.
fn files(q: &Queue) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(q.spool.dir())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.metadata().unwrap().len() > 0)
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_put_is_one_file_with_its_item_and_the_size_of_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(dir.path());
    let (r, id) = put(&q, Duration::from_secs(60)).await;
    r.unwrap();
    assert_eq!(files(&q), [format!("d:{id}")]);
    let loaded = q.spool.load().unwrap();
    assert_eq!(loaded.items.len(), 1);
    assert_eq!(loaded.items[0].id, id);
    assert_eq!(loaded.items[0].body_len, Some(BODY.len() as u64));
    assert_eq!(loaded.items[0].recipients.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn new_messages_take_ready_files_and_wait_for_one_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(dir.path());
    // The first put finds none ready, and starts making them.
    let (r, first) = put(&q, Duration::from_secs(60)).await;
    r.unwrap();
    wait_ready(&q).await;
    let ready = std::fs::read_dir(q.spool.dir()).unwrap().count() - 1;
    assert_eq!(ready, q.ids().ready.len(), "each an empty d: file");
    assert_eq!(files(&q), [format!("d:{first}")]);
    let syncs = q.dirsync.fsyncs();
    let (r, id) = put(&q, Duration::from_secs(60)).await;
    r.unwrap();
    assert_ne!(id, first);
    assert_eq!(q.dirsync.fsyncs(), syncs, "no directory fsync for it");
    // As at the next start (this queue is not used after it: the load
    // removes its ready files).
    let loaded = q.spool.load().unwrap();
    let mut ids: Vec<_> = loaded.items.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    let mut want = vec![first, id];
    want.sort();
    assert_eq!(ids, want);
    // The ready files nobody used: empty, removed at that start.
    assert_eq!(loaded.removed_temp, ready - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_failed_directory_sync_leaves_nothing_and_stops_new_mail() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail");
    std::fs::write(&trigger, b"").unwrap();
    let q = queue_with(dir.path(), Some(trigger), None);
    let (r, _) = put(&q, Duration::from_secs(60)).await;
    assert!(
        matches!(&r, Err(PutError::Io(e)) if e.to_string().contains("testing.fail_dir_sync")),
        "{r:?}"
    );
    assert!(files(&q).is_empty(), "{:?}", files(&q));
    assert!(matches!(q.reserve_id(false), Err(PutError::Unsynced)));
    // The batch of ready files its reservation started is never ready:
    // its directory fsync failed (the empty files stay until the next
    // start removes them).
    let started = Instant::now();
    while q.ids().filling {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(q.ids().ready.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_ready_file_taken_before_a_failed_directory_fsync_is_refused() {
    // Its name was durable before, so its put needs no directory fsync;
    // but once one failed, nothing new is acknowledged until a restart.
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail");
    let q = queue_with(dir.path(), Some(trigger.clone()), None);
    let (r, _) = put(&q, Duration::from_secs(60)).await;
    r.unwrap();
    wait_ready(&q).await;
    let id = q.reserve_id(false).unwrap();
    let mut w = q.body_writer(&id).unwrap();
    w.write(BODY).unwrap();
    std::fs::write(&trigger, b"").unwrap();
    assert!(q.dirsync.sync().await.is_err());
    let r = put_body(&q, &id, w, Duration::from_secs(60)).await;
    assert!(matches!(r, Err(PutError::Unsynced)), "{r:?}");
    assert!(!files(&q).contains(&format!("d:{id}")), "{:?}", files(&q));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_put_past_its_deadline_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(dir.path());
    let (r, _) = put(&q, Duration::ZERO).await;
    assert!(matches!(r, Err(PutError::TooLate)), "{r:?}");
    assert!(files(&q).is_empty(), "{:?}", files(&q));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_put_whose_fsyncs_end_past_its_deadline_is_removed() {
    // smtpd has told the client to retry by then: kept, the message would
    // arrive twice.
    let dir = tempfile::tempdir().unwrap();
    let q = queue_with(dir.path(), None, Some(Duration::from_millis(400)));
    let started = Instant::now();
    let (r, _) = put(&q, Duration::from_millis(200)).await;
    assert!(matches!(r, Err(PutError::TooLate)), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "it was written"
    );
    assert!(files(&q).is_empty(), "{:?}", files(&q));
    assert!(q.spool.load().unwrap().items.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn stopping_syncs_the_removals_nobody_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(dir.path());
    // A removal's sync is only asked for (within dirsync::SOON)...
    q.dirsync.sync_soon();
    let before = q.dirsync.fsyncs();
    // ...and made at once when queued stops.
    q.sync_before_exit().await;
    assert!(q.dirsync.fsyncs() > before);
}
