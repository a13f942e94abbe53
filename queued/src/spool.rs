//! The queue directory on disk.
//!
//! - `d:<ID>`: the message (headers added by smtpd, CRLF line ends),
//!   written as it streams in (or at its end, from memory, when small).
//!   A new message's item (envelope, recipient state, the body's size;
//!   JSON) is its extended attribute `user.tambo.item` ([`ITEM_XATTR`]):
//!   one file and one fsync make a message durable, and what deliverd
//!   and the MDAs read is the message alone.
//! - `m:<ID>`: the item once it is rewritten after a delivery attempt
//!   (atomic: temp + fsync + rename + directory fsync), which from then
//!   on is the one that counts; also a new item too large for an
//!   attribute, or on a file system without them (written under its
//!   name and fsync'd with the body).
//! - `.m:<ID><random>`, `.d:…`: temporary files of atomic writes; never
//!   items.
//!
//! A message is queued when its item is whole and its body has the size
//! the item records. At startup ([`Spool::load`]) a crash's leftovers, all
//! puts that never got their 250, are removed: a body without any item
//! (in a queue marked as keeping items on bodies, [`MARKER_XATTR`]), an
//! item cut short ([`Item::from_file`]), and a body missing or shorter
//! than its item says. Anything else that does not read is kept and
//! reported.
//!
//! Every function here blocks; callers run them on the blocking pool.
//! Functions that add, rename or remove directory entries do not fsync the
//! directory: the caller makes them durable with one shared
//! [`crate::dirsync::DirSync`] (group commit) before telling anyone.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tambo_common::lockfile::LockFile;
use tambo_common::safeio;

use crate::item::{FileError, Item};

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    /// Test knob: every write fails as on a full disk.
    fail_writes: bool,
    /// Test knob: directory fsyncs fail while this file exists.
    fail_sync_if: Option<PathBuf>,
    /// Bytes of bodies held in memory by every [`BodyWriter`] at once.
    buffered: Arc<AtomicUsize>,
    /// New items go on their bodies ([`ITEM_XATTR`]), not in `m:` files;
    /// decided by [`Spool::load`].
    xattrs: Arc<AtomicBool>,
}

/// The extended attribute of a `d:` file that holds its message's item
/// until the item is first rewritten (an `m:` file from then on).
pub const ITEM_XATTR: &str = "user.tambo.item";

/// On the queue directory: new items in this queue are kept in
/// [`ITEM_XATTR`], so a `d:` file with neither that attribute nor an `m:`
/// is the body of a put that never finished. Without it (an older
/// tambo's queue, or one copied without its attributes) such a body is
/// kept and reported instead.
pub const MARKER_XATTR: &str = "user.tambo.queue";
const MARKER_VALUE: &[u8] = b"items on bodies";

/// Linux's limit on an extended attribute's value.
const MAX_XATTR: usize = 64 * 1024;

/// A body up to this size is kept in memory until its end and then written
/// with one create, one write and one fsync, on one trip to the blocking
/// pool: no file is created at DATA and no chunk write blocks a runtime
/// thread. Larger bodies go to their file as they stream in.
pub const BODY_IN_MEMORY: usize = 128 * 1024;

/// At most this much of all bodies being received is held in memory;
/// past it new chunks go to files. (Every byte is also counted in the
/// in-flight budget, which may be far larger: that one is mostly disk.)
pub const BODIES_IN_MEMORY: usize = 32 * 1024 * 1024;

/// The lock file inside the queue directory; whoever holds it owns the
/// queue.
pub const LOCK_FILE: &str = ".lock";

/// What loading the queue directory found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub items: Vec<Item>,
    /// Items that could not be read: left on disk, reported.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Bodies without an item and stale temp files, removed.
    pub removed_orphans: usize,
    /// New items a crash cut short (never acknowledged), removed.
    pub torn: usize,
}

impl Spool {
    /// Opens the queue directory, creating it (mode 0700, fsync'd into its
    /// parent) if needed. Nothing in it is read or changed: call
    /// [`Spool::lock`] first, and [`Spool::load`] once the sockets are
    /// bound.
    pub fn open(dir: &Path, fail_writes: bool) -> io::Result<Self> {
        safeio::create_dir_all_durable(dir, 0o700)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            fail_writes,
            fail_sync_if: None,
            buffered: Arc::default(),
            xattrs: Arc::default(),
        })
    }

    /// Test knob: directory fsyncs fail while `path` exists.
    pub fn fail_sync_if(mut self, path: Option<PathBuf>) -> Self {
        self.fail_sync_if = path;
        self
    }

    /// Takes the queue's exclusive lock, held until the returned value is
    /// dropped: a second queued on the same data dir refuses to start
    /// instead of cleaning up files the first one is writing.
    pub fn lock(&self) -> io::Result<LockFile> {
        LockFile::acquire(&self.dir.join(LOCK_FILE))
    }

    pub fn item_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("m:{id}"))
    }

    pub fn body_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("d:{id}"))
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.fail_writes {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (testing.fail_queue_writes)",
            ));
        }
        Ok(())
    }

    /// Starts the body of a new message. Nothing is created on disk yet:
    /// see [`BODY_IN_MEMORY`].
    pub fn create_body(&self, id: &str) -> io::Result<BodyWriter> {
        self.check_writable()?;
        Ok(BodyWriter {
            path: self.body_path(id),
            held: Vec::new(),
            file: None,
            buffered: self.buffered.clone(),
        })
    }

    /// Rewrites an item atomically (temp, fsync, rename); durable once the
    /// directory is synced. For an item that exists: a new one is
    /// [`Spool::write_new_item`].
    pub fn stage_item(&self, item: &Item) -> io::Result<()> {
        self.check_writable()?;
        safeio::replace(&self.item_path(&item.id), &item.to_json(), 0o600)
    }

    /// Makes a new message durable: its body (what `writer` holds, or the
    /// `d:` file already there when `writer` is None) and its item, with
    /// the body's size recorded in it. The item goes on the body, as its
    /// [`ITEM_XATTR`] attribute, so a message is one file and one fsync;
    /// where the file system keeps no attributes (or this one is too
    /// large) it is an `m:` file, written under its own name and fsync'd
    /// too. `named` is called once every name exists, before the fsyncs:
    /// where the directory's sync can start, alongside them; if it fails,
    /// so does this. Durable once the directory is synced too. On failure
    /// the caller removes what is left ([`Spool::unlink`]).
    ///
    /// No temp file and no rename for a new item (a rename after the
    /// fsync would dirty the directory again, a second journal commit to
    /// wait for): until the put answers, a half-written one is one nobody
    /// was told about, and [`Spool::load`] tells a crash's leftovers
    /// apart at the next start.
    pub fn write_new(
        &self,
        writer: Option<BodyWriter>,
        item: &mut Item,
        named: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        self.check_writable()?;
        let body = match writer {
            Some(w) => w.into_file()?,
            None => File::open(self.body_path(&item.id))?,
        };
        item.body_len = Some(body.metadata()?.len());
        if self.items_in_xattrs() {
            let set = rustix::fs::fsetxattr(
                &body,
                ITEM_XATTR,
                &item.to_compact_json(),
                rustix::fs::XattrFlags::CREATE,
            );
            if set.is_ok() {
                named()?;
                return body.sync_all();
            }
        }
        let path = self.item_path(&item.id);
        // If this fails nothing was created: the name is somebody else's.
        let mut f = create_private(&path)?;
        let written = f
            .write_all(&item.to_json())
            .and_then(|()| named())
            .and_then(|()| body.sync_all())
            .and_then(|()| f.sync_all());
        if written.is_err()
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::error!(id = %item.id, "cannot remove the item whose write failed: {e}");
        }
        written
    }

    /// Puts `prefix` (header fields) on top of the body `id`, rewriting it
    /// atomically: temp file, copy, fsync, rename. Durable once the
    /// directory is synced (the item's write does it).
    pub fn prepend(&self, id: &str, prefix: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        let path = self.body_path(id);
        let tmp = safeio::temp_path(&path)?;
        let written = (|| {
            let mut src = File::open(&path)?;
            let mut f = create_private(&tmp)?;
            f.write_all(prefix)?;
            io::copy(&mut src, &mut f)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Opens a message body read-only, to hand to deliverd.
    pub fn open_body(&self, id: &str) -> io::Result<File> {
        File::open(self.body_path(id))
    }

    /// Removes a message: its body, then its item file if it has one.
    /// The body goes first because it may carry the item's first version
    /// ([`ITEM_XATTR`]): a crash in between leaves an `m:` without its
    /// body, removed at startup (it records the body's size), never a body
    /// whose stale first item would come back. Durable once the directory
    /// is synced.
    pub fn unlink(&self, id: &str) -> io::Result<()> {
        for path in [self.body_path(id), self.item_path(id)] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// fsyncs the queue directory.
    pub fn sync_dir(&self) -> io::Result<()> {
        if self.fail_sync_if.as_deref().is_some_and(Path::exists) {
            return Err(io::Error::other(
                "input/output error (testing.fail_dir_sync_if_exists)",
            ));
        }
        safeio::fsync_dir(&self.dir)
    }

    /// Loads every item; removes orphan bodies and temp files; decides
    /// where new items go ([`Spool::items_in_xattrs`]).
    pub fn load(&self) -> io::Result<Loaded> {
        let mut loaded = Loaded::default();
        // Only the lock holder may clean: a second queued must never
        // delete what the first is writing.
        let marked = self.marked();
        let mut bodies = Vec::new();
        let mut items = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if let Some(id) = name.strip_prefix("m:") {
                let read = std::fs::read(&path)
                    .map_err(|e| FileError::Bad(e.to_string()))
                    .and_then(|b| Item::from_file(&b));
                // Kept or removed, its body goes with it.
                self.take(id, &path, read, &mut loaded);
                items.insert(id.to_string());
            } else if let Some(id) = name.strip_prefix("d:") {
                bodies.push((id.to_string(), path));
            } else if name.starts_with(".m:") || name.starts_with(".d:") {
                // A temporary item, or a body rewrite (DKIM signing, added
                // headers) a crash interrupted: the rename never happened,
                // so the real file is whole without it.
                let _ = std::fs::remove_file(&path);
                loaded.removed_orphans += 1;
            }
        }
        let mut buf = vec![0u8; MAX_XATTR];
        let mut unexplained = 0;
        for (id, path) in bodies {
            if items.contains(&id) {
                continue;
            }
            // No `m:`: the item, if any, is on the body.
            let read = match rustix::fs::getxattr(&path, ITEM_XATTR, &mut buf[..]) {
                Ok(n) => Item::from_file(&buf[..n]),
                Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::NOTSUP => {
                    if marked {
                        // A put that never got its 250, or its item a
                        // crash kept from the disk.
                        let _ = std::fs::remove_file(&path);
                        loaded.removed_orphans += 1;
                    } else {
                        // Before this queue kept items on bodies (an older
                        // tambo's crash), or copied without its extended
                        // attributes: nothing tells which, so nothing is
                        // deleted.
                        unexplained += 1;
                        loaded.unreadable.push((
                            path,
                            format!("a message body without its item (no m:{id} file, no {ITEM_XATTR} attribute): if this queue was copied without its extended attributes, copy it again with them (cp -a, rsync -aX); otherwise it is the body of a message that never got a 250, and can be deleted"),
                        ));
                    }
                    continue;
                }
                Err(e) => Err(FileError::Bad(format!(
                    "cannot read its {ITEM_XATTR} attribute: {e}"
                ))),
            };
            self.take(&id, &path, read, &mut loaded);
        }
        let in_xattrs = marked || (unexplained == 0 && self.mark());
        self.xattrs.store(in_xattrs, Ordering::SeqCst);
        loaded.items.sort_by_key(|i| i.created_ms);
        Ok(loaded)
    }

    /// Files a loaded item, from `path` (its `m:` file, or its `d:` file's
    /// attribute): whole beside its body, it is loaded; a crash's
    /// leftovers are removed with a log line; anything else is kept and
    /// reported with its body.
    fn take(&self, id: &str, path: &Path, read: Result<Item, FileError>, loaded: &mut Loaded) {
        match read {
            Ok(item) if item.id == id => match self.body_state(&item) {
                BodyState::Whole => loaded.items.push(item),
                BodyState::Short(size) => {
                    tracing::warn!(
                        "{}: an item whose body is {} bytes of the {} it records: a put a crash cut short (its message never got a 250): removed with its body",
                        path.display(),
                        size.map_or_else(|| "missing, 0".to_string(), |s| s.to_string()),
                        item.body_len.unwrap_or_default(),
                    );
                    let _ = std::fs::remove_file(path);
                    let _ = std::fs::remove_file(self.body_path(id));
                    loaded.torn += 1;
                }
                BodyState::Other(why) => loaded.unreadable.push((path.to_path_buf(), why)),
            },
            Ok(_) => loaded
                .unreadable
                .push((path.to_path_buf(), "item id does not match its file".into())),
            Err(FileError::Bad(e)) => loaded.unreadable.push((path.to_path_buf(), e)),
            Err(FileError::Torn) => {
                tracing::warn!(
                    "{}: the start of a new item a crash cut short (its message never got a 250): removed with its body",
                    path.display()
                );
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(self.body_path(id));
                loaded.torn += 1;
            }
        }
    }

    /// Whether the queue directory says its new items are kept on their
    /// bodies ([`MARKER_XATTR`]).
    fn marked(&self) -> bool {
        let mut buf = [0u8; 64];
        matches!(rustix::fs::getxattr(&self.dir, MARKER_XATTR, &mut buf[..]), Ok(n) if buf[..n] == *MARKER_VALUE)
    }

    /// Marks the queue directory so; false if the file system keeps no
    /// extended attributes (new items are then `m:` files).
    fn mark(&self) -> bool {
        let set = rustix::fs::setxattr(
            &self.dir,
            MARKER_XATTR,
            MARKER_VALUE,
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(io::Error::from)
        .and_then(|()| safeio::fsync_dir(&self.dir));
        match set {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "{}: cannot keep new items on their bodies ({e}): each gets an m: file",
                    self.dir.display()
                );
                false
            }
        }
    }

    /// Whether new items are kept on their bodies ([`ITEM_XATTR`]); decided
    /// by [`Spool::load`].
    pub fn items_in_xattrs(&self) -> bool {
        self.xattrs.load(Ordering::SeqCst)
    }

    /// Whether the body of a whole item is there as the item says. The
    /// put writes and fsyncs the two at once and answers only once both
    /// are durable, so a crash can leave a whole item beside a body that
    /// is missing or short, never one that is longer: that one (or a
    /// missing body under an item that records no size) is kept for the
    /// operator.
    fn body_state(&self, item: &Item) -> BodyState {
        let size = std::fs::metadata(self.body_path(&item.id))
            .ok()
            .map(|m| m.len());
        match (item.body_len, size) {
            (None, Some(_)) => BodyState::Whole,
            (None, None) => BodyState::Other("its body d: file is missing".into()),
            (Some(want), Some(got)) if got == want => BodyState::Whole,
            (Some(want), Some(got)) if got > want => BodyState::Other(format!(
                "its body d: file is {got} bytes, more than the {want} the item records"
            )),
            (Some(_), size) => BodyState::Short(size),
        }
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

enum BodyState {
    Whole,
    /// Missing (`None`) or shorter than the item says: the put's body
    /// was not durable yet when it crashed.
    Short(Option<u64>),
    /// Anything else: kept, reported with this.
    Other(String),
}

/// Creates a file only queued may read, failing if the name is taken:
/// queue files are never opened over something already there.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// A body being written: in memory while it is small (and the memory
/// budget allows), then in its file. Whatever it holds in memory is
/// counted in [`BODIES_IN_MEMORY`] and, by the session, in the in-flight
/// byte budget, so a hostile smtpd cannot pin more than those.
pub struct BodyWriter {
    path: PathBuf,
    held: Vec<u8>,
    file: Option<File>,
    buffered: Arc<AtomicUsize>,
}

impl BodyWriter {
    /// Keeps `data` in memory if the body is still small and the memory
    /// budget allows; false if it must go to the file ([`write`], which
    /// touches the disk: off the runtime's threads).
    ///
    /// [`write`]: BodyWriter::write
    pub fn hold(&mut self, data: &[u8]) -> bool {
        if self.file.is_some() || self.held.len() + data.len() > BODY_IN_MEMORY {
            return false;
        }
        let total = self.buffered.fetch_add(data.len(), Ordering::Relaxed) + data.len();
        if total > BODIES_IN_MEMORY {
            self.buffered.fetch_sub(data.len(), Ordering::Relaxed);
            return false;
        }
        // Exactly what is counted: no doubling growth beyond the budget.
        self.held.reserve_exact(data.len());
        self.held.extend_from_slice(data);
        true
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.hold(data) {
            return Ok(());
        }
        self.file()?.write_all(data)
    }

    /// The body's file, created and given what was held in memory.
    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let mut file = create_private(&self.path)?;
            self.file = Some(match file.write_all(&self.held) {
                Ok(()) => file,
                Err(e) => {
                    drop(file);
                    let _ = std::fs::remove_file(&self.path);
                    return Err(e);
                }
            });
            self.release();
        }
        Ok(self.file.as_mut().expect("just created"))
    }

    fn release(&mut self) {
        self.buffered.fetch_sub(self.held.len(), Ordering::Relaxed);
        self.held = Vec::new();
    }

    /// Puts the whole body in its file, not synced: for the steps that
    /// read it back by path and rewrite it (signing, the checks).
    pub fn close(mut self) -> io::Result<()> {
        self.file().map(drop)
    }

    /// The body's file with the whole body in it, not synced: see
    /// [`Spool::write_new`].
    fn into_file(mut self) -> io::Result<File> {
        self.file()?;
        self.file
            .take()
            .ok_or_else(|| io::Error::other("the body's file is gone"))
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests;
