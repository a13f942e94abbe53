//! The sd_notify receiver: the datagram socket the daemons send `READY=1`
//! and `STATUS=<reason>` to (sd_notify(3), through `NOTIFY_SOCKET`), as
//! they would to systemd.
//!
//! Anyone who can reach the socket can send to it, so a message counts only
//! if the kernel-attached sender pid (SCM_CREDENTIALS, which the sender
//! cannot forge) is one of the supervisor's daemons; the caller decides
//! that with the pid this module returns.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};
use tokio::io::Interest;

/// The socket's file name in the runtime directory.
pub const FILE_NAME: &str = "notify.sock";

/// Larger than any notification a daemon sends; longer ones are dropped.
const MAX_MESSAGE: usize = 4096;

/// One line of a notification that the supervisor acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `READY=1`: the daemon serves.
    Ready,
    /// `STATUS=…`: for a daemon about to fail, its one-line reason.
    Status(String),
}

/// A notification and the pid of the process that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub pid: i32,
    pub messages: Vec<Message>,
}

/// The bound receiving socket.
#[derive(Debug)]
pub struct NotifySocket {
    sock: tokio::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds `path`, replacing a socket file left there by an earlier
    /// supervisor (the caller holds the runtime directory's lock, so no
    /// live one uses it). Mode 0666: smtpd and monitord report readiness
    /// after dropping root, and the sender-pid check, not the mode, decides
    /// whose messages count. Must run inside the tokio runtime.
    pub fn bind(path: &Path) -> io::Result<Self> {
        tambo_common::sockets::remove_stale_socket(path)?;
        let sock = UnixDatagram::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        setsockopt(&sock, sockopt::PassCred, &true).map_err(io::Error::from)?;
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock: tokio::net::UnixDatagram::from_std(sock)?,
            path: path.to_path_buf(),
        })
    }

    /// The path children get as their `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolves when a message may be waiting.
    pub async fn readable(&self) -> io::Result<()> {
        self.sock.readable().await
    }

    /// Every message queued now, without waiting. Messages without sender
    /// credentials, truncated or not UTF-8 are dropped with a debug line.
    pub fn drain(&self) -> Vec<Received> {
        let mut out = Vec::new();
        loop {
            let fd = self.sock.as_raw_fd();
            match self.sock.try_io(Interest::READABLE, || recv_one(fd)) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("{}: {e}", self.path.display());
                    break;
                }
            }
        }
        out
    }
}

/// Receives one datagram. `Ok(None)`: one was read but is not usable.
fn recv_one(fd: RawFd) -> io::Result<Option<Received>> {
    let mut buf = [0u8; MAX_MESSAGE];
    // Room for the credentials only: a sender that attaches descriptors
    // gets them discarded by the kernel (and its message dropped below),
    // so none can be planted in the supervisor.
    let mut cmsg = nix::cmsg_space!(UnixCredentials);
    let (bytes, pid, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let pid = msg.cmsgs().ok().and_then(|mut cmsgs| {
            cmsgs.find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                _ => None,
            })
        });
        (
            msg.bytes,
            pid,
            msg.flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
        )
    };
    let Some(pid) = pid.filter(|_| !truncated) else {
        tracing::debug!("notification without sender credentials, or truncated: dropped");
        return Ok(None);
    };
    match std::str::from_utf8(&buf[..bytes]) {
        Ok(text) => Ok(Some(Received {
            pid,
            messages: parse(text),
        })),
        Err(_) => {
            tracing::debug!("notification from pid {pid} is not UTF-8: dropped");
            Ok(None)
        }
    }
}

/// The lines the supervisor acts on; others (`STOPPING=1`, `MAINPID=`…)
/// are ignored, as is a `READY` with any value but 1.
pub fn parse(text: &str) -> Vec<Message> {
    text.lines()
        .filter_map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Some(Message::Ready),
            Some(("STATUS", s)) => Some(Message::Status(s.trim().to_string())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_and_status_lines() {
        assert_eq!(parse("READY=1"), [Message::Ready]);
        assert_eq!(
            parse("STATUS=cannot open the queue: Not a directory\nREADY=1\n"),
            [
                Message::Status("cannot open the queue: Not a directory".into()),
                Message::Ready
            ]
        );
        assert!(parse("READY=0\nSTOPPING=1\nMAINPID=4\ngarbage").is_empty());
    }

    #[tokio::test]
    async fn names_the_sending_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        // A stale socket file from an earlier run is replaced.
        drop(UnixDatagram::bind(&path).unwrap());
        let sock = NotifySocket::bind(&path).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client.send_to(b"STATUS=starting\nREADY=1", &path).unwrap();
        sock.readable().await.unwrap();
        let got = sock.drain();
        assert_eq!(
            got,
            [Received {
                pid: std::process::id() as i32,
                messages: vec![Message::Status("starting".into()), Message::Ready],
            }]
        );
        assert!(sock.drain().is_empty());
    }

    #[test]
    fn never_replaces_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"precious").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        assert!(NotifySocket::bind(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
