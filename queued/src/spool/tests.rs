//! The queue directory's files: a new message as one file with its item
//! on it, the `m:` files of rewrites and of file systems without
//! attributes, and what a crash can leave of each.

use super::load::Loaded;
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
        rewritten: false,
    }
}

const BODY: &[u8] = b"Subject: x\r\n\r\nbody\r\n";

/// A spool on a new directory, loaded once.
fn fresh(dir: &Path) -> Spool {
    let s = Spool::open(dir, false).unwrap();
    assert!(s.load().unwrap().items.is_empty());
    s
}

/// Puts a message the way a put does; returns the item as written.
fn put(s: &Spool, id: &str, body: &[u8]) -> Item {
    let mut w = s.create_body(id).unwrap();
    w.write(body).unwrap();
    let mut it = item(id);
    let mut named = 0;
    s.write_new(Some(w), &mut it, || {
        named += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(named, 1, "the directory's sync is asked for once");
    it
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != LOCK_FILE)
        .collect();
    v.sort();
    v
}

fn on_body(s: &Spool, id: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_XATTR];
    rustix::fs::getxattr(s.body_path(id), ITEM_XATTR, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

fn set_on_body(s: &Spool, id: &str, value: &[u8]) {
    rustix::fs::setxattr(
        s.body_path(id),
        ITEM_XATTR,
        value,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

fn kept(loaded: &Loaded) -> Vec<(String, String)> {
    let mut v: Vec<_> = loaded
        .unreadable
        .iter()
        .map(|(p, why)| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                why.clone(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_new_message_is_one_file_with_its_item_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = fresh(dir.path());
    let it = put(&s, "x", BODY);
    assert_eq!(it.body_len, Some(BODY.len() as u64));
    assert_eq!(names(dir.path()), ["d:x"]);
    assert_eq!(std::fs::read(s.body_path("x")).unwrap(), BODY);
    assert_eq!(on_body(&s, "x").unwrap(), it.to_compact_json().unwrap());
    // What deliverd is handed is the message alone.
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut s.open_body("x").unwrap(), &mut got).unwrap();
    assert_eq!(got, BODY);
    let loaded = Spool::open(dir.path(), false).unwrap().load().unwrap();
    assert_eq!(loaded.items, vec![it]);
    // A second put of the same ID is refused, and leaves the first alone.
    let mut w = s.create_body("x").unwrap();
    w.write(b"other").unwrap();
    assert!(s.write_new(Some(w), &mut item("x"), || Ok(())).is_err());
    assert_eq!(std::fs::read(s.body_path("x")).unwrap(), BODY);
}

#[test]
fn a_ready_file_takes_the_message_without_a_new_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = fresh(dir.path());
    assert_eq!(s.make_ready(vec!["r".into(), "r".into()]), ["r"], "once");
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(s.body_path("r")).unwrap());
    let mut w = s.ready_body("r").unwrap();
    w.write(BODY).unwrap();
    let mut it = item("r");
    let named = s.write_new(Some(w), &mut it, || Ok(())).unwrap();
    assert!(named.is_none(), "no directory sync needed");
    let after = std::fs::metadata(s.body_path("r")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&after),
        ino,
        "the same file"
    );
    assert_eq!(names(dir.path()), ["d:r"]);
    assert_eq!(s.load().unwrap().items, vec![it]);
    // A ready file that is gone (removed by hand): the put fails.
    let mut gone = s.ready_body("gone").unwrap();
    gone.write(BODY).unwrap();
    assert!(
        s.write_new(Some(gone), &mut item("gone"), || Ok(()))
            .is_err()
    );
}

#[test]
fn a_body_already_on_disk_gets_its_item_too() {
    // Signing and the checks rewrite the body before the put.
    let dir = tempfile::tempdir().unwrap();
    let s = fresh(dir.path());
    let mut w = s.create_body("signed").unwrap();
    w.write(BODY).unwrap();
    w.close().unwrap();
    s.prepend("signed", b"DKIM-Signature: x\r\n").unwrap();
    let mut it = item("signed");
    s.write_new(None, &mut it, || Ok(())).unwrap();
    assert_eq!(it.body_len, Some(BODY.len() as u64 + 19));
    assert_eq!(names(dir.path()), ["d:signed"]);
    assert_eq!(s.load().unwrap().items, vec![it]);
}

#[test]
fn an_item_too_large_for_an_attribute_is_an_m_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = fresh(dir.path());
    let mut w = s.create_body("many").unwrap();
    w.write(BODY).unwrap();
    let mut it = item("many");
    // Past what Linux lets any file system keep in one attribute (64 KiB).
    it.rcpt_to = (0..5000).map(|i| format!("user{i}@example.org")).collect();
    assert!(it.to_compact_json().unwrap().len() > MAX_XATTR);
    s.write_new(Some(w), &mut it, || Ok(())).unwrap();
    assert_eq!(names(dir.path()), ["d:many", "m:many"]);
    assert!(on_body(&s, "many").is_none());
    assert_eq!(s.load().unwrap().items, vec![it]);
}

#[test]
fn a_body_without_an_item_is_set_aside_never_deleted() {
    // A put a crash cut before its item, or a message whose item a copy
    // of the queue dropped: nothing tells which, so it is moved aside.
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), false).unwrap();
    std::fs::write(s.body_path("lost"), BODY).unwrap();
    let loaded = s.load().unwrap();
    assert_eq!(loaded.set_aside, 1);
    assert!(loaded.items.is_empty() && loaded.unreadable.is_empty());
    assert_eq!(names(dir.path()), [ORPHANS_DIR]);
    let aside = dir.path().join(ORPHANS_DIR).join("d:lost");
    assert_eq!(std::fs::read(aside).unwrap(), BODY);
    // The next start finds nothing more to do.
    let loaded = s.load().unwrap();
    assert_eq!((loaded.set_aside, loaded.items.len()), (0, 0));
    // The same body again (the same copy restored twice): set aside
    // beside the first, never over it.
    std::fs::write(s.body_path("lost"), b"second").unwrap();
    assert_eq!(s.load().unwrap().set_aside, 1);
    let aside = dir.path().join(ORPHANS_DIR);
    assert_eq!(std::fs::read(aside.join("d:lost")).unwrap(), BODY);
    assert_eq!(std::fs::read(aside.join("d:lost.1")).unwrap(), b"second");
    // Where it cannot be moved, it stays, reported; queued still starts.
    std::fs::remove_dir_all(&aside).unwrap();
    std::fs::write(&aside, b"not a directory").unwrap();
    std::fs::write(s.body_path("stuck"), BODY).unwrap();
    let loaded = s.load().unwrap();
    assert_eq!(kept(&loaded)[0].0, "d:stuck");
    assert!(s.body_path("stuck").exists());
}

/// What a crash left: the attribute on the body, the `m:` file, the body.
type Crash<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, &'a [u8]);

#[test]
fn a_message_a_crash_cut_short_is_removed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = fresh(dir.path());
    let whole = put(&s, "x", BODY);
    let attr = on_body(&s, "x").unwrap();
    let file = whole.to_json().unwrap();
    // Every cut of an item written as an m: file; a body cut anywhere
    // under a whole first item. Nothing loads, nothing is kept for the
    // operator, nothing is left. (Setting an attribute is all or
    // nothing: a cut one is damage, below.)
    let mut crashes: Vec<Crash> = Vec::new();
    for cut in [0, 1, file.len() / 2, file.len() - 2] {
        crashes.push((None, Some(&file[..cut]), BODY));
    }
    for cut in [0, 1, BODY.len() - 1] {
        crashes.push((Some(&attr), None, &BODY[..cut]));
        crashes.push((None, Some(&file), &BODY[..cut]));
    }
    // An m: file beside no body: a removal that took the body first, and
    // was cut there; an older tambo's item (no size recorded) too.
    let no_body = Item {
        body_len: Some(9),
        rewritten: true,
        ..item("x")
    }
    .to_json()
    .unwrap();
    let old_no_body = item("y").to_json().unwrap();
    for (i, (on, m, body)) in crashes.into_iter().enumerate() {
        let crashed = tempfile::tempdir().unwrap();
        let c = fresh(crashed.path());
        std::fs::write(c.body_path("x"), body).unwrap();
        if let Some(v) = on {
            set_on_body(&c, "x", v);
        }
        if let Some(m) = m {
            std::fs::write(c.item_path("x"), m).unwrap();
        }
        let loaded = c.load().unwrap();
        assert!(loaded.items.is_empty(), "crash {i}");
        assert!(
            loaded.unreadable.is_empty(),
            "crash {i}: {:?}",
            loaded.unreadable
        );
        assert_eq!(loaded.torn, 1, "crash {i}");
        assert!(names(crashed.path()).is_empty(), "crash {i}");
    }
    let crashed = tempfile::tempdir().unwrap();
    let c = fresh(crashed.path());
    std::fs::write(c.item_path("x"), &no_body).unwrap();
    std::fs::write(c.item_path("y"), &old_no_body).unwrap();
    let loaded = c.load().unwrap();
    assert_eq!(
        (loaded.items.len(), loaded.torn, loaded.removals_finished),
        (0, 0, 2)
    );
    assert!(loaded.unreadable.is_empty());
    assert!(names(crashed.path()).is_empty());
}

#[test]
fn what_a_crash_cannot_leave_is_kept_for_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let s = fresh(dir.path());
    let longer = Item {
        body_len: Some(3),
        ..item("longer")
    };
    std::fs::write(s.body_path("longer"), BODY).unwrap();
    set_on_body(&s, "longer", &longer.to_compact_json().unwrap());
    // Setting an attribute is all or nothing: a cut one is damage.
    let whole = Item {
        body_len: Some(BODY.len() as u64),
        ..item("cut")
    }
    .to_compact_json()
    .unwrap();
    std::fs::write(s.body_path("cut"), BODY).unwrap();
    set_on_body(&s, "cut", &whole[..whole.len() / 2]);
    // A rewrite's message got its 250 long ago: a short body under it is
    // damage too.
    let rewritten = Item {
        body_len: Some(BODY.len() as u64),
        rewritten: true,
        ..item("damaged")
    };
    std::fs::write(s.item_path("damaged"), rewritten.to_json().unwrap()).unwrap();
    std::fs::write(s.body_path("damaged"), &BODY[..3]).unwrap();
    // Whole but not an item this version reads.
    std::fs::write(s.body_path("bad"), BODY).unwrap();
    set_on_body(&s, "bad", b"[1, 2]");
    std::fs::write(s.item_path("badm"), b"{garbage").unwrap();
    std::fs::write(s.body_path("badm"), BODY).unwrap();
    let loaded = s.load().unwrap();
    assert!(loaded.items.is_empty());
    assert_eq!((loaded.torn, loaded.set_aside), (0, 0));
    let kept = kept(&loaded);
    let files: Vec<_> = kept.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        files,
        ["d:bad", "d:cut", "d:longer", "m:badm", "m:damaged"],
        "{kept:?}"
    );
    assert!(kept[1].1.contains("cut short: damaged"), "{kept:?}");
    assert!(kept[2].1.contains("more than the 3"), "{kept:?}");
    assert!(kept[4].1.contains("damaged"), "{kept:?}");
    assert_eq!(
        names(dir.path()),
        [
            "d:bad",
            "d:badm",
            "d:cut",
            "d:damaged",
            "d:longer",
            "m:badm",
            "m:damaged"
        ]
    );
}

#[test]
fn a_rewrite_takes_over_from_the_item_on_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let s = fresh(dir.path());
    let first = put(&s, "x", BODY);
    let mut later = first.clone();
    later.rcpt_to.push("later@d".into());
    s.stage_item(&later).unwrap();
    assert_eq!(names(dir.path()), ["d:x", "m:x"]);
    let later = Item {
        rewritten: true,
        ..later
    };
    assert_eq!(s.load().unwrap().items, vec![later]);
    // The body goes first: a crash in between leaves the rewritten item
    // without its body (removed at the next start), never the body with
    // its first, stale item.
    s.unlink("x").unwrap();
    assert!(names(dir.path()).is_empty());
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
    big.close().unwrap();
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
    // And when it is written out.
    let mut out = spool.create_body("out").unwrap();
    out.write(b"held").unwrap();
    spool
        .write_new(Some(out), &mut item("out"), || Ok(()))
        .unwrap();
    assert_eq!(spool.buffered.load(Ordering::Relaxed), 0);
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
    assert!(names(dir.path()).iter().all(|n| !n.starts_with('.')));
    assert!(spool.prepend("missing", b"X: y\r\n").is_err());
    // A rewrite a crash cut short is cleaned up at the next start.
    let tmp = tambo_common::safeio::temp_path(&spool.body_path("m1")).unwrap();
    std::fs::write(&tmp, b"half").unwrap();
    spool.load().unwrap();
    assert!(!tmp.exists());
}

#[test]
fn temp_files_are_removed_and_orphans_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let s = fresh(dir.path());
    let mut orphan = s.create_body("orphan").unwrap();
    orphan.write(BODY).unwrap();
    orphan.close().unwrap();
    // Made ready for a message that never came.
    assert_eq!(s.make_ready(vec!["unused".into()]), ["unused"]);
    std::fs::write(dir.path().join(".m:x123"), b"tmp").unwrap();
    std::fs::write(dir.path().join(".d:x123"), b"tmp").unwrap();
    let loaded = s.load().unwrap();
    assert!(loaded.items.is_empty() && loaded.unreadable.is_empty());
    assert_eq!((loaded.removed_temp, loaded.set_aside), (3, 1));
    assert_eq!(names(dir.path()), [ORPHANS_DIR]);
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
    assert_eq!((loaded.removed_temp, loaded.set_aside), (0, 0));
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
    assert!(s.write_new(None, &mut item("x"), || Ok(())).is_err());
}
