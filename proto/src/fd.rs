//! Descriptors handed to us by another process: a message file descriptor
//! passed to deliverd (SCM_RIGHTS) on deliver.sock, so deliverd reads
//! exactly one message and never the queue directory; and the listening
//! sockets a daemon inherits from systemd or `tambo run`
//! ([`adopt_inherited_socket`], used by [`crate::activation`]).
//!
//! This is the only module in tambo with `unsafe`: turning the descriptor
//! numbers the kernel hands us into owned values. Everything else goes
//! through nix's safe wrappers.
//!
//! Once a socket carries descriptors, every read on it must be a `recvmsg`
//! with room for control data — a plain `read` would silently close them —
//! so [`FdReader`] owns the reading side completely.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::de::DeserializeOwned;
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::Error;
use crate::frame::{body_len, decode};

/// Descriptors already adopted by [`adopt_inherited_socket`], so none is
/// ever owned twice.
static ADOPTED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Takes ownership of a socket this process inherited at `fd` (socket
/// activation: systemd or `tambo run` put it there before exec). Refuses a
/// number that is not open, is not a socket, is already close-on-exec, or
/// was adopted already; marks it close-on-exec so no child of ours
/// inherits it.
///
/// The close-on-exec test is what keeps this sound: a descriptor that
/// survived an exec cannot have had the flag, and everything Rust's
/// standard library, tokio and nix open in this process has it, so an
/// inherited number is never one something here already owns. The daemons
/// also call it first thing, before their runtime exists. Only
/// [`crate::activation`] calls it.
pub(crate) fn adopt_inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::stat::{SFlag, fstat};
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is stdin, stdout or stderr"),
        ));
    }
    let mut adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    if adopted.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("descriptor {fd} was adopted already"),
        ));
    }
    // SAFETY: borrowing only for the duration of these checks; if `fd` is
    // not open, the calls fail with EBADF and nothing else happens.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = fcntl(borrowed, FcntlArg::F_GETFD).map_err(io::Error::from)?;
    if FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is close-on-exec: it was opened here, not inherited"),
        ));
    }
    let st = fstat(borrowed).map_err(io::Error::from)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a socket"),
        ));
    }
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    adopted.push(fd);
    // SAFETY: `fd` is open (F_GETFD succeeded), is a socket, and was not
    // close-on-exec, so it came across exec and nothing in this process
    // opened (and owns) it; ADOPTED makes sure it is owned at most once, so
    // the OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one whole frame; `fd` travels with its first byte.
pub async fn send_with_fd(stream: &UnixStream, frame: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let raw = stream.as_raw_fd();
    let mut sent = stream
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(frame)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(raw, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
        })
        .await?;
    // The descriptor went with the first part; the rest is plain bytes.
    while sent < frame.len() {
        sent += stream
            .async_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(&frame[sent..])];
                sendmsg::<()>(raw, &iov, &[], MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
            })
            .await?;
    }
    Ok(())
}

/// Reads frames, and the descriptors that came with them, from a socket.
pub struct FdReader<S> {
    stream: S,
    buf: Vec<u8>,
    /// Start of unread data in `buf`.
    pos: usize,
    /// Descriptors received, oldest first; a job frame takes one.
    fds: VecDeque<OwnedFd>,
}

/// Room for as many descriptors as Linux passes in one message
/// (SCM_MAX_FD), so the kernel never truncates control data — truncated
/// descriptors would be installed but unreachable, i.e. leaked.
const MAX_FDS_PER_READ: usize = 253;

impl<S: AsRef<UnixStream>> FdReader<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
            fds: VecDeque::new(),
        }
    }

    /// Reads one frame of at most `max` bytes. `Ok(None)` is a clean end
    /// between frames.
    pub async fn read_frame<T: DeserializeOwned>(
        &mut self,
        max: usize,
    ) -> Result<Option<T>, Error> {
        if !self.fill(4).await? {
            let got = self.available();
            return if got == 0 {
                Ok(None)
            } else {
                Err(Error::Truncated { expected: 4, got })
            };
        }
        let prefix: [u8; 4] = self.buf[self.pos..self.pos + 4]
            .try_into()
            .unwrap_or([0xFF; 4]);
        let len = body_len(prefix, max)?;
        if !self.fill(4 + len).await? {
            return Err(Error::Truncated {
                expected: len,
                got: self.available() - 4,
            });
        }
        let msg = decode(&self.buf[self.pos + 4..self.pos + 4 + len]);
        self.pos += 4 + len;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        msg.map(Some)
    }

    /// The oldest descriptor received and not yet taken.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    fn available(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads until `n` bytes are buffered; false on EOF before that.
    async fn fill(&mut self, n: usize) -> Result<bool, Error> {
        while self.available() < n {
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let got = self.recv_some(n - self.available()).await?;
            if got == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn recv_some(&mut self, want: usize) -> Result<usize, Error> {
        let old_len = self.buf.len();
        let room = want.clamp(4096, 256 * 1024);
        self.buf.resize(old_len + room, 0);
        let stream = self.stream.as_ref();
        let raw: RawFd = stream.as_raw_fd();
        let mut received: Vec<RawFd> = Vec::new();
        let mut truncated = false;
        let space = &mut self.buf[old_len..];
        let result = stream
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(space)];
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]);
                let msg = recvmsg::<()>(raw, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                truncated |= msg.flags.contains(MsgFlags::MSG_CTRUNC);
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        received.extend(fds);
                    }
                }
                Ok(msg.bytes)
            })
            .await;
        for fd in received {
            // SAFETY: the kernel just installed this descriptor in our table
            // for this message (SCM_RIGHTS); nothing else refers to it, so
            // taking ownership (and closing it on drop) is sound.
            self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let n = match result {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(old_len);
                return Err(e.into());
            }
        };
        self.buf.truncate(old_len + n);
        if truncated {
            return Err(Error::Decode(
                "control data truncated: too many descriptors".into(),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::{Job, Target, ToDeliverd};
    use crate::frame::encode;
    use std::io::{Read, Seek, Write};

    #[tokio::test]
    async fn descriptors_travel_with_their_frames() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut files = Vec::new();
        for i in 0..3u64 {
            let mut f = tempfile::tempfile().unwrap();
            write!(f, "message {i}").unwrap();
            f.rewind().unwrap();
            files.push(f);
        }
        let sender = tokio::spawn(async move {
            for (i, f) in files.iter().enumerate() {
                let job = ToDeliverd::Job(Job {
                    job: i as u64,
                    queue_id: "q".into(),
                    from: "a@b".into(),
                    to: vec!["c@d".into()],
                    target: Target::Local,
                    security: None,
                    maybe_delivered: false,
                    positions: Vec::new(),
                });
                // Pad frames so they need more than one read.
                let bytes = encode(&job).unwrap();
                send_with_fd(&a, &bytes, std::os::fd::AsFd::as_fd(f))
                    .await
                    .unwrap();
            }
            a
        });
        let mut r = FdReader::new(b);
        for i in 0..3u64 {
            let msg: ToDeliverd = r
                .read_frame(crate::frame::MAX_SMALL_FRAME)
                .await
                .unwrap()
                .unwrap();
            let ToDeliverd::Job(job) = msg else {
                panic!("not a job: {msg:?}")
            };
            assert_eq!(job.job, i);
            let mut f = std::fs::File::from(r.take_fd().expect("fd"));
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, format!("message {i}"));
        }
        drop(sender.await.unwrap());
        assert!(
            r.read_frame::<ToDeliverd>(crate::frame::MAX_SMALL_FRAME)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn inherited_sockets_are_adopted_once_and_checked() {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // Opened here, close-on-exec: never taken for an inherited one.
        assert!(adopt_inherited_socket(b.as_raw_fd()).is_err());
        // Hand the descriptor over as an exec would: no close-on-exec, and
        // nobody else owns it.
        fcntl(&a, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(OwnedFd::from(a));
        let owned = adopt_inherited_socket(raw).unwrap();
        assert_eq!(owned.as_raw_fd(), raw);
        assert!(adopt_inherited_socket(raw).is_err(), "never twice");
        assert!(adopt_inherited_socket(1).is_err(), "not stdio");
        // A regular file is not a socket.
        let f = tempfile::tempfile().unwrap();
        assert!(adopt_inherited_socket(f.as_raw_fd()).is_err());
        // A closed number is refused.
        assert!(adopt_inherited_socket(1_000_000).is_err());
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let bytes = encode(&ToDeliverd::Job(Job {
            job: 1,
            queue_id: "q".into(),
            from: String::new(),
            to: vec!["x".into()],
            target: Target::Remote,
            security: None,
            maybe_delivered: false,
            positions: Vec::new(),
        }))
        .unwrap();
        a.try_write(&bytes[..bytes.len() - 2]).unwrap();
        drop(a);
        let mut r = FdReader::new(b);
        assert!(matches!(
            r.read_frame::<ToDeliverd>(crate::frame::MAX_SMALL_FRAME)
                .await,
            Err(Error::Truncated { .. })
        ));
    }
}
