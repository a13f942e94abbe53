//! The import's writes: planned while chasquid's files are read, checked
//! as a whole, then made. Nothing is replaced: a file is written under a
//! temporary name and linked into place only if its name is still free,
//! so even a file created meanwhile survives. The one exception is the
//! Debian package's tambo.conf, as installed: it holds no choice of the
//! admin's, and importing into the package's /etc/tambo is the point.
//!
//! Ownership follows tambo's conventions (users.rs, the package's
//! postinst): new files are ours with the group of their directory; new
//! directories take their parent's mode and group, except `certs/` and
//! `domains/`, which are made as the package makes them (0750, queued's
//! group), so what is under them is readable by queued and nobody else.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tambo_common::config::Config;
use tambo_common::safeio;

use super::Error;

/// The tambo.conf the Debian package installs (packaging/deb/build.sh).
const PACKAGE_CONF: &[u8] = include_bytes!("../../../packaging/tambo.conf");

/// One thing to make.
#[derive(Debug)]
pub enum What {
    File {
        data: Vec<u8>,
        mode: u32,
    },
    /// A symbolic link to this (absolute) target.
    Link(PathBuf),
    /// A directory, which may exist already.
    Dir,
}

impl What {
    pub fn file(data: &[u8], mode: u32) -> Self {
        What::File {
            data: data.to_vec(),
            mode: mode & 0o777,
        }
    }
}

/// Who reads a file once the daemons have dropped root.
#[derive(Debug, Clone, Copy)]
pub enum Reader {
    /// queued (users, aliases, keys, certificates), through the group
    /// (the package's `root:tambo-queue 0640`).
    Queued,
    /// deliverd, which runs the hooks as its own user: through "others".
    Deliverd,
}

pub struct Plan {
    to: PathBuf,
    items: Vec<(PathBuf, What)>,
    /// What was imported, one line each.
    pub done: Vec<String>,
    /// What was not, and why.
    pub notes: Vec<String>,
    root: bool,
    /// The group of queued's user, when run as root and it exists.
    queue_gid: Option<u32>,
}

impl Plan {
    pub fn new(to: &Path, cfg: &Config) -> Self {
        let root = nix::unistd::geteuid().is_root();
        let queue_gid = root
            .then(|| {
                nix::unistd::User::from_name(&cfg.tambo.queued_user)
                    .ok()
                    .flatten()
            })
            .flatten()
            .map(|u| u.gid.as_raw());
        Plan {
            to: to.to_path_buf(),
            items: Vec::new(),
            done: Vec::new(),
            notes: Vec::new(),
            root,
            queue_gid,
        }
    }

    pub fn add(&mut self, dest: PathBuf, what: What) {
        self.items.push((dest, what));
    }

    /// Adds a file a daemon reads once it has dropped root; run as root,
    /// a mode that will not let it is named (chasquid's user owned its
    /// files, the copies are root's).
    pub fn add_read_by(&mut self, dest: PathBuf, data: &[u8], mode: u32, reader: Reader) {
        let (bits, who, fix) = match reader {
            Reader::Queued => (
                0o040,
                "queued",
                "group-readable (0640), with the group queued runs as",
            ),
            // A helper beside the hooks need not be executable.
            Reader::Deliverd if mode & 0o111 == 0 => (0o004, "deliverd", "readable by others"),
            Reader::Deliverd => (
                0o005,
                "deliverd",
                "readable and executable by others (0755)",
            ),
        };
        if self.root && mode & bits != bits {
            self.notes.push(format!(
                "note: {} is mode {:04o}: {who} reads it as its own user, not as root: make it {fix}",
                dest.display(),
                mode & 0o777
            ));
        }
        self.add(dest, What::file(data, mode));
    }

    /// Whether `dest` is the package's tambo.conf, untouched.
    fn replaceable(&self, dest: &Path) -> bool {
        dest == self.to.join("tambo.conf") && fs::read(dest).is_ok_and(|d| d == PACKAGE_CONF)
    }

    /// Refuses the whole import if any file it would write exists (or a
    /// directory on its way is something else), before anything is
    /// written.
    pub fn check(&self) -> Result<(), Error> {
        let mut seen = BTreeSet::new();
        for (dest, what) in &self.items {
            if !seen.insert(dest) {
                return Err(format!("{}: two sources for one file", dest.display()));
            }
            for dir in dest.ancestors().skip(1) {
                match fs::metadata(dir) {
                    Ok(m) if m.is_dir() => break,
                    Ok(_) => {
                        return Err(format!("{}: exists and is not a directory", dir.display()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("{}: {e}", dir.display())),
                }
            }
            match fs::symlink_metadata(dest) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", dest.display())),
                Ok(_) if matches!(what, What::Dir) && dest.is_dir() => {}
                Ok(_) if self.replaceable(dest) => {}
                Ok(_) => {
                    return Err(format!(
                        "{}: exists; not overwriting it (move it aside, or import --to a new directory)",
                        dest.display()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Makes everything, then syncs the directories written to.
    pub fn write(&self) -> Result<(), Error> {
        let mut written = BTreeSet::new();
        for (dest, what) in &self.items {
            let dir = dest.parent().unwrap_or(Path::new("/"));
            let failed = |e: io::Error| format!("{}: cannot write: {e}", dest.display());
            if let What::Dir = what {
                self.make_dirs(dest).map_err(failed)?;
                continue;
            }
            self.make_dirs(dir).map_err(failed)?;
            match what {
                What::File { data, mode } => self.put(dest, data, *mode).map_err(failed)?,
                What::Link(target) => std::os::unix::fs::symlink(target, dest).map_err(failed)?,
                What::Dir => {}
            }
            written.insert(dir);
        }
        for dir in written {
            safeio::fsync_dir(dir).map_err(|e| format!("{}: cannot sync: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// Creates `dir` and its missing parents, outermost first.
    fn make_dirs(&self, dir: &Path) -> io::Result<()> {
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.is_dir()).collect();
        for d in missing.into_iter().rev() {
            let parent = d.parent().unwrap_or(Path::new("/"));
            let pm = fs::metadata(parent)?;
            let name = d.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let (mode, gid) = if d == self.to {
                // tambo.conf is read by every daemon (packaging/README.md).
                (0o755, pm.gid())
            } else if parent == self.to && matches!(name, "certs" | "domains") {
                (0o750, self.queue_gid.unwrap_or(pm.gid()))
            } else if name == "domaininfo" {
                // queued's own (it gives it to its user at start).
                (0o700, pm.gid())
            } else {
                (pm.mode() & 0o777, pm.gid())
            };
            fs::DirBuilder::new().mode(mode).create(d)?;
            // The umask may have taken bits away.
            fs::set_permissions(d, fs::Permissions::from_mode(mode))?;
            if self.root {
                std::os::unix::fs::chown(d, None, Some(gid))?;
            }
            safeio::fsync_dir(parent)?;
        }
        Ok(())
    }

    /// Writes `data` under a temporary name, with its mode and group from
    /// the start, and links it into place, which fails if the name was
    /// taken meanwhile.
    fn put(&self, dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
        let tmp = safeio::temp_path(dest)?;
        let dir = dest.parent().unwrap_or(Path::new("/"));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            if self.root {
                std::os::unix::fs::fchown(&f, None, Some(fs::metadata(dir)?.gid()))?;
            }
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.write_all(data)?;
            f.sync_all()?;
            if self.replaceable(dest) {
                fs::rename(&tmp, dest)
            } else {
                fs::hard_link(&tmp, dest)
            }
        })();
        // Gone already after a rename; after a link, or a failure, ours.
        let _ = fs::remove_file(&tmp);
        result
    }
}

/// `p` with every link in its existing part resolved (the rest as it
/// is), to compare places that may not exist yet.
pub fn real(p: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = p;
    loop {
        if let Ok(mut r) = fs::canonicalize(cur) {
            r.extend(rest.iter().rev());
            return r;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_overwritten_and_nothing_written_after_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("tambo");
        let cfg = Config::defaults(&to);
        let mut plan = Plan::new(&to, &cfg);
        plan.add(to.join("domains/a.example"), What::Dir);
        plan.add(
            to.join("hooks/post-data"),
            What::file(b"#!/bin/sh\n", 0o755),
        );
        plan.add(to.join("certs/x/privkey.pem"), What::file(b"key", 0o640));
        plan.add(
            to.join("certs/live"),
            What::Link("/etc/letsencrypt/live/x".into()),
        );
        plan.check().unwrap();
        plan.write().unwrap();
        let mode = |p: &str| fs::metadata(to.join(p)).unwrap().mode() & 0o777;
        assert_eq!(mode("hooks/post-data"), 0o755);
        assert_eq!(mode("certs/x/privkey.pem"), 0o640);
        assert_eq!(
            (mode("certs"), mode("domains"), mode("domains/a.example")),
            (0o750, 0o750, 0o750)
        );
        assert_eq!(
            fs::read_link(to.join("certs/live")).unwrap(),
            Path::new("/etc/letsencrypt/live/x")
        );

        // Again: every file is there, so nothing at all is written.
        let mut again = Plan::new(&to, &cfg);
        again.add(to.join("domains/b.example"), What::Dir);
        again.add(to.join("hooks/post-data"), What::file(b"other", 0o755));
        let e = again.check().unwrap_err();
        assert!(
            e.contains("hooks/post-data: exists; not overwriting it"),
            "{e}"
        );
        assert!(!to.join("domains/b.example").exists());

        // The package's tambo.conf may be replaced; an edited one not.
        fs::write(to.join("tambo.conf"), PACKAGE_CONF).unwrap();
        let mut conf = Plan::new(&to, &cfg);
        conf.add(
            to.join("tambo.conf"),
            What::file(b"hostname = \"x\"\n", 0o644),
        );
        conf.check().unwrap();
        conf.write().unwrap();
        assert_eq!(
            fs::read(to.join("tambo.conf")).unwrap(),
            b"hostname = \"x\"\n"
        );
        assert!(conf.check().unwrap_err().contains("tambo.conf: exists"));

        // A file where a directory must be.
        let mut bad = Plan::new(&to, &cfg);
        bad.add(to.join("tambo.conf/x"), What::file(b"", 0o644));
        assert!(bad.check().unwrap_err().contains("is not a directory"));
    }

    #[test]
    fn real_resolves_the_existing_part() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).unwrap();
        let real_dir = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(real(&dir.path().join("link/new/x")), real_dir.join("new/x"));
    }
}
