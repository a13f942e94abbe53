//! The first frame on every connection, and who is on the other end.
//!
//! Identity comes from the channel, not the claim: both sides read the
//! other's uid from the kernel (SO_PEERCRED) and refuse a peer whose uid is
//! not the one configured for the role it claims (see [`crate::identity`]).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::Error;
use crate::frame::{MAX_HELLO_FRAME, read_frame_max, write_frame};
use crate::identity::Identities;

/// Bumped whenever any message enum in this crate changes.
pub const PROTOCOL_VERSION: u32 = 5;

/// Which tambo program is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Smtpd,
    Queued,
    Deliverd,
    Monitord,
    /// The `tambo` command-line tool.
    Ctl,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Smtpd => "smtpd",
            Role::Queued => "queued",
            Role::Deliverd => "deliverd",
            Role::Monitord => "monitord",
            Role::Ctl => "ctl",
        }
    }
}

/// Sent first by the connecting side; the accepting side answers with its
/// own `Hello` if it accepts the connection, and closes it otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub role: Role,
}

/// The peer of an accepted connection: its role, checked against what the
/// kernel says about it (SO_PEERCRED), which cannot be forged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// How long a peer has to say hello before it is dropped.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

fn timed_out() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no hello in time",
    ))
}

/// Server side: reads the peer's `Hello`, checks its version, its role and
/// that its uid may play that role, and answers with ours. `me` is the
/// accepting daemon's role.
pub async fn accept(
    stream: &mut UnixStream,
    me: Role,
    allowed: &[Role],
    ids: &Identities,
) -> Result<Peer, Error> {
    let cred = stream.peer_cred()?;
    let hello: Hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame_max(stream, MAX_HELLO_FRAME))
        .await
        .map_err(|_| timed_out())??
        .ok_or(Error::Truncated {
            expected: 4,
            got: 0,
        })?;
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Error::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: hello.protocol_version,
        });
    }
    if !allowed.contains(&hello.role) {
        return Err(Error::RoleNotAllowed { role: hello.role });
    }
    if !ids.allows(hello.role, cred.uid()) {
        return Err(Error::PeerNotAllowed {
            uid: cred.uid(),
            role: hello.role,
        });
    }
    tokio::time::timeout(
        HELLO_TIMEOUT,
        write_frame(
            stream,
            &Hello {
                protocol_version: PROTOCOL_VERSION,
                role: me,
            },
        ),
    )
    .await
    .map_err(|_| timed_out())??;
    Ok(Peer {
        role: hello.role,
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// Client side: connects to `path`, checks that the process listening
/// there runs as `expect`'s user (before sending anything), says who we
/// are, and waits for the answer.
pub async fn connect(
    path: &Path,
    me: Role,
    expect: Role,
    ids: &Identities,
) -> Result<UnixStream, Error> {
    let mut stream = UnixStream::connect(path).await?;
    let cred = stream.peer_cred()?;
    if !ids.allows(expect, cred.uid()) {
        return Err(Error::PeerNotAllowed {
            uid: cred.uid(),
            role: expect,
        });
    }
    let answer: Hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        write_frame(
            &mut stream,
            &Hello {
                protocol_version: PROTOCOL_VERSION,
                role: me,
            },
        )
        .await?;
        read_frame_max(&mut stream, MAX_HELLO_FRAME).await
    })
    .await
    .map_err(|_| timed_out())??
    .ok_or(Error::Truncated {
        expected: 4,
        got: 0,
    })?;
    if answer.protocol_version != PROTOCOL_VERSION {
        return Err(Error::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: answer.protocol_version,
        });
    }
    if answer.role != expect {
        return Err(Error::RoleNotAllowed { role: answer.role });
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode;
    use crate::identity::Account;
    use tokio::io::AsyncWriteExt;

    fn me() -> Identities {
        Identities::development(Account {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        })
    }

    /// As if every role ran as some other, unprivileged user (and root
    /// were not trusted, so the test means something when run as root).
    fn others() -> Identities {
        let other = Account {
            uid: 4_000_000,
            gid: 4_000_000,
        };
        Identities::development(other).without_root_exception()
    }

    async fn server(dir: &Path) -> tokio::net::UnixListener {
        tokio::net::UnixListener::bind(dir.join("s.sock")).unwrap()
    }

    #[tokio::test]
    async fn handshake_reports_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let l = server(dir.path()).await;
        let path = dir.path().join("s.sock");
        let client =
            tokio::spawn(async move { connect(&path, Role::Smtpd, Role::Queued, &me()).await });
        let (mut s, _) = l.accept().await.unwrap();
        let peer = accept(&mut s, Role::Queued, &[Role::Smtpd], &me())
            .await
            .unwrap();
        assert_eq!(peer.role, Role::Smtpd);
        assert_eq!(peer.uid, nix::unistd::getuid().as_raw());
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        client.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn wrong_version_and_role_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = server(dir.path()).await;
        for (hello, want_version) in [
            (
                Hello {
                    protocol_version: PROTOCOL_VERSION + 1,
                    role: Role::Smtpd,
                },
                true,
            ),
            (
                Hello {
                    protocol_version: PROTOCOL_VERSION,
                    role: Role::Deliverd,
                },
                false,
            ),
        ] {
            let mut c = UnixStream::connect(dir.path().join("s.sock"))
                .await
                .unwrap();
            c.write_all(&encode(&hello).unwrap()).await.unwrap();
            let (mut s, _) = l.accept().await.unwrap();
            let err = accept(&mut s, Role::Queued, &[Role::Smtpd], &me())
                .await
                .unwrap_err();
            if want_version {
                assert!(matches!(err, Error::VersionMismatch { .. }), "{err}");
            } else {
                assert!(
                    matches!(
                        err,
                        Error::RoleNotAllowed {
                            role: Role::Deliverd
                        }
                    ),
                    "{err}"
                );
            }
        }
    }

    #[tokio::test]
    async fn garbage_hello_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = server(dir.path()).await;
        let mut c = UnixStream::connect(dir.path().join("s.sock"))
            .await
            .unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        assert!(
            accept(&mut s, Role::Queued, &[Role::Smtpd], &me())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn wrong_uid_is_refused_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        let l = server(dir.path()).await;
        let path = dir.path().join("s.sock");
        // The server runs as us, but the client expects queued to be
        // another user: it refuses before saying anything.
        let err = connect(&path, Role::Smtpd, Role::Queued, &others())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::PeerNotAllowed {
                    role: Role::Queued,
                    ..
                }
            ),
            "{err}"
        );
        // The server expects smtpd to be another user.
        let client =
            tokio::spawn(async move { connect(&path, Role::Smtpd, Role::Queued, &me()).await });
        let (_first, _) = l.accept().await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let err = accept(&mut s, Role::Queued, &[Role::Smtpd], &others())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::PeerNotAllowed {
                    role: Role::Smtpd,
                    ..
                }
            ),
            "{err}"
        );
        drop(s);
        assert!(client.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn oversize_hello_is_refused_before_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let l = server(dir.path()).await;
        let mut c = UnixStream::connect(dir.path().join("s.sock"))
            .await
            .unwrap();
        // Announces a 1 MiB hello.
        c.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let err = accept(&mut s, Role::Queued, &[Role::Smtpd], &me())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err}");
    }
}
