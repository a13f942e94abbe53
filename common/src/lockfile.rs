//! Exclusive locks held for a process's lifetime (flock(2)), so two copies
//! of one daemon never work on the same queue or socket: the second one
//! refuses to start, naming the pid of the first.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct LockFile {
    path: PathBuf,
    _lock: Flock<File>,
}

impl LockFile {
    /// Takes the exclusive lock on `path` (created 0600 if missing) without
    /// waiting, and writes our pid into it. Fails with `WouldBlock` and
    /// the holder's pid if another process has it.
    pub fn acquire(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never follow a link someone planted in our place.
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(path)?;
        // Nor a hard link: the pid written below truncates the file first,
        // and root may be the one writing (queued takes its lock before it
        // drops root), so another name of /etc/shadow must not pass.
        let meta = file.metadata()?;
        if !meta.is_file() || std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
            return Err(io::Error::other(format!(
                "{} is not a plain file with one name; refusing to use it as a lock",
                path.display()
            )));
        }
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, errno)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                };
                let kind = if errno == nix::errno::Errno::EWOULDBLOCK {
                    io::ErrorKind::WouldBlock
                } else {
                    io::ErrorKind::Other
                };
                return Err(io::Error::new(
                    kind,
                    format!(
                        "{} is locked by another process{who}: {errno}",
                        path.display()
                    ),
                ));
            }
        };
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_link_is_never_used_as_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("precious");
        std::fs::write(&precious, "do not truncate").unwrap();
        std::fs::hard_link(&precious, dir.path().join(".lock")).unwrap();
        let e = LockFile::acquire(&dir.path().join(".lock")).unwrap_err();
        assert!(e.to_string().contains("one name"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&precious).unwrap(),
            "do not truncate"
        );
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("x.lock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(LockFile::acquire(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn second_holder_is_refused_with_the_first_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let first = LockFile::acquire(&p).unwrap();
        let e = LockFile::acquire(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(
            e.to_string()
                .contains(&format!("(pid {})", std::process::id())),
            "{e}"
        );
        drop(first);
        LockFile::acquire(&p).unwrap();
    }
}
