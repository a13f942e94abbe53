//! Atomic file writes: temp file in the same directory, fsync, rename,
//! fsync of the directory. A reader sees the old file or the new one, never
//! half of either, and after `write_atomic` returns the new one survives a
//! crash.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `data` to `path` atomically with the given mode, and makes it
/// durable (directory included).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace(path, data, mode)?;
    fsync_dir(parent(path))
}

/// Like [`write_atomic`], but without the directory fsync: the new content
/// is on disk, yet the rename may not survive a crash until the caller
/// fsyncs the directory. Lets many writes share one directory fsync (group
/// commit).
pub fn replace(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace_as(path, data, mode, None)
}

/// [`write_atomic`], the new file owned by `owner` (uid, gid) from the
/// start: a reader never sees it with root's ownership (an admin command
/// editing a file a daemon reads as its own user).
pub fn write_atomic_as(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    replace_as(path, data, mode, owner)?;
    fsync_dir(parent(path))
}

fn replace_as(path: &Path, data: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let tmp = write_temp_as(path, data, mode, owner)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The first half of an atomic write: `data` in a new temporary file
/// beside `path` ([`temp_path`]), with `mode`, fsync'd; its name is
/// returned for the caller to rename (or link) into place, or to remove.
/// On failure nothing is left behind.
pub fn write_temp(path: &Path, data: &[u8], mode: u32) -> io::Result<PathBuf> {
    write_temp_as(path, data, mode, None)
}

fn write_temp_as(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<PathBuf> {
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        // Explicit, whatever the umask (or a chown) took away.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The temporary name for an atomic write of `path`: `.<name><random>` in
/// the same directory, so the rename never crosses a filesystem and the
/// queue loader (which skips dot files) never mistakes it for an item.
pub fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut rnd = [0u8; 6];
    getrandom::fill(&mut rnd).map_err(|e| io::Error::other(e.to_string()))?;
    let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    Ok(parent(path).join(format!(".{name}{suffix}")))
}

/// Creates `dir` and any missing parents with `mode`, fsyncing each new
/// directory's parent so the new entry survives a crash (a directory that
/// vanishes after a crash would take the files later written into it with
/// it). Returns the parents it fsync'd, outermost first.
pub fn create_dir_all_durable(dir: &Path, mode: u32) -> io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::DirBuilderExt;
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.as_os_str().is_empty() && !cur.is_dir() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    let mut synced = Vec::new();
    for d in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => {}
            // Created meanwhile by someone else (another delivery): its
            // creator syncs it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => continue,
            Err(e) => return Err(e),
        }
        let p = parent(d).to_path_buf();
        fsync_dir(&p)?;
        synced.push(p);
    }
    Ok(synced)
}

/// fsyncs a directory, making renames and new entries in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn new_directories_are_synced_into_their_parents() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        let synced = create_dir_all_durable(&deep, 0o700).unwrap();
        assert_eq!(
            synced,
            [
                dir.path().to_path_buf(),
                dir.path().join("a"),
                dir.path().join("a/b")
            ]
        );
        let mode = std::fs::metadata(&deep).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Nothing new: nothing to sync.
        assert!(create_dir_all_durable(&deep, 0o700).unwrap().is_empty());
        // A file in the way is an error, not a silent success.
        std::fs::write(dir.path().join("f"), b"").unwrap();
        assert!(create_dir_all_durable(&dir.path().join("f/x"), 0o700).is_err());
    }

    #[test]
    fn failure_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming over a non-empty directory fails after the temp file is
        // written: the temp file must be cleaned up.
        let p = dir.path().join("d");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("x"), b"").unwrap();
        assert!(write_atomic(&p, b"data", 0o600).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
