//! tambo's own Maildir delivery (`[tambo] maildir`): the message is written
//! to `tmp/`, fsync'd, then moved into `new/` and the directory fsync'd, so
//! a mail reader never sees a partial message and a crash never loses one
//! that was reported delivered.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

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

/// Delivers the message in `src` into the Maildir at `dir`, creating it.
/// `id` is the message's queue id, for the log.
pub fn deliver(dir: &Path, src: &mut File, id: &str) -> Outcome {
    match deliver_inner(dir, src) {
        Ok(()) => Outcome::Delivered,
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

fn deliver_inner(dir: &Path, src: &mut File) -> io::Result<()> {
    create(dir)?;
    let name = unique_name();
    let tmp = dir.join("tmp").join(&name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        io::copy(src, &mut f)?;
        f.flush()?;
        f.sync_all()?;
        let new = dir.join("new").join(&name);
        std::fs::rename(&tmp, &new)?;
        File::open(dir.join("new"))?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `<secs>.M<micros>P<pid>Q<n>.<host>`: unique per delivery (Maildir spec).
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
        .replace(['/', ':'], "_");
    format!(
        "{}.M{}P{}Q{}.{host}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
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
        assert_eq!(deliver(&md, &mut src, "q1"), Outcome::Delivered);
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
        match deliver(file.path(), &mut src, "q1") {
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
}
