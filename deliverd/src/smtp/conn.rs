//! The bytes of a client connection: commands out, replies in, under a
//! deadline and with bounded reads.
//!
//! Everything the server sends is read through [`Conn::read_reply`], which
//! holds at most one line of [`MAX_LINE`] bytes at a time in its buffer,
//! at most [`MAX_REPLY`] bytes in one reply, and stops after
//! [`REPLY_BUDGET`] bytes on the connection, so a hostile server can make
//! deliverd neither wait forever nor hold much memory.
//!
//! A connection that failed (an error, a timeout, a reply out of bounds)
//! is out of step with the server: it only gets closed, never another
//! command, not even QUIT.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use super::reply::{Reply, parse_line};

/// Longest reply line read, line end included. RFC 5321 §4.5.3.1.5 allows
/// 512; real servers stay well within this.
pub const MAX_LINE: usize = 4096;

/// Most bytes of replies read on one connection (REFERENCE §4.5), as
/// chasquid's client: plenty for any number of transactions a cached
/// connection carries, far too little to exhaust memory.
pub const REPLY_BUDGET: usize = 2 * 1024 * 1024;

/// Most bytes of one reply, all its lines and line ends together. The
/// longest real replies (EHLO lists, multi-line rejections) are a few
/// KiB; without this cap one reply could take the whole budget, 2 MiB
/// held as text.
pub const MAX_REPLY: usize = 64 * 1024;

/// What a connection runs over.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why talking to the server failed (not a reply it gave: those are
/// [`Reply`] values, whatever their code).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("connection closed by the server")]
    Closed,
    #[error("reply line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("the server sent more than {REPLY_BUDGET} bytes of replies on this connection")]
    TooMuch,
    #[error("a reply longer than {MAX_REPLY} bytes")]
    ReplyTooLong,
    #[error("the server sent data while the connection was idle")]
    Unsolicited,
    #[error("the server sent data ahead of the TLS handshake")]
    DataBeforeHandshake,
    #[error("cannot read the queued message: {0}")]
    Message(io::Error),
}

/// A client connection: the stream, a read buffer, what is left of the
/// reply budget, and the deadlines.
pub struct Conn {
    stream: Stream,
    buf: Box<[u8]>,
    /// Unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    budget: usize,
    /// When the current session (or the current use of a cached
    /// connection) must be over.
    deadline: Instant,
    /// The longest any single wait may take, within the deadline.
    wait: Duration,
    /// A shorter limit for the next command and its reply only (the first
    /// command on a cached connection, so a dead one is found out fast).
    once: Option<Duration>,
    /// Something failed: the connection is out of step with the server.
    broken: bool,
}

impl Conn {
    pub fn new(stream: Stream, deadline: Instant, wait: Duration) -> Self {
        Conn {
            stream,
            buf: vec![0; MAX_LINE].into_boxed_slice(),
            start: 0,
            end: 0,
            budget: REPLY_BUDGET,
            deadline,
            wait,
            once: None,
            broken: false,
        }
    }

    /// Starts a new use of the connection (a cached one taken again).
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// Reply bytes the server may still send on this connection.
    pub fn budget_left(&self) -> usize {
        self.budget
    }

    /// Limits the next command (its write and its reply) to `wait`, if
    /// that is shorter than the usual wait; later ones get the usual one.
    pub fn limit_next_reply(&mut self, wait: Duration) {
        self.once = Some(wait.min(self.wait));
    }

    /// Marks the connection out of step with the server (a command was
    /// abandoned half sent): it will only be closed.
    pub fn set_broken(&mut self) {
        self.broken = true;
    }

    /// Until when the next wait may last.
    fn wait_until(&self) -> Instant {
        self.deadline
            .min(Instant::now() + self.once.unwrap_or(self.wait))
    }

    /// Notes that `e` happened, so the connection is only closed now.
    fn failed(&mut self, e: ConnError) -> ConnError {
        self.broken = true;
        e
    }

    /// Bounds `fut` by the wait limit.
    pub async fn within<T>(
        &self,
        fut: impl Future<Output = io::Result<T>>,
    ) -> Result<T, ConnError> {
        match tokio::time::timeout_at(self.wait_until(), fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ConnError::Timeout),
        }
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, ConnError> {
        self.send_line(line).await?;
        self.read_reply().await
    }

    /// Sends one command line; CRLF is added. Callers never put a CR or LF
    /// in `line` (addresses are checked before they get here).
    pub async fn send_line(&mut self, line: &str) -> Result<(), ConnError> {
        debug_assert!(!line.contains(['\r', '\n']));
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write_all(&bytes).await?;
        self.flush().await
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        let until = self.wait_until();
        match tokio::time::timeout_at(until, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.failed(e.into())),
            Err(_) => Err(self.failed(ConnError::Timeout)),
        }
    }

    pub async fn flush(&mut self) -> Result<(), ConnError> {
        let until = self.wait_until();
        match tokio::time::timeout_at(until, self.stream.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.failed(e.into())),
            Err(_) => Err(self.failed(ConnError::Timeout)),
        }
    }

    /// Reads one whole reply. Continuation lines must carry the same code.
    /// Any error leaves the connection broken.
    pub async fn read_reply(&mut self) -> Result<Reply, ConnError> {
        let r = self.read_reply_inner().await;
        self.once = None;
        r.map_err(|e| self.failed(e))
    }

    async fn read_reply_inner(&mut self) -> Result<Reply, ConnError> {
        let mut text = String::new();
        let mut code = None;
        let mut size = 0;
        loop {
            let (raw, len) = self.read_line().await?;
            size += len;
            if size > MAX_REPLY {
                return Err(ConnError::ReplyTooLong);
            }
            let line = parse_line(&raw).map_err(|_| ConnError::Malformed(snippet(&raw)))?;
            if code.is_some_and(|c| c != line.code) {
                return Err(ConnError::Malformed(snippet(&raw)));
            }
            code = Some(line.code);
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(line.text);
            if !line.more {
                return Ok(Reply {
                    code: line.code,
                    text,
                });
            }
        }
    }

    /// One line, without its line end (CRLF, or a bare LF: being lenient
    /// here cannot smuggle anything, the line is only read), and how many
    /// bytes it took, line end included.
    async fn read_line(&mut self) -> Result<(String, usize), ConnError> {
        loop {
            let unread = &self.buf[self.start..self.end];
            if let Some(pos) = unread.iter().position(|&b| b == b'\n') {
                let line = unread[..pos].strip_suffix(b"\r").unwrap_or(&unread[..pos]);
                let line = String::from_utf8_lossy(line).into_owned();
                self.start += pos + 1;
                return Ok((line, pos + 1));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                return Err(ConnError::LineTooLong);
            }
            if self.budget == 0 {
                return Err(ConnError::TooMuch);
            }
            let room = (self.buf.len() - self.end).min(self.budget);
            let until = self.wait_until();
            let read = self.stream.read(&mut self.buf[self.end..self.end + room]);
            let n = match tokio::time::timeout_at(until, read).await {
                Ok(r) => r?,
                Err(_) => return Err(ConnError::Timeout),
            };
            if n == 0 {
                return Err(ConnError::Closed);
            }
            self.end += n;
            self.budget -= n;
        }
    }

    /// Whether the connection is fit to be parked or taken again: not
    /// broken, nothing unread in the buffer, and nothing (bytes, or the
    /// end of the stream) waiting on the socket. Whatever a server sends
    /// unasked would be read as the reply to the next command and put
    /// every later reply out of step, so it makes the connection unfit
    /// (and broken). Waits [`IDLE_PEEK`] at most.
    pub async fn check_idle(&mut self) -> Result<(), ConnError> {
        if self.broken {
            return Err(ConnError::Closed);
        }
        if self.start != self.end {
            return Err(self.failed(ConnError::Unsolicited));
        }
        if self.budget == 0 {
            return Err(self.failed(ConnError::TooMuch));
        }
        self.start = 0;
        self.end = 0;
        let room = self.buf.len().min(self.budget);
        // A read that is still pending after the peek: nothing was there.
        // Bytes already in the kernel's buffer are always found: the wait
        // lets tokio's reactor see the socket readable, and the read is
        // polled before the timer.
        let n = match tokio::time::timeout(IDLE_PEEK, self.stream.read(&mut self.buf[..room])).await
        {
            Err(_) => return Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(self.failed(e.into())),
        };
        if n == 0 {
            return Err(self.failed(ConnError::Closed));
        }
        self.end = n;
        self.budget -= n;
        Err(self.failed(ConnError::Unsolicited))
    }

    /// The plain TCP stream, to start TLS on, and what is left of the
    /// reply budget. Bytes the server sent after its reply to STARTTLS
    /// would be read as if they came over TLS (CVE-2011-1575 and kin), so
    /// their presence is an error.
    pub fn into_tcp(self) -> Result<(TcpStream, usize), ConnError> {
        if self.start != self.end {
            return Err(ConnError::DataBeforeHandshake);
        }
        match self.stream {
            Stream::Tcp(s) => Ok((s, self.budget)),
            _ => Err(ConnError::Io(io::Error::other(
                "STARTTLS on a connection that is not plain TCP",
            ))),
        }
    }

    /// A connection over `stream` that continues one whose budget was
    /// `budget` (after STARTTLS).
    pub fn resume(stream: Stream, budget: usize, deadline: Instant, wait: Duration) -> Self {
        let mut c = Conn::new(stream, deadline, wait);
        c.budget = budget;
        c
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Sends QUIT and waits a little for the answer; errors do not matter
    /// any more, the connection is closed either way. A broken connection
    /// gets no QUIT: the server could take it for anything (message data,
    /// say), and its reply would not be the one read.
    pub async fn quit(mut self) {
        self.deadline = Instant::now() + QUIT_WAIT.min(self.wait);
        if !self.broken {
            let _ = self.command("QUIT").await;
        }
        let _ = tokio::time::timeout_at(self.deadline, self.stream.shutdown()).await;
    }
}

/// How long QUIT may take.
const QUIT_WAIT: Duration = Duration::from_secs(10);

/// How long [`Conn::check_idle`] looks for unasked data. tokio learns
/// that a socket is readable from its reactor, which a read that does not
/// wait at all may not have asked yet.
const IDLE_PEEK: Duration = Duration::from_millis(1);

/// The start of a bad line, for the error text (which quotes it).
fn snippet(line: &str) -> String {
    line.chars().take(64).collect()
}

#[cfg(test)]
mod tests;
