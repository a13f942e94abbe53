//! IDs for new messages, and the empty files made ready for them: a
//! message takes a name that is durable already, so its put waits for one
//! fsync (its file's) instead of two.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::{PutError, Queue};
use crate::item;
use crate::spool::BodyWriter;

#[derive(Default)]
pub(super) struct Ids {
    pub(super) items: HashSet<String>,
    pub(super) reserved: HashSet<String>,
    /// Reserved IDs whose empty `d:` file is made and durable, for new
    /// messages to take ([`Queue::reserve_id`]).
    pub(super) ready: Vec<String>,
    /// Ready IDs handed out, their file not yet filled
    /// ([`Queue::body_writer`]).
    pub(super) handed: HashSet<String>,
    /// More ready files are being made.
    pub(super) filling: bool,
    /// When a batch last made none (a full disk, a quota): the next waits
    /// [`READY_BACKOFF`].
    made_none: Option<std::time::Instant>,
}

/// How long after a batch of ready files that made none the next may be
/// tried: not a directory fsync per message while the disk is full.
const READY_BACKOFF: Duration = Duration::from_secs(1);

/// Empty `d:` files kept made ahead for new messages (`Spool::make_ready`):
/// a message then takes a name that is durable already, and its put waits
/// for one fsync (its file's) instead of two. Made again by the batch
/// once half are taken, with one directory fsync per batch.
pub const READY_FILES: usize = 32;

impl Queue {
    pub(super) fn ids(&self) -> std::sync::MutexGuard<'_, Ids> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a fresh ID for a new message, one with a ready file when
    /// there is one; refused when the queue holds `max_queue_items` items
    /// (unless `bypass_limit`, for DSNs). Its body is started with
    /// [`Queue::body_writer`].
    pub fn reserve_id(self: &Arc<Self>, bypass_limit: bool) -> Result<String, PutError> {
        if self.dirsync.has_failed() {
            return Err(PutError::Unsynced);
        }
        let mut ids = self.ids();
        if !bypass_limit && ids.items.len() as u64 >= self.cfg.max_queue_items {
            return Err(PutError::Full);
        }
        let id = match ids.ready.pop() {
            Some(id) => {
                ids.handed.insert(id.clone());
                id
            }
            None => fresh_id(&mut ids)?,
        };
        drop(ids);
        self.make_ready();
        Ok(id)
    }

    /// Makes the next batch of ready files once half are taken, in the
    /// background.
    fn make_ready(self: &Arc<Self>) {
        let mut ids = self.ids();
        if ids.filling
            || ids.ready.len() >= READY_FILES / 2
            || ids.made_none.is_some_and(|t| t.elapsed() < READY_BACKOFF)
        {
            return;
        }
        let mut batch = Vec::with_capacity(READY_FILES);
        while ids.ready.len() + batch.len() < READY_FILES {
            match fresh_id(&mut ids) {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        ids.filling = true;
        drop(ids);
        let q = self.clone();
        tokio::spawn(async move {
            let spool = q.spool.clone();
            let all = batch.clone();
            let made = tokio::task::spawn_blocking(move || spool.make_ready(batch))
                .await
                .unwrap_or_default();
            // Ready only once their names are durable. If that fails,
            // the files stay (empty: removed at the next start) and the
            // queue refuses mail anyway.
            let synced = !made.is_empty() && q.dirsync.sync().await.is_ok();
            let mut ids = q.ids();
            ids.filling = false;
            ids.made_none = made.is_empty().then(std::time::Instant::now);
            for id in all {
                if !(synced && made.contains(&id)) {
                    ids.reserved.remove(&id);
                }
            }
            if synced {
                ids.ready.extend(made);
            }
        });
    }

    /// The body writer for an ID from [`Queue::reserve_id`]: into its
    /// ready file if it has one.
    pub fn body_writer(&self, id: &str) -> std::io::Result<BodyWriter> {
        if self.ids().handed.remove(id) {
            self.spool.ready_body(id)
        } else {
            self.spool.create_body(id)
        }
    }

    /// Gives back an ID whose put failed, and throws its files away (the
    /// item too: it may have been written before a failed directory
    /// fsync).
    pub fn release_id(&self, id: &str) {
        let _ = self.spool.unlink(id);
        let mut ids = self.ids();
        ids.reserved.remove(id);
        ids.handed.remove(id);
    }
}

/// A new random ID, reserved: unused by any item or reservation.
fn fresh_id(ids: &mut Ids) -> std::io::Result<String> {
    loop {
        let id = item::new_id()?;
        if !ids.items.contains(&id) && ids.reserved.insert(id.clone()) {
            return Ok(id);
        }
    }
}
