//! The queue directory on disk.
//!
//! - `d:<ID>`: the message body (headers added by smtpd, CRLF line ends),
//!   written as it streams in and fsync'd before the item exists.
//! - `m:<ID>`: the item (envelope and recipient state), written atomically
//!   (temp + fsync + rename + directory fsync). Its presence is what makes
//!   a message queued: a `d:` file without its `m:` is a put that never got
//!   its 250, and is removed at startup.
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

use tambo_common::lockfile::LockFile;
use tambo_common::safeio;

use crate::item::Item;

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    /// Test knob: every write fails as on a full disk.
    fail_writes: bool,
    /// Test knob: directory fsyncs fail while this file exists.
    fail_sync_if: Option<PathBuf>,
}

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

    /// Starts a body file for a new message.
    pub fn create_body(&self, id: &str) -> io::Result<BodyWriter> {
        self.check_writable()?;
        let path = self.body_path(id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(BodyWriter { file })
    }

    /// Writes an item atomically (temp, fsync, rename); durable once the
    /// directory is synced.
    pub fn stage_item(&self, item: &Item) -> io::Result<()> {
        self.check_writable()?;
        safeio::replace(&self.item_path(&item.id), &item.to_json(), 0o600)
    }

    /// The first half of [`Spool::stage_item`]: the item written and
    /// fsync'd under a temporary name (never loaded as an item), returned.
    pub fn write_item(&self, item: &Item) -> io::Result<PathBuf> {
        self.check_writable()?;
        safeio::write_temp(&self.item_path(&item.id), &item.to_json(), 0o600)
    }

    /// The second half: the written item takes its name. Durable once the
    /// directory is synced.
    pub fn commit_item(&self, staged: &Path, id: &str) -> io::Result<()> {
        std::fs::rename(staged, self.item_path(id)).inspect_err(|_| self.discard_item(staged))
    }

    /// Removes an item written by [`Spool::write_item`] that will not be
    /// committed.
    pub fn discard_item(&self, staged: &Path) {
        let _ = std::fs::remove_file(staged);
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
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
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
                    .map_err(|e| e.to_string())
                    .and_then(|b| Item::from_json(&b))
                {
                    Ok(item) if item.id == id && self.body_path(id).exists() => {
                        items.insert(id.to_string());
                        loaded.items.push(item);
                    }
                    Ok(_) => {
                        items.insert(id.to_string());
                        loaded.unreadable.push((
                            path,
                            "item id does not match its file, or its body d: file is missing"
                                .into(),
                        ));
                    }
                    Err(e) => {
                        items.insert(id.to_string());
                        loaded.unreadable.push((path, e));
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

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A body being written. Unbuffered: smtpd sends it in 64 KiB chunks, each
/// one write, and a session in DATA holds no buffer of its own here (a
/// buffer per session would be memory a hostile smtpd could pin outside
/// the in-flight byte budget).
pub struct BodyWriter {
    file: File,
}

impl BodyWriter {
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)
    }

    /// fsyncs the body. After this it is durable, but still not an item
    /// until `write_item`.
    pub fn finish(self) -> io::Result<()> {
        self.file.sync_all()
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
        }
    }

    #[test]
    fn a_written_item_is_an_item_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        spool.create_body("x").unwrap().finish().unwrap();
        let staged = spool.write_item(&item("x")).unwrap();
        // A crash here: no item, and both files are cleaned up.
        let crashed = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), crashed.path().join(f.file_name())).unwrap();
        }
        let loaded = Spool::open(crashed.path(), false).unwrap().load().unwrap();
        assert!(loaded.items.is_empty());
        assert_eq!(loaded.removed_orphans, 2);
        // Committed, it loads.
        spool.commit_item(&staged, "x").unwrap();
        let loaded = spool.load().unwrap();
        assert_eq!(loaded.items, vec![item("x")]);
        assert_eq!(loaded.removed_orphans, 0);
        // One that is discarded leaves nothing behind.
        let staged = spool.write_item(&item("y")).unwrap();
        spool.discard_item(&staged);
        assert!(!staged.exists());
    }

    #[test]
    fn prepending_rewrites_the_body_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), false).unwrap();
        let mut w = spool.create_body("m1").unwrap();
        w.write(b"Received: x\r\n\r\nbody\r\n").unwrap();
        drop(w);
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
        b.finish().unwrap();
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
        s.create_body("orphan").unwrap().finish().unwrap();
        std::fs::write(dir.path().join(".m:x123"), b"tmp").unwrap();
        std::fs::write(dir.path().join("m:bad"), b"{garbage").unwrap();
        std::fs::write(dir.path().join("d:bad"), b"body").unwrap();
        let loaded = s.load().unwrap();
        assert!(loaded.items.is_empty());
        assert_eq!(loaded.unreadable.len(), 1);
        assert_eq!(loaded.removed_orphans, 2);
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
