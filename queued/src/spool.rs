//! The queue directory on disk.
//!
//! - `d:<ID>`: the message (headers added by smtpd, CRLF line ends),
//!   written as it streams in (or at its end, from memory, when small),
//!   usually into an empty file made ready with a durable name
//!   ([`Spool::make_ready`]).
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
//! the item records; what a crash can leave, and what startup does with
//! it, is the table in [`load`].
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
use std::sync::atomic::{AtomicUsize, Ordering};

use tambo_common::lockfile::LockFile;
use tambo_common::safeio;

use crate::item::Item;

mod load;

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    /// Test knob: every write fails as on a full disk.
    fail_writes: bool,
    /// Test knob: directory fsyncs fail while this file exists.
    fail_sync_if: Option<PathBuf>,
    /// Bytes of bodies held in memory by every [`BodyWriter`] at once.
    buffered: Arc<AtomicUsize>,
    /// Test knob: how long each directory fsync takes at least.
    #[cfg(test)]
    pub sync_delay: Option<std::time::Duration>,
}

/// The extended attribute of a `d:` file that holds its message's item
/// until the item is first rewritten (an `m:` file from then on).
pub const ITEM_XATTR: &str = "user.tambo.item";

/// Where bodies without an item are moved at startup: see [`load`].
pub const ORPHANS_DIR: &str = "orphans";

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
            #[cfg(test)]
            sync_delay: None,
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
        self.body_writer(id, false)
    }

    /// Starts the body of a new message in the empty `d:` file
    /// [`Spool::make_ready`] made for `id`, whose name is durable already:
    /// the put then needs no directory sync of its own.
    pub fn ready_body(&self, id: &str) -> io::Result<BodyWriter> {
        self.body_writer(id, true)
    }

    fn body_writer(&self, id: &str, ready: bool) -> io::Result<BodyWriter> {
        self.check_writable()?;
        Ok(BodyWriter {
            path: self.body_path(id),
            held: Vec::new(),
            file: None,
            ready,
            buffered: self.buffered.clone(),
        })
    }

    /// Creates an empty `d:` file for each of `ids`, to be filled by
    /// [`Spool::ready_body`] once the directory is synced: the name's
    /// creation and its directory fsync then happen before a message
    /// needs them, not while its client waits. Returns the IDs whose file
    /// was made. An empty `d:` without an item is never a message: one
    /// left unused is removed at the next start.
    pub fn make_ready(&self, ids: Vec<String>) -> Vec<String> {
        if self.check_writable().is_err() {
            return Vec::new();
        }
        ids.into_iter()
            .filter(|id| create_private(&self.body_path(id)).is_ok())
            .collect()
    }

    /// Rewrites an item atomically to its `m:` file (temp, fsync, rename),
    /// which from then on is the one that counts; durable once the
    /// directory is synced. For an item that exists: a new one is
    /// [`Spool::write_new`].
    pub fn stage_item(&self, item: &Item) -> io::Result<()> {
        self.check_writable()?;
        // Marked as a rewrite: its message got its 250 long ago, so a
        // body found short under it is damage, never a put's leftover.
        let rewrite = Item {
            rewritten: true,
            ..item.clone()
        };
        safeio::replace(&self.item_path(&item.id), &rewrite.to_json()?, 0o600)
    }

    /// Makes a new message durable: its body (what `writer` holds, or the
    /// `d:` file already there when `writer` is None) and its item, with
    /// the body's size recorded in it. The item goes on the body, as its
    /// [`ITEM_XATTR`] attribute, so a message is one file and one fsync;
    /// where the file system keeps no attributes (or this one is too
    /// large) it is an `m:` file, written under its own name and fsync'd
    /// too. `named` is called once every name exists, before the fsyncs,
    /// if a name was made that the directory must make durable (not for
    /// a body in a file [`Spool::make_ready`] made, with its item on it):
    /// where the directory's sync can start, alongside them; what it
    /// returns is returned, and if it fails, so does this. Durable once
    /// the directory is synced too, if `named` was called. On failure the
    /// caller removes what is left ([`Spool::unlink`]).
    ///
    /// No temp file and no rename for a new item (a rename after the
    /// fsync would dirty the directory again, a second journal commit to
    /// wait for): until the put answers, a half-written one is one nobody
    /// was told about, and [`Spool::load`] tells a crash's leftovers
    /// apart at the next start.
    pub fn write_new<T>(
        &self,
        writer: Option<BodyWriter>,
        item: &mut Item,
        named: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        self.check_writable()?;
        // A body rewritten by signing or the checks took its name by a
        // rename, which the directory must make durable.
        let (body, named_before) = match writer {
            Some(w) => {
                let ready = w.ready();
                (w.into_file()?, ready)
            }
            None => (File::open(self.body_path(&item.id))?, false),
        };
        item.body_len = Some(body.metadata()?.len());
        // Refused where attributes are not kept or this one is too large
        // for them (ext4: about 4 KiB): then an m: file.
        let on_body = rustix::fs::fsetxattr(
            &body,
            ITEM_XATTR,
            &item.to_compact_json()?,
            rustix::fs::XattrFlags::CREATE,
        );
        if on_body.is_ok() {
            let named = if named_before { None } else { Some(named()?) };
            body.sync_all()?;
            return Ok(named);
        }
        let path = self.item_path(&item.id);
        let json = item.to_json()?;
        // If this fails nothing was created: the name is somebody else's.
        let mut f = create_private(&path)?;
        let written = f.write_all(&json).and_then(|()| {
            let named = named()?;
            body.sync_all()?;
            f.sync_all()?;
            Ok(Some(named))
        });
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
        #[cfg(test)]
        if let Some(d) = self.sync_delay {
            std::thread::sleep(d);
        }
        if self.fail_sync_if.as_deref().is_some_and(Path::exists) {
            return Err(io::Error::other(
                "input/output error (testing.fail_dir_sync_if_exists)",
            ));
        }
        safeio::fsync_dir(&self.dir)
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
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
/// counted in [`BODIES_IN_MEMORY`] until it is written out or dropped,
/// and, by the session, in the in-flight byte budget while it is
/// received, so a hostile smtpd cannot pin more than those.
pub struct BodyWriter {
    path: PathBuf,
    held: Vec<u8>,
    file: Option<File>,
    /// Its file exists, empty, under a durable name ([`Spool::make_ready`]).
    ready: bool,
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
            let mut file = if self.ready {
                OpenOptions::new().write(true).open(&self.path)?
            } else {
                create_private(&self.path)?
            };
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

    /// Whether its file's name was made durable before the message came.
    fn ready(&self) -> bool {
        self.ready
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests;
