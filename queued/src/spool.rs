//! The queue directory on disk.
//!
//! - `d:<ID>`: the message body (headers added by smtpd, CRLF line ends),
//!   written as it streams in (or at its end, from memory, when small)
//!   and fsync'd before the item exists.
//! - `m:<ID>`: the item (envelope, recipient state and the body's size,
//!   JSON). A new one is written under its name and fsync'd while the
//!   body's fsync runs, then the directory; a rewrite is atomic (temp +
//!   fsync + rename + directory fsync). A whole item beside a body of the
//!   size it records is what makes a message queued: a `d:` file without
//!   its `m:` is a put that never got its 250, and so is an `m:` a crash
//!   cut short ([`Item::from_file`]) or one whose body is missing or
//!   short; they are removed at startup.
//! - `.m:<ID><random>`: temporary files of atomic writes; never items.
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
}

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
            len: 0,
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

    /// Writes a new item under its own name and fsyncs it; durable once
    /// the directory is synced. The body may still be on its way to the
    /// disk: the item records its size ([`Item::body_len`]) so a crash
    /// before both are durable is told apart at startup. No temp file and
    /// no rename (a rename after the fsync would dirty the directory
    /// again, a second journal commit to wait for): until the put
    /// answers, a half-written item is one nobody was told about, and
    /// [`Item::from_file`] tells a crash's leftovers apart at the next
    /// start. On failure the file is removed (the caller makes that
    /// durable). `written` is called between the write and the fsync:
    /// where the directory's sync can start, alongside; if it fails, so
    /// does this.
    pub fn write_new_item(
        &self,
        item: &Item,
        written: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        self.check_writable()?;
        let path = self.item_path(&item.id);
        // If this fails nothing was created: the name is somebody else's.
        let mut f = create_private(&path)?;
        let written = f
            .write_all(&item.to_json())
            .and_then(|()| written())
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

    /// fsyncs a body written earlier (one that no rewrite synced).
    pub fn sync_body(&self, id: &str) -> io::Result<()> {
        File::open(self.body_path(id))?.sync_all()
    }

    /// Opens a message body read-only, to hand to deliverd.
    pub fn open_body(&self, id: &str) -> io::Result<File> {
        File::open(self.body_path(id))
    }

    /// Removes an item, then its body; the item goes first so a crash in
    /// between leaves an orphan body (cleaned at startup), never an item
    /// without its body. Durable once the directory is synced.
    pub fn unlink(&self, id: &str) -> io::Result<()> {
        match std::fs::remove_file(self.item_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let _ = std::fs::remove_file(self.body_path(id));
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

    /// Loads every item; removes orphan bodies and temp files.
    pub fn load(&self) -> io::Result<Loaded> {
        let mut loaded = Loaded::default();
        // Only the lock holder may clean: a second queued must never
        // delete what the first is writing.
        let mut bodies = Vec::new();
        let mut items = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if let Some(id) = name.strip_prefix("m:") {
                match std::fs::read(&path)
                    .map_err(|e| FileError::Bad(e.to_string()))
                    .and_then(|b| Item::from_file(&b))
                {
                    Ok(item) if item.id == id => match self.body_state(&item) {
                        BodyState::Whole => {
                            items.insert(id.to_string());
                            loaded.items.push(item);
                        }
                        // Its body, if any, goes with the orphans below.
                        BodyState::Short(size) => {
                            tracing::warn!(
                                "{}: an item whose body is {} bytes of the {} it records: a put a crash cut short (its message never got a 250): removed with its body",
                                path.display(),
                                size.map_or_else(|| "missing, 0".to_string(), |s| s.to_string()),
                                item.body_len.unwrap_or_default(),
                            );
                            let _ = std::fs::remove_file(&path);
                            loaded.torn += 1;
                        }
                        BodyState::Other(why) => {
                            items.insert(id.to_string());
                            loaded.unreadable.push((path, why));
                        }
                    },
                    Ok(_) => {
                        items.insert(id.to_string());
                        loaded
                            .unreadable
                            .push((path, "item id does not match its file".into()));
                    }
                    Err(FileError::Bad(e)) => {
                        items.insert(id.to_string());
                        loaded.unreadable.push((path, e));
                    }
                    // Its body, if any, goes with the orphans below.
                    Err(FileError::Torn) => {
                        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                        tracing::warn!(
                            "{}: the start of a new item a crash cut short ({size} bytes; its message never got a 250): removed with its body",
                            path.display()
                        );
                        let _ = std::fs::remove_file(&path);
                        loaded.torn += 1;
                    }
                }
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
        for (id, path) in bodies {
            if !items.contains(&id) {
                let _ = std::fs::remove_file(&path);
                loaded.removed_orphans += 1;
            }
        }
        loaded.items.sort_by_key(|i| i.created_ms);
        Ok(loaded)
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
    /// Bytes written so far, held or in the file.
    len: u64,
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
        self.len += data.len() as u64;
        true
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.hold(data) {
            return Ok(());
        }
        self.file()?.write_all(data)?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// The body's size once it is all written: what its item records.
    pub fn size(&self) -> u64 {
        self.len
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

    /// Writes out what is held and fsyncs the body. After this it is
    /// durable, but still not a queued message until its item is too.
    /// `written` is called once the file has the whole body, before the
    /// fsync: the item can be written then, alongside.
    pub fn finish(mut self, written: impl FnOnce()) -> io::Result<()> {
        self.file()?;
        written();
        self.file()?.sync_all()
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::{FORMAT_VERSION, Item};

    fn item(id: &str) -> Item {
        Item {
            version: FORMAT_VERSION,
            id: id.into(),
            from: "a@b".into(),
            rcpt_to: vec!["c@d".into()],
            created_ms: 5,
            client: "local".into(),
            recipients: vec![],
            body_len: None,
        }
    }

    #[test]
    fn an_item_beside_a_body_a_crash_cut_short_is_removed() {
        let body = b"Subject: x\r\n\r\nbody\r\n";
        let with_len = |id: &str, n: Option<u64>| Item {
            body_len: n,
            ..item(id)
        };
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let put = |it: &Item, body: Option<&[u8]>| {
            spool.write_new_item(it, || Ok(())).unwrap();
            if let Some(b) = body {
                std::fs::write(spool.body_path(&it.id), b).unwrap();
            }
        };
        let n = Some(body.len() as u64);
        // The item and its body are fsync'd at once: a crash can leave a
        // whole item and a body missing or cut anywhere.
        put(&with_len("whole", n), Some(body));
        put(&with_len("missing", n), None);
        put(&with_len("empty", n), Some(b""));
        put(&with_len("short", n), Some(&body[..body.len() - 1]));
        // Never what a crash leaves: kept for the operator.
        put(&with_len("longer", Some(3)), Some(body));
        put(&with_len("old", None), None);
        put(&with_len("old-whole", None), Some(body));
        let loaded = spool.load().unwrap();
        let mut ids: Vec<_> = loaded.items.iter().map(|i| i.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["old-whole", "whole"]);
        assert_eq!(loaded.torn, 3);
        // The bodies of "empty" and "short".
        assert_eq!(loaded.removed_orphans, 2);
        let mut kept: Vec<_> = loaded
            .unreadable
            .iter()
            .map(|(p, why)| {
                (
                    p.file_name().unwrap().to_str().unwrap().to_string(),
                    why.clone(),
                )
            })
            .collect();
        kept.sort();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert_eq!(kept[0].0, "m:longer");
        assert!(kept[0].1.contains("more than the 3"), "{kept:?}");
        assert_eq!(kept[1].0, "m:old");
        assert!(kept[1].1.contains("missing"), "{kept:?}");
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "d:longer",
                "d:old-whole",
                "d:whole",
                "m:longer",
                "m:old",
                "m:old-whole",
                "m:whole"
            ]
        );
    }

    #[test]
    fn a_new_item_cut_short_by_a_crash_is_removed_with_its_body() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        // A small body is only in memory until its end: nothing on disk.
        let mut w = spool.create_body("x").unwrap();
        w.write(b"Subject: x\r\n\r\nbody\r\n").unwrap();
        assert!(!spool.body_path("x").exists());
        w.finish(|| {}).unwrap();
        assert!(spool.body_path("x").exists());
        spool.write_new_item(&item("x"), || Ok(())).unwrap();
        let whole = std::fs::read(spool.item_path("x")).unwrap();
        // Each cut a crash could leave: nothing loads, nothing is kept
        // for the operator, both files go.
        for cut in [0, 1, whole.len() / 2, whole.len() - 2] {
            let crashed = tempfile::tempdir().unwrap();
            std::fs::copy(spool.body_path("x"), crashed.path().join("d:x")).unwrap();
            std::fs::write(crashed.path().join("m:x"), &whole[..cut]).unwrap();
            let loaded = Spool::open(crashed.path(), false).unwrap().load().unwrap();
            assert!(loaded.items.is_empty(), "cut {cut}");
            assert!(loaded.unreadable.is_empty(), "cut {cut}");
            assert_eq!((loaded.torn, loaded.removed_orphans), (1, 1), "cut {cut}");
            assert_eq!(std::fs::read_dir(crashed.path()).unwrap().count(), 0);
        }
        // Whole, it loads; a second write of the same ID is refused.
        let loaded = spool.load().unwrap();
        assert_eq!(loaded.items, vec![item("x")]);
        assert_eq!((loaded.torn, loaded.removed_orphans), (0, 0));
        assert!(spool.write_new_item(&item("x"), || Ok(())).is_err());
        assert_eq!(std::fs::read(spool.item_path("x")).unwrap(), whole);
    }

    #[test]
    fn bodies_stay_in_memory_only_while_small_and_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let mut big = spool.create_body("big").unwrap();
        big.write(&vec![b'a'; BODY_IN_MEMORY]).unwrap();
        assert!(!spool.body_path("big").exists());
        assert!(!big.hold(b"b"), "one byte more is too much");
        big.write(b"b").unwrap();
        assert!(
            spool.body_path("big").exists(),
            "past the size: to its file"
        );
        assert_eq!(spool.buffered.load(Ordering::Relaxed), 0);
        big.finish(|| {}).unwrap();
        assert_eq!(
            std::fs::metadata(spool.body_path("big")).unwrap().len(),
            BODY_IN_MEMORY as u64 + 1
        );
        // With the budget spent elsewhere, even a small body goes to disk.
        spool.buffered.store(BODIES_IN_MEMORY, Ordering::Relaxed);
        let mut small = spool.create_body("small").unwrap();
        assert!(!small.hold(b"x"));
        small.write(b"x").unwrap();
        assert!(spool.body_path("small").exists());
        spool.buffered.store(0, Ordering::Relaxed);
        // What a writer held is given back when it goes, used or not.
        let mut dropped = spool.create_body("dropped").unwrap();
        dropped.write(b"held").unwrap();
        assert_eq!(spool.buffered.load(Ordering::Relaxed), 4);
        drop(dropped);
        assert_eq!(spool.buffered.load(Ordering::Relaxed), 0);
        assert!(!spool.body_path("dropped").exists());
    }

    #[test]
    fn prepending_rewrites_the_body_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let mut w = spool.create_body("m1").unwrap();
        w.write(b"Received: x\r\n\r\nbody\r\n").unwrap();
        w.close().unwrap();
        spool.prepend("m1", b"X-Spam: 0\r\n").unwrap();
        assert_eq!(
            std::fs::read(spool.body_path("m1")).unwrap(),
            b"X-Spam: 0\r\nReceived: x\r\n\r\nbody\r\n"
        );
        // No temp file (a dot file next to the body) is left behind.
        let dots = std::fs::read_dir(spool.body_path("m1").parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(dots, 0);
        spool.sync_body("m1").unwrap();
        assert!(spool.prepend("missing", b"X: y\r\n").is_err());
        // A rewrite a crash cut short is cleaned up at the next start.
        let tmp = tambo_common::safeio::temp_path(&spool.body_path("m1")).unwrap();
        std::fs::write(&tmp, b"half").unwrap();
        spool.load().unwrap();
        assert!(!tmp.exists());
    }

    #[test]
    fn put_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(&dir.path().join("queue"), false).unwrap();
        let mut b = s.create_body("id1").unwrap();
        b.write(b"hello\r\n").unwrap();
        b.finish(|| {}).unwrap();
        s.stage_item(&item("id1")).unwrap();
        s.sync_dir().unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.items.len(), 1);
        s.unlink("id1").unwrap();
        assert_eq!(std::fs::read_dir(s.dir()).unwrap().count(), 0);
    }

    #[test]
    fn orphans_are_cleaned_and_bad_items_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), false).unwrap();
        s.create_body("orphan").unwrap().finish(|| {}).unwrap();
        std::fs::write(dir.path().join(".m:x123"), b"tmp").unwrap();
        // Not JSON: kept for the operator, never taken for a cut.
        std::fs::write(dir.path().join("m:bad"), b"{garbage").unwrap();
        std::fs::write(dir.path().join("d:bad"), b"body").unwrap();
        // A JSON object cut short: a new item a crash interrupted, removed.
        std::fs::write(dir.path().join("m:cut"), b"{\"version\": 1, \"id\"").unwrap();
        std::fs::write(dir.path().join("d:cut"), b"body").unwrap();
        let loaded = s.load().unwrap();
        assert!(loaded.items.is_empty());
        assert_eq!(loaded.unreadable.len(), 1);
        assert_eq!(loaded.torn, 1);
        assert_eq!(loaded.removed_orphans, 3);
        assert!(
            dir.path().join("m:bad").exists(),
            "unreadable items are never deleted"
        );
        assert!(dir.path().join("d:bad").exists());
    }

    #[test]
    fn the_queue_has_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(&dir.path().join("q"), false).unwrap();
        let held = s.lock().unwrap();
        let other = Spool::open(&dir.path().join("q"), false).unwrap();
        assert!(other.lock().is_err());
        drop(held);
        assert!(other.lock().is_ok());
        // The lock file is not an item, a body or an orphan.
        let loaded = s.load().unwrap();
        assert!(loaded.items.is_empty() && loaded.unreadable.is_empty());
        assert_eq!(loaded.removed_orphans, 0);
        assert!(dir.path().join("q").join(LOCK_FILE).exists());
    }

    #[test]
    fn full_disk_fails_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), true).unwrap();
        assert_eq!(
            s.create_body("x").err().unwrap().kind(),
            io::ErrorKind::StorageFull
        );
        assert!(s.stage_item(&item("x")).is_err());
    }
}
