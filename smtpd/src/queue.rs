//! This session's link to queued over submit.sock.
//!
//! One connection per SMTP session: queued ties the envelope (and later the
//! authentication) to it, so smtpd holds no policy state of its own.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use tambo_proto::frame::{encode, read_frame};
use tambo_proto::hello;
use tambo_proto::submit::{Mode, SubmitReply, SubmitRequest};
use tambo_proto::{Error, Role};

/// How long queued may take to answer one request, fsync included.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

pub struct QueueLink {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
}

impl QueueLink {
    pub async fn connect(path: &Path, client: String, mode: Mode) -> Result<Self, Error> {
        let stream = hello::connect(path, Role::Smtpd, Role::Queued).await?;
        let (r, w) = stream.into_split();
        let mut link = Self {
            reader: BufReader::new(r),
            writer: BufWriter::new(w),
        };
        match link.call(&SubmitRequest::Session { client, mode }).await? {
            SubmitReply::Ok => Ok(link),
            _ => Err(Error::Unexpected("reply to Session")),
        }
    }

    /// Sends a request and waits for its one reply.
    pub async fn call(&mut self, req: &SubmitRequest) -> Result<SubmitReply, Error> {
        self.send(req).await?;
        self.writer.flush().await?;
        match tokio::time::timeout(CALL_TIMEOUT, read_frame(&mut self.reader)).await {
            Ok(Ok(Some(reply))) => Ok(reply),
            Ok(Ok(None)) => Err(Error::Truncated {
                expected: 4,
                got: 0,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Io(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// Queues a request that has no reply (body chunks, abort); it goes out
    /// with the next flush or once the buffer fills.
    pub async fn send(&mut self, req: &SubmitRequest) -> Result<(), Error> {
        let bytes = encode(req)?;
        self.writer.write_all(&bytes).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), Error> {
        self.writer.flush().await?;
        Ok(())
    }
}
