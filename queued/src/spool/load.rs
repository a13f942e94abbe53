//! Reading the queue directory at startup, and what a crash can have left
//! in it.
//!
//! A message is queued when its item is whole and its body has the size
//! the item records (`body_len`): the put answers only once both are
//! durable. Every other state is judged here, by this table:
//!
//! | on disk | what it is | what happens |
//! |---|---|---|
//! | `.m:…`, `.d:…` | the temp file of an atomic write a crash interrupted | removed |
//! | item whole, body of the size it records (or none recorded) | a queued message | loaded |
//! | `m:` empty, or a JSON object that stops | a new item, written as a file, a crash cut short | removed with its body |
//! | item as first written, body missing | a put a crash cut short | removed |
//! | a rewritten item, body missing | a removal a crash interrupted (the body goes first) | removed |
//! | item as first written, body shorter than recorded | a put a crash cut short | removed with its body |
//! | a rewritten item (after an attempt), body shorter | damage: that message got its 250 long ago | kept, reported |
//! | body longer than recorded | never a crash's doing | kept, reported |
//! | attribute on the body cut short | damage: setting one is all or nothing | kept, reported |
//! | anything else that does not read (a hand edit, another version) | | kept, reported |
//! | `d:` empty, with neither an `m:` nor the attribute | a file made ready for a message that never came (`Spool::make_ready`) | removed |
//! | `d:` with content but neither an `m:` nor the attribute | a put that never got its 250; or a queue copied without its extended attributes | moved to `orphans/`, reported |
//!
//! "Removed" is only ever a put nobody was told about. The last row is
//! moved aside, not removed: nothing tells a crash's leftover from a
//! message whose attribute a copy dropped (`cp` without `-a`, `rsync`
//! without `-X`), and only the second would be mail lost.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use super::{ITEM_XATTR, MAX_XATTR, ORPHANS_DIR, Spool};
use crate::item::{FileError, Item};

/// What loading the queue directory found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub items: Vec<Item>,
    /// Items that could not be read: left on disk, reported.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Temp files of interrupted atomic writes, and empty bodies without
    /// an item (files made ready and never used), removed.
    pub removed_temp: usize,
    /// Puts a crash cut short (never acknowledged), removed.
    pub torn: usize,
    /// Rewritten items whose body was gone: removals a crash cut short,
    /// finished.
    pub removals_finished: usize,
    /// Bodies without any item, moved to `orphans/`.
    pub set_aside: usize,
}

enum Verdict {
    Load(Item),
    /// A put nobody was told about: its files go, with this log line.
    Torn(String),
    /// A removal a crash cut short: the item goes.
    Removed,
    /// Kept where it is, reported with this.
    Keep(String),
    /// A body without any item.
    Orphan,
    /// An empty body without any item: never a message.
    Unused,
}

impl Spool {
    /// Loads every item and deals with the rest by the table above.
    pub fn load(&self) -> io::Result<Loaded> {
        let mut loaded = Loaded::default();
        // Only the lock holder may clean: a second queued must never
        // touch what the first is writing.
        let mut bodies = Vec::new();
        let mut with_file = HashSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if let Some(id) = name.strip_prefix("m:") {
                with_file.insert(id.to_string());
                let verdict = match std::fs::read(&path)
                    .map_err(|e| FileError::Bad(e.to_string()))
                    .and_then(|b| Item::from_file(&b))
                {
                    Err(FileError::Torn) => {
                        Verdict::Torn("the start of a new item a crash cut short".into())
                    }
                    read => self.judge(id, read),
                };
                self.apply(id, &path, verdict, &mut loaded)?;
            } else if let Some(id) = name.strip_prefix("d:") {
                bodies.push((id.to_string(), path));
            } else if name.starts_with(".m:") || name.starts_with(".d:") {
                // A temporary item, or a body rewrite (DKIM signing, added
                // headers) a crash interrupted: the rename never happened,
                // so the real file is whole without it.
                let _ = std::fs::remove_file(&path);
                loaded.removed_temp += 1;
            }
        }
        let mut buf = vec![0u8; MAX_XATTR];
        for (id, path) in bodies {
            if with_file.contains(&id) {
                // Its m: counts (and a stale attribute, if any, does not).
                continue;
            }
            let verdict = match rustix::fs::getxattr(&path, ITEM_XATTR, &mut buf[..]) {
                Ok(n) => match Item::from_file(&buf[..n]) {
                    Err(FileError::Torn) => Verdict::Keep(format!(
                        "its {ITEM_XATTR} attribute is cut short: damaged (a crash cannot cut one)"
                    )),
                    read => self.judge(&id, read),
                },
                Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::NOTSUP => {
                    match std::fs::metadata(&path) {
                        Ok(m) if m.len() == 0 => Verdict::Unused,
                        _ => Verdict::Orphan,
                    }
                }
                Err(e) => Verdict::Keep(format!("cannot read its {ITEM_XATTR} attribute: {e}")),
            };
            self.apply(&id, &path, verdict, &mut loaded)?;
        }
        loaded.items.sort_by_key(|i| i.created_ms);
        Ok(loaded)
    }

    /// A whole item (or one that does not read) against its body.
    fn judge(&self, id: &str, read: Result<Item, FileError>) -> Verdict {
        let item = match read {
            Ok(item) if item.id == id => item,
            Ok(_) => return Verdict::Keep("item id does not match its file".into()),
            Err(FileError::Bad(e)) => return Verdict::Keep(e),
            // Each caller says what a cut one is before this.
            Err(FileError::Torn) => return Verdict::Keep("cut short".into()),
        };
        let size = std::fs::metadata(self.body_path(id)).ok().map(|m| m.len());
        match (size, item.body_len) {
            (None, _) if item.rewritten || item.body_len.is_none() => Verdict::Removed,
            (None, _) => Verdict::Torn("its body is missing".into()),
            (Some(_), None) => Verdict::Load(item),
            (Some(got), Some(want)) if got == want => Verdict::Load(item),
            (Some(got), Some(want)) if got > want => Verdict::Keep(format!(
                "its body d: file is {got} bytes, more than the {want} the item records"
            )),
            (Some(got), Some(want)) if item.rewritten => Verdict::Keep(format!(
                "its body d: file is {got} bytes of the {want} the item records: damaged"
            )),
            (Some(got), Some(want)) => Verdict::Torn(format!(
                "an item whose body is {got} bytes of the {want} it records: a put a crash cut short"
            )),
        }
    }

    fn apply(
        &self,
        id: &str,
        path: &Path,
        verdict: Verdict,
        loaded: &mut Loaded,
    ) -> io::Result<()> {
        match verdict {
            Verdict::Load(item) => loaded.items.push(item),
            Verdict::Keep(why) => loaded.unreadable.push((path.to_path_buf(), why)),
            Verdict::Torn(why) => {
                tracing::warn!(
                    "{}: {why}: a put a crash cut short (its message never got a 250): removed with its body",
                    path.display()
                );
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(self.body_path(id));
                loaded.torn += 1;
            }
            Verdict::Removed => {
                tracing::info!(
                    "{}: an item whose body is gone: the rest of a removal a crash interrupted, finished",
                    path.display()
                );
                let _ = std::fs::remove_file(path);
                loaded.removals_finished += 1;
            }
            Verdict::Unused => {
                let _ = std::fs::remove_file(path);
                loaded.removed_temp += 1;
            }
            Verdict::Orphan => match self.set_aside(id, path) {
                Ok(to) => {
                    tracing::warn!(
                        "{}: a message body without an item, moved to {}: the body of a put that never got a 250 (a crash), or of a message whose item was lost because the queue was copied without its extended attributes (copy it again with cp -a or rsync -aX); delete it once you know",
                        path.display(),
                        to.display()
                    );
                    loaded.set_aside += 1;
                }
                // Left where it is rather than stop queued from starting.
                Err(e) => loaded.unreadable.push((
                    path.to_path_buf(),
                    format!("a message body without an item, which cannot be moved to {ORPHANS_DIR}/: {e}"),
                )),
            },
        }
        Ok(())
    }

    /// Moves a body without an item to `orphans/`, under a name no other
    /// takes there (`d:<ID>`, or `d:<ID>.<n>` if that one is taken: the
    /// same copy restored twice): never over one already set aside.
    fn set_aside(&self, id: &str, path: &Path) -> io::Result<PathBuf> {
        let aside = self.dir.join(ORPHANS_DIR);
        tambo_common::safeio::create_dir_all_durable(&aside, 0o700)?;
        for n in 0..1000 {
            let name = match n {
                0 => format!("d:{id}"),
                n => format!("d:{id}.{n}"),
            };
            let to = aside.join(name);
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                path,
                rustix::fs::CWD,
                &to,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => return Ok(to),
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::other(
            "a thousand bodies set aside under that ID already",
        ))
    }
}
