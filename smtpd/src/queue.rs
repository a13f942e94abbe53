//! This session's link to queued over submit.sock.
//!
//! One connection per SMTP session, opened at the session's first MAIL (an
//! idle or greeting-only client costs queued nothing): queued ties the
//! envelope (and later the authentication) to it, so smtpd holds no policy
//! state of its own.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use tambo_proto::frame::{FrameReader, MAX_SMALL_FRAME, encode};
use tambo_proto::hello;
use tambo_proto::identity::Identities;
use tambo_proto::submit::{Mode, SubmitReply, SubmitRequest};
use tambo_proto::{Error, Role};

/// How long queued may take to answer one request, fsync included.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

pub struct QueueLink {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    last_used: Instant,
}

impl QueueLink {
    /// Connects (checking that queued is who answers) and opens the
    /// session.
    pub async fn connect(
        path: &Path,
        client: String,
        mode: Mode,
        tls: bool,
        ids: &Identities,
    ) -> Result<Self, Error> {
        let stream = hello::connect(path, Role::Smtpd, Role::Queued, ids).await?;
        let (r, w) = stream.into_split();
        let mut link = Self {
            reader: FrameReader::new(r),
            writer: w,
            last_used: Instant::now(),
        };
        match link
            .call(&SubmitRequest::Session { client, mode, tls })
            .await?
        {
            SubmitReply::Ok => Ok(link),
            _ => Err(Error::Unexpected("reply to Session")),
        }
    }

    /// Sends a request and waits for its one reply.
    pub async fn call(&mut self, req: &SubmitRequest) -> Result<SubmitReply, Error> {
        self.send(req).await?;
        self.reply().await
    }

    /// Waits for the reply to a request [`send`](Self::send) sent
    /// earlier: for a request whose answer is only needed later.
    pub async fn reply(&mut self) -> Result<SubmitReply, Error> {
        match tokio::time::timeout(CALL_TIMEOUT, self.reader.read(MAX_SMALL_FRAME)).await {
            Ok(Ok(Some(reply))) => Ok(reply),
            Ok(Ok(None)) => Err(Error::Truncated {
                expected: 4,
                got: 0,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Io(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// Sends a request: one that has no reply (body chunks, abort), or
    /// one whose reply is read later with [`reply`](Self::reply).
    pub async fn send(&mut self, req: &SubmitRequest) -> Result<(), Error> {
        let bytes = encode(req)?;
        tokio::time::timeout(CALL_TIMEOUT, self.writer.write_all(&bytes))
            .await
            .map_err(|_| Error::Io(std::io::ErrorKind::TimedOut.into()))??;
        self.last_used = Instant::now();
        Ok(())
    }

    /// How long since anything was sent to queued.
    pub fn quiet_for(&self) -> Duration {
        self.last_used.elapsed()
    }

    /// When the link will have been quiet for `every`, and needs a
    /// keepalive: a timer on the link itself, never reset by a client
    /// that keeps sending a little at a time.
    pub fn keepalive_due(&self, every: Duration) -> tokio::time::Instant {
        (self.last_used + every).into()
    }

    /// Keeps the link alive inside DATA: with what was decoded of the body
    /// so far (possibly nothing) while it goes to queued, with a ping
    /// while it is only read (`None`: queued refused it at its start).
    pub async fn keep_alive_in_data(&mut self, chunk: Option<Vec<u8>>) -> Result<(), Error> {
        match chunk {
            Some(data) => self.send(&SubmitRequest::DataChunk(data)).await,
            None => match self.call(&SubmitRequest::Ping).await? {
                SubmitReply::Ok => Ok(()),
                _ => Err(Error::Unexpected("reply to Ping")),
            },
        }
    }

    /// Pings queued if the link has been quiet for `every`, between
    /// commands (inside DATA, [`keep_alive_in_data`](Self::keep_alive_in_data)).
    pub async fn keep_alive(&mut self, every: Duration) -> Result<(), Error> {
        if self.quiet_for() < every {
            return Ok(());
        }
        match self.call(&SubmitRequest::Ping).await? {
            SubmitReply::Ok => Ok(()),
            _ => Err(Error::Unexpected("reply to Ping")),
        }
    }
}
