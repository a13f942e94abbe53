//! The put's order of operations on disk: the answer waits until the
//! body and the item are both durable, and a put that fails or comes too
//! late leaves nothing that could be delivered later.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tambo_common::config::Config;
use tambo_common::domains::{Domain, Domains};
use tambo_common::users::UserDb;

use super::{BodyInProgress, FromSession, PutError, Queue};
use crate::dkim::DkimKeys;
use crate::domaininfo::DomainInfo;
use crate::spool::Spool;

fn queue(dir: &Path) -> Arc<Queue> {
    let cfg = Config::defaults(dir);
    let users = UserDb::parse("ann !\n", Path::new("users")).unwrap();
    let domains = Domains::from_parts([(
        "example.org".to_string(),
        Domain {
            users,
            aliases: Default::default(),
        },
    )]);
    let spool = Spool::open(&dir.join("queue"), false).unwrap();
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

/// A put whose body's fsync answers `answer` after `delay`, with `budget`
/// before smtpd gives up. Returns the put's result and whether its item
/// file existed when the body's answer was given. Unless `whole`, the
/// body fails before its file has it all.
async fn put(
    q: &Arc<Queue>,
    delay: Duration,
    budget: Duration,
    answer: std::io::Result<()>,
    whole: bool,
) -> (Result<(), PutError>, bool, String) {
    let id = q.reserve_id(false).unwrap();
    let mut w = q.spool.create_body(&id).unwrap();
    w.write(BODY).unwrap();
    let len = w.size();
    w.close().unwrap();
    let (wtx, written) = tokio::sync::oneshot::channel();
    if whole {
        wtx.send(()).unwrap();
    } else {
        drop(wtx);
    }
    let (tx, synced) = tokio::sync::oneshot::channel();
    let item = q.spool.item_path(&id);
    let answered = tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let existed = item.exists();
        let _ = tx.send(answer);
        existed
    });
    let session = FromSession {
        deadline: Some(Instant::now() + budget),
        body: Some(BodyInProgress {
            len,
            written,
            synced,
        }),
        ..Default::default()
    };
    let r = q
        .put(
            id.clone(),
            "a@remote.example".into(),
            vec!["ann@example.org".into()],
            "127.0.0.1:1".into(),
            false,
            session,
        )
        .await;
    (r, answered.await.unwrap(), id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_put_answers_only_once_its_body_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(dir.path());
    let start = Instant::now();
    let delay = Duration::from_millis(200);
    let (r, existed, id) = put(&q, delay, Duration::from_secs(60), Ok(()), true).await;
    r.unwrap();
    assert!(
        start.elapsed() >= delay,
        "answered before the body was durable"
    );
    // Written while the body's fsync ran, with the size that tells a
    // whole put from one a crash cut short.
    assert!(existed, "the item is written alongside the body's fsync");
    let item =
        crate::item::Item::from_file(&std::fs::read(q.spool.item_path(&id)).unwrap()).unwrap();
    assert_eq!(item.body_len, Some(BODY.len() as u64));
    assert_eq!(q.spool.load().unwrap().items, vec![item]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_failed_body_leaves_no_item() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(dir.path());
    let eio = Err(std::io::Error::other("input/output error"));
    let (r, _, id) = put(
        &q,
        Duration::from_millis(10),
        Duration::from_secs(60),
        eio,
        true,
    )
    .await;
    assert!(
        matches!(&r, Err(PutError::Io(e)) if e.to_string().contains("cannot sync the message body")),
        "{r:?}"
    );
    assert!(!q.spool.item_path(&id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_body_never_written_whole_leaves_no_item() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(dir.path());
    let enospc = Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
    let (r, existed, id) = put(
        &q,
        Duration::from_millis(100),
        Duration::from_secs(60),
        enospc,
        false,
    )
    .await;
    assert!(
        matches!(&r, Err(PutError::Io(e)) if e.kind() == std::io::ErrorKind::StorageFull),
        "{r:?}"
    );
    // The item may be written meanwhile, but never stays.
    let _ = existed;
    assert!(!q.spool.item_path(&id).exists());
    assert!(q.spool.load().unwrap().items.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_body_synced_after_the_deadline_leaves_no_item() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(dir.path());
    let (r, _, id) = put(
        &q,
        Duration::from_millis(300),
        Duration::from_millis(100),
        Ok(()),
        true,
    )
    .await;
    assert!(matches!(r, Err(PutError::TooLate)), "{r:?}");
    assert!(!q.spool.item_path(&id).exists());
    // Nothing of it loads at the next start.
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
