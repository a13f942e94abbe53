//! tambo's own Maildir delivery (`[tambo] maildir`): the message is written
//! to `tmp/`, fsync'd, then moved into `new/` and the directory fsync'd, so
//! a mail reader never sees a partial message and a crash never loses one
//! that was reported delivered.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tambo_common::safeio;
use tambo_proto::deliver::Outcome;

use crate::template;

/// Expands the path template for a recipient, in one pass (a user part
/// holding `%to_domain%` stays that text). User and domain must not be
/// able to climb out of the template, nor look like a placeholder.
pub fn expand(template: &str, to: &str) -> Result<PathBuf, String> {
    let (user, domain) = to.rsplit_once('@').unwrap_or((to, ""));
    for part in [user, domain] {
        if part.contains(['/', '%', '\0']) || part == "." || part == ".." {
            return Err(format!("address {to:?} cannot be used as a Maildir path"));
        }
    }
    if user.is_empty() {
        return Err("empty user".into());
    }
    Ok(PathBuf::from(template::expand(
        template,
        &[("to_user", user), ("to_domain", domain), ("to", to)],
    )))
}

/// Delivers the message in `src` into the Maildir at `dir`, creating it,
/// once: `id` (its queue ID) and `to` (the recipient) name the file, so
/// an attempt repeated after a crash finds it there (in `new/`, or also
/// in `cur/`, where a mail reader moves what it has seen, when
/// `maybe_delivered`) and writes nothing.
///
/// `pause` (a test knob) holds the report back after a write, so a test
/// can crash a process between the two.
pub fn deliver(
    dir: &Path,
    src: &mut File,
    id: &str,
    to: Recipient,
    maybe_delivered: bool,
    pause: Option<std::time::Duration>,
) -> Outcome {
    let name = file_name(id, to);
    let to = to.address;
    match deliver_inner(dir, src, &name, maybe_delivered) {
        Ok(Written::Now) => {
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
            Outcome::Delivered
        }
        Ok(Written::Before) => {
            tracing::info!(id = %id, %to, "already in the Maildir (an earlier attempt wrote it)");
            Outcome::Delivered
        }
        Err(e) => {
            // The path and the full error are for the operator only: the
            // failure text may end up in a DSN to an outside sender, who
            // has no business learning the server's directory layout.
            tracing::warn!(id = %id, "Maildir {}: {e}", dir.display());
            // A full disk or a permission problem may be fixed by the
            // operator: try again rather than bounce.
            Outcome::TempFail(failure_text(&e))
        }
    }
}

/// What the sender may learn of a failed Maildir delivery: the kind of
/// error only (`permission denied`, `no storage space`), never a path nor
/// an error message that could hold one.
fn failure_text(e: &io::Error) -> String {
    format!("Maildir delivery failed: {}", e.kind())
}

/// Creates whatever is missing of the Maildir and its `tmp`, `new` and
/// `cur`, each new directory fsync'd into its parent: otherwise a crash
/// could take a new mailbox, and the message reported delivered into it,
/// away. Returns the directories it fsync'd.
fn create(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut synced = safeio::create_dir_all_durable(dir, 0o700)?;
    for sub in ["tmp", "new", "cur"] {
        for p in safeio::create_dir_all_durable(&dir.join(sub), 0o700)? {
            if !synced.contains(&p) {
                synced.push(p);
            }
        }
    }
    Ok(synced)
}

/// Whether the message was written by this attempt or an earlier one.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    Now,
    Before,
}

fn deliver_inner(
    dir: &Path,
    src: &mut File,
    name: &str,
    maybe_delivered: bool,
) -> io::Result<Written> {
    create(dir)?;
    if dir.join("new").join(name).exists() || (maybe_delivered && seen(dir, name)?) {
        return Ok(Written::Before);
    }
    let tmp = dir.join("tmp").join(name);
    let result = (|| {
        // An attempt cut short may have left its copy in tmp/: it is ours
        // (the name is this message's and recipient's), so it is replaced.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::copy(src, &mut f)?;
        f.flush()?;
        f.sync_all()?;
        let new = dir.join("new").join(name);
        std::fs::rename(&tmp, &new)?;
        File::open(dir.join("new"))?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| Written::Now)
}

/// Whether a mail reader moved the message to `cur/` (as `name:2,<flags>`).
/// Reads the whole directory: only done when an earlier attempt may have
/// delivered.
fn seen(dir: &Path, name: &str) -> io::Result<bool> {
    for entry in std::fs::read_dir(dir.join("cur"))? {
        let entry = entry?;
        let f = entry.file_name();
        let f = f.as_encoded_bytes();
        if f.starts_with(name.as_bytes()) && matches!(f.get(name.len()), None | Some(b':')) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Which of a message's recipients a delivery is for.
#[derive(Debug, Clone, Copy)]
pub struct Recipient<'a> {
    pub address: &'a str,
    /// Its position in the queue item, when known.
    pub position: Option<u32>,
}

/// `<queue id>.R<position>.<host>`, or `<queue id>.H<hash of the
/// address>.<host>` without a position: unique per message and recipient
/// (queue IDs are 64 random bits; one address reached by two RCPTs is two
/// positions, so two files), and the same for every attempt, so a
/// repeated one can tell it was done. The Maildir spec asks only for
/// uniqueness; readers order by their own index, not names.
fn file_name(id: &str, to: Recipient) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
        .replace(['/', ':', '.'], "_");
    let id: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    match to.position {
        Some(p) => format!("{id}.R{p}.{host}"),
        None => format!("{id}.H{:032x}.{host}", fnv1a128(to.address.as_bytes())),
    }
}

/// FNV-1a, 128 bits: stable across builds and versions (std's hasher is
/// not), and wide enough that two recipients of one message never share
/// a name.
fn fnv1a128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u128::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn expands_template() {
        assert_eq!(
            expand("/var/mail/%to_domain%/%to_user%", "ann@example.org").unwrap(),
            PathBuf::from("/var/mail/example.org/ann")
        );
        assert!(expand("/m/%to_user%", "../x@d").is_err());
        assert!(expand("/m/%to_user%", "a/b@d").is_err());
        assert!(expand("/m/%to_domain%/%to_user%", "a@..").is_err());
        assert!(expand("/m/%to_user%", ".@d").is_err());
        assert!(expand("/m/%to_user%", "a\0b@d").is_err());
        assert!(expand("/m/%to_user%", "@d").is_err());
        assert_eq!(
            expand("/m/%to%", "ann@d").unwrap(),
            PathBuf::from("/m/ann@d")
        );
    }

    #[test]
    fn placeholders_in_addresses_are_refused() {
        // One pass already keeps them literal; refusing them as well means
        // no address ever reads as a placeholder, whatever the template.
        for to in ["%to_domain%@d", "a@%to_user%", "100%@d", "a@d%"] {
            assert!(expand("/m/%to_domain%/%to_user%", to).is_err(), "{to}");
        }
    }

    #[test]
    fn new_directories_are_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("d/ann");
        let synced = create(&md).unwrap();
        assert_eq!(
            synced,
            [dir.path().to_path_buf(), dir.path().join("d"), md.clone()],
            "each new directory's parent is fsync'd, the Maildir's for tmp/new/cur"
        );
        for sub in ["tmp", "new", "cur"] {
            assert!(md.join(sub).is_dir());
        }
        assert!(
            create(&md).unwrap().is_empty(),
            "nothing new, nothing synced"
        );
        // A Maildir missing only cur/ (made by hand) gets it, durably.
        std::fs::remove_dir(md.join("cur")).unwrap();
        assert_eq!(create(&md).unwrap(), vec![md]);
    }

    #[test]
    fn delivers_into_new() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("ann");
        let mut src = tempfile::tempfile().unwrap();
        src.write_all(b"Subject: x\r\n\r\nhi\r\n").unwrap();
        src.rewind().unwrap();
        assert_eq!(
            deliver(&md, &mut src, "q1", ann(0), false, None),
            Outcome::Delivered
        );
        let new: Vec<_> = std::fs::read_dir(md.join("new")).unwrap().collect();
        assert_eq!(new.len(), 1);
        let path = new[0].as_ref().unwrap().path();
        assert_eq!(std::fs::read(path).unwrap(), b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn unwritable_maildir_is_temporary_and_names_no_path() {
        let mut src = tempfile::tempfile().unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        // A regular file where the Maildir should be.
        match deliver(file.path(), &mut src, "q1", ann(0), false, None) {
            Outcome::TempFail(t) => {
                assert!(t.starts_with("Maildir delivery failed: "), "{t}");
                assert!(!t.contains('/'), "no path reaches the sender: {t}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn failure_texts_carry_the_kind_only() {
        let e = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(
            failure_text(&e),
            "Maildir delivery failed: permission denied"
        );
        // An error whose message holds a path, as safeio's may.
        let e = io::Error::new(io::ErrorKind::StorageFull, "/var/mail/secret/ann: full");
        assert_eq!(
            failure_text(&e),
            "Maildir delivery failed: no storage space"
        );
    }

    fn message(text: &[u8]) -> File {
        let mut src = tempfile::tempfile().unwrap();
        src.write_all(text).unwrap();
        src.rewind().unwrap();
        src
    }

    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn a_repeated_attempt_writes_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("ann");
        for _ in 0..2 {
            let mut src = message(b"Subject: x\r\n\r\nhi\r\n");
            assert_eq!(
                deliver(&md, &mut src, "q1", ann(0), false, None),
                Outcome::Delivered
            );
        }
        assert_eq!(count(&md.join("new")), 1);
        // Another recipient, or another message, is another file.
        let mut src = message(b"x");
        deliver(
            &md,
            &mut src,
            "q1",
            Recipient {
                address: "bob@x",
                position: Some(1),
            },
            false,
            None,
        );
        let mut src = message(b"x");
        deliver(&md, &mut src, "q2", ann(0), false, None);
        assert_eq!(count(&md.join("new")), 3);
    }

    #[test]
    fn a_message_a_reader_moved_to_cur_is_found_when_it_may_have_been_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("ann");
        let mut src = message(b"hi");
        deliver(&md, &mut src, "q1", ann(0), false, None);
        let name = file_name("q1", ann(0));
        std::fs::rename(
            md.join("new").join(&name),
            md.join("cur").join(format!("{name}:2,S")),
        )
        .unwrap();
        // A name that merely starts the same is another message.
        std::fs::write(md.join("cur").join(format!("{name}x:2,")), b"").unwrap();
        let mut src = message(b"hi");
        assert_eq!(
            deliver(&md, &mut src, "q1", ann(0), true, None),
            Outcome::Delivered
        );
        assert_eq!(count(&md.join("new")), 0);
        assert!(!seen(&md, &format!("{name}y")).unwrap());
    }

    #[test]
    fn a_copy_left_in_tmp_by_a_cut_attempt_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("ann");
        create(&md).unwrap();
        let name = file_name("q1", ann(0));
        std::fs::write(md.join("tmp").join(&name), b"half a mess").unwrap();
        let mut src = message(b"the message");
        assert_eq!(
            deliver(&md, &mut src, "q1", ann(0), true, None),
            Outcome::Delivered
        );
        assert_eq!(count(&md.join("tmp")), 0);
        assert_eq!(
            std::fs::read(md.join("new").join(&name)).unwrap(),
            b"the message"
        );
    }

    fn ann(position: u32) -> Recipient<'static> {
        Recipient {
            address: "ann@x",
            position: Some(position),
        }
    }

    #[test]
    fn names_are_safe_and_stable() {
        let by_address = |a| Recipient {
            address: a,
            position: None,
        };
        let n = file_name("a/b:c", by_address("x@y"));
        assert!(!n.contains('/') && !n.contains(':'), "{n}");
        assert_eq!(n, file_name("a/b:c", by_address("x@y")));
        assert_ne!(
            file_name("q", by_address("a@x")),
            file_name("q", by_address("b@x"))
        );
        // One address reached by two RCPTs: two files.
        assert_ne!(file_name("q", ann(0)), file_name("q", ann(1)));
        // FNV-1a 128 of "a", as published.
        assert_eq!(fnv1a128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
    }
}
