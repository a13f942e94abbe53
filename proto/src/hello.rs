//! The first frame on every connection, and who is on the other end.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::Error;
use crate::frame::{read_frame, write_frame};

/// Bumped whenever any message enum in this crate changes.
pub const PROTOCOL_VERSION: u32 = 1;

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

/// The peer of an accepted connection: its claimed role and what the
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

/// Server side: reads the peer's `Hello`, checks version and role, and
/// answers with ours. `me` is the accepting daemon's role.
pub async fn accept(stream: &mut UnixStream, me: Role, allowed: &[Role]) -> Result<Peer, Error> {
    let cred = stream.peer_cred()?;
    let hello: Hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(stream))
        .await
        .map_err(|_| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no hello in time",
            ))
        })??
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
    write_frame(
        stream,
        &Hello {
            protocol_version: PROTOCOL_VERSION,
            role: me,
        },
    )
    .await?;
    Ok(Peer {
        role: hello.role,
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// Client side: connects to `path`, says who we are, waits for the answer.
pub async fn connect(path: &Path, me: Role, expect: Role) -> Result<UnixStream, Error> {
    let mut stream = UnixStream::connect(path).await?;
    write_frame(
        &mut stream,
        &Hello {
            protocol_version: PROTOCOL_VERSION,
            role: me,
        },
    )
    .await?;
    let answer: Hello = read_frame(&mut stream).await?.ok_or(Error::Truncated {
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
    use tokio::io::AsyncWriteExt;

    async fn server(dir: &Path) -> tokio::net::UnixListener {
        tokio::net::UnixListener::bind(dir.join("s.sock")).unwrap()
    }

    #[tokio::test]
    async fn handshake_reports_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let l = server(dir.path()).await;
        let path = dir.path().join("s.sock");
        let client = tokio::spawn(async move { connect(&path, Role::Smtpd, Role::Queued).await });
        let (mut s, _) = l.accept().await.unwrap();
        let peer = accept(&mut s, Role::Queued, &[Role::Smtpd]).await.unwrap();
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
            let err = accept(&mut s, Role::Queued, &[Role::Smtpd])
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
        assert!(accept(&mut s, Role::Queued, &[Role::Smtpd]).await.is_err());
    }
}
