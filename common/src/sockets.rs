//! The Unix sockets between the daemons, and who may connect to each.
//!
//! Whoever creates a socket (`tambo run` for all of them, a daemon started
//! alone for its own, systemd's socket units in packaging) gives it an
//! owner, group and mode that say who may connect; every accepted
//! connection is then checked again by uid ([`tambo_proto::identity`]).
//! A socket is only ever replaced by the holder of its lock file
//! (`<socket>.lock`), so no process unlinks a socket another live process
//! serves.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use tambo_proto::Role;
use tambo_proto::identity::{Identities, lookup_group};

use crate::config::Config;
use crate::lockfile::LockFile;

/// The group whose members may reach monitor.sock (every daemon's user).
pub const SOCKET_GROUP: &str = "tambo";

/// The IPC sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcSocket {
    /// smtpd (and the admin CLI) → queued.
    Submit,
    /// deliverd → queued.
    Deliver,
    /// every process → monitord.
    Monitor,
    /// `tambo sendmail`, run by any local user → queued, which takes the
    /// user from the connection's credentials.
    Local,
}

impl IpcSocket {
    /// The file name in the runtime dir, and the name the socket carries
    /// when passed by socket activation (`FileDescriptorName=`).
    pub fn name(self) -> &'static str {
        match self {
            IpcSocket::Submit => "submit",
            IpcSocket::Deliver => "deliver",
            IpcSocket::Monitor => "monitor",
            IpcSocket::Local => "local",
        }
    }

    pub fn path(self, cfg: &Config) -> PathBuf {
        cfg.tambo.runtime_dir.join(format!("{}.sock", self.name()))
    }

    /// Who may connect: owner (the serving role), group and mode.
    pub fn access(self, ids: &Identities) -> Access {
        if ids.is_development() {
            return Access {
                owner: None,
                group: None,
                mode: 0o600,
            };
        }
        let uid = |r: Role| ids.account(r).map(|a| a.uid);
        let gid = |r: Role| ids.account(r).map(|a| a.gid);
        match self {
            IpcSocket::Submit => Access {
                owner: uid(Role::Queued),
                group: gid(Role::Smtpd),
                mode: 0o660,
            },
            IpcSocket::Deliver => Access {
                owner: uid(Role::Queued),
                group: gid(Role::Deliverd),
                mode: 0o660,
            },
            // Every local user may submit mail, as themselves.
            IpcSocket::Local => Access {
                owner: uid(Role::Queued),
                group: gid(Role::Queued),
                mode: 0o666,
            },
            IpcSocket::Monitor => match lookup_group(SOCKET_GROUP) {
                Some(g) => Access {
                    owner: uid(Role::Monitord),
                    group: Some(g),
                    mode: 0o660,
                },
                // Without the group, three users must reach it: let the
                // mode allow everyone, and the uid check refuse strangers.
                None => Access {
                    owner: uid(Role::Monitord),
                    group: gid(Role::Monitord),
                    mode: 0o666,
                },
            },
        }
    }
}

/// Owner, group and mode of a socket file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub mode: u32,
}

/// A bound socket and the lock that makes it ours.
#[derive(Debug)]
pub struct Bound {
    pub listener: UnixListener,
    pub lock: LockFile,
}

/// Listens on a TCP address with the deepest accept queue the system
/// allows (`net.core.somaxconn`), not the standard library's 128. Under a
/// connection flood a full queue drops every client's SYN, and each waits
/// a second or more to try again, whoever it is; systemd's sockets get
/// the system's maximum too (`Backlog=`).
pub fn listen_tcp(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    // listen() again on a listening socket only changes its queue.
    nix::sys::socket::listen(&l, nix::sys::socket::Backlog::MAXCONN).map_err(io::Error::from)?;
    Ok(l)
}

/// Creates the runtime directory if needed, mode 0700 in development
/// (`private`: one user) and 0755 otherwise (the sockets' own modes decide
/// who connects); every directory it creates gets that mode explicitly,
/// whatever the umask. The directory must then be owned by root or by us
/// and writable by nobody else: a daemon creates, chowns and replaces files
/// in it, and a directory someone else can write to would let them point
/// those operations elsewhere with a symlink. No symlink is followed on
/// the way: a component that turns out to be one is refused.
///
/// (Under systemd, `RuntimeDirectory=` gives the directory to the unit's
/// user, which passes; a root daemon sharing a directory owned by a
/// service user does not, and should get its sockets from socket units.)
pub fn create_runtime_dir(dir: &Path, private: bool) -> io::Result<()> {
    let mode = if private { 0o700 } else { 0o755 };
    let not_a_dir = |d: &Path| {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", d.display()),
        )
    };
    let mut missing = Vec::new();
    let mut cur = dir;
    loop {
        match std::fs::symlink_metadata(cur) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(not_a_dir(cur)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(cur.to_path_buf());
                match cur.parent() {
                    Some(p) if !p.as_os_str().is_empty() => cur = p,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?,
            // Someone made it meanwhile: it must at least be a directory.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !std::fs::symlink_metadata(d)?.is_dir() {
                    return Err(not_a_dir(d));
                }
            }
            Err(e) => return Err(e),
        }
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(not_a_dir(dir));
    }
    check_ours(dir, &m)
}

fn check_ours(dir: &Path, m: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    if (m.uid() != 0 && m.uid() != me) || m.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {} with mode {:o}: tambo only creates sockets in a directory that is root's or its own and writable by nobody else",
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Binds a Unix socket at `path` with the given access. Takes
/// `<path>.lock` first: with it held, a socket file left at `path` belongs
/// to a dead process and may be replaced; without it, someone else serves
/// there and we refuse.
///
/// A daemon started alone as its own user may not belong to the group that
/// should reach its socket (only root can give a file to any group); then
/// the socket is left open to all (0666) and the uid check alone refuses
/// strangers, which is logged. systemd socket units set owner, group and
/// mode themselves.
pub fn bind(path: &Path, access: Access) -> io::Result<Bound> {
    if let Some(dir) = path.parent() {
        create_runtime_dir(dir, access.owner.is_none() && access.group.is_none())?;
    }
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock = LockFile::acquire(Path::new(&lock_name)).map_err(|e| {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process serves this socket: {e}"),
        )
    })?;
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)?;
    // Mode before owner: the socket is never more open than asked.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))?;
    if access.owner.is_some() || access.group.is_some() {
        let owner = access
            .owner
            .filter(|uid| *uid != nix::unistd::geteuid().as_raw());
        let changed = nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            owner.map(nix::unistd::Uid::from_raw),
            access.group.map(nix::unistd::Gid::from_raw),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        match changed {
            Ok(()) => {}
            Err(nix::errno::Errno::EPERM) if !nix::unistd::geteuid().is_root() => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
                tracing::warn!(
                    "cannot give {} to uid {:?}, gid {:?} (not root, not a member): it is mode 0666 and the uid check alone refuses strangers; a systemd socket unit can set its group",
                    path.display(),
                    access.owner,
                    access.group
                );
            }
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(Bound { listener, lock })
}

/// Removes a socket file left at `path` by a process that is gone; the
/// caller proves it is gone by holding the lock that guards the path.
/// Anything else in the way (a regular file, a directory) is an error,
/// never deleted.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use tambo_proto::identity::Account;

    fn dev() -> Identities {
        Identities::development(Account {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        })
    }

    #[test]
    fn binds_with_mode_and_refuses_a_live_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/submit.sock");
        let access = IpcSocket::Submit.access(&dev());
        assert_eq!(access.mode, 0o600);
        let first = bind(&path, access).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // A second binder is refused and leaves the live socket alone.
        let e = bind(&path, access).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        // Once the first is gone, its stale socket file is replaced.
        drop(first);
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
        let _second = bind(&path, access).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    }

    #[test]
    fn runtime_dir_modes() {
        let dir = tempfile::tempdir().unwrap();
        // Whatever the umask (the daemons run with 077), every directory
        // created gets the mode, parents included.
        let shared = dir.path().join("new/parent/run");
        create_runtime_dir(&shared, false).unwrap();
        for d in ["new", "new/parent", "new/parent/run"] {
            let m = std::fs::metadata(dir.path().join(d)).unwrap().mode() & 0o777;
            assert_eq!(m, 0o755, "{d}");
        }
        let private = dir.path().join("private");
        create_runtime_dir(&private, true).unwrap();
        assert_eq!(std::fs::metadata(&private).unwrap().mode() & 0o777, 0o700);
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(create_runtime_dir(&dir.path().join("file"), false).is_err());
        // A directory others can write to is refused.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = create_runtime_dir(&open, false).unwrap_err();
        assert!(e.to_string().contains("writable by nobody else"), "{e}");
        // A symlink, even to a good directory, is refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        assert!(create_runtime_dir(&link, false).is_err());
        if nix::unistd::geteuid().is_root() {
            // So is a directory of another (non-root) user.
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(1)), None).unwrap();
            assert!(create_runtime_dir(&theirs, false).is_err());
        }
    }

    #[test]
    fn never_removes_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deliver.sock");
        std::fs::write(&path, b"precious").unwrap();
        assert!(bind(&path, IpcSocket::Deliver.access(&dev())).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn production_access_names_the_serving_and_connecting_users() {
        let system = |name: &str| -> Option<Account> {
            let n = match name {
                "s" => 101,
                "q" => 102,
                "d" => 103,
                "m" => 104,
                _ => return None,
            };
            Some(Account {
                uid: n,
                gid: n + 1000,
            })
        };
        let users = tambo_proto::identity::RoleUsers {
            smtpd: "s",
            queued: "q",
            deliverd: "d",
            monitord: "m",
        };
        let ids =
            Identities::decide(&users, Role::Ctl, Account { uid: 0, gid: 0 }, system).unwrap();
        assert_eq!(
            IpcSocket::Submit.access(&ids),
            Access {
                owner: Some(102),
                group: Some(1101),
                mode: 0o660
            }
        );
        assert_eq!(
            IpcSocket::Deliver.access(&ids),
            Access {
                owner: Some(102),
                group: Some(1103),
                mode: 0o660
            }
        );
        assert_eq!(IpcSocket::Monitor.access(&ids).owner, Some(104));
    }
}
