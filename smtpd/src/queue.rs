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

/// Most foreseen replies left unread (the Session's and a MAIL's): a
/// client pipelining MAIL after MAIL must not fill the socket with
/// replies nobody reads until queued's writes block.
const MAX_OWED: u32 = 2;

pub struct QueueLink {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    last_used: Instant,
    /// Replies to [`send_foreseen`](Self::send_foreseen) requests not read
    /// yet: each must be `Ok`, and is read before the next reply.
    owed: u32,
    /// Frames [`hold`](Self::hold) kept back, written before the next.
    held: Vec<u8>,
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
        let mut link = Self::over(stream);
        // queued refuses a Session only if its client is no address (this
        // is the peer's) or it is the link's second.
        link.send_foreseen(&SubmitRequest::Session { client, mode, tls })
            .await?;
        Ok(link)
    }

    fn over(stream: tokio::net::UnixStream) -> Self {
        let (r, w) = stream.into_split();
        Self {
            reader: FrameReader::new(r),
            writer: w,
            last_used: Instant::now(),
            owed: 0,
            held: Vec::new(),
        }
    }

    /// Sends a request and waits for its one reply.
    pub async fn call(&mut self, req: &SubmitRequest) -> Result<SubmitReply, Error> {
        self.send(req).await?;
        self.reply().await
    }

    /// Sends a request that queued is known to answer with `Ok` (smtpd
    /// sees everything it could be refused for), without waiting: its
    /// reply is read before the next one, and anything but `Ok` there
    /// breaks the link. One round trip to queued fewer for the client to
    /// wait on.
    pub async fn send_foreseen(&mut self, req: &SubmitRequest) -> Result<(), Error> {
        while self.owed >= MAX_OWED {
            self.read_owed().await?;
        }
        self.send(req).await?;
        self.owed += 1;
        Ok(())
    }

    /// Reads one owed reply, which must be `Ok`.
    async fn read_owed(&mut self) -> Result<(), Error> {
        let reply = self.read_reply().await?;
        self.owed -= 1;
        match reply {
            SubmitReply::Ok => Ok(()),
            other => {
                tracing::error!("queued refused a request smtpd had answered for it: {other:?}");
                Err(Error::Unexpected("queued refused a foreseen request"))
            }
        }
    }

    /// Waits for the reply to a request [`send`](Self::send) sent
    /// earlier: for a request whose answer is only needed later.
    pub async fn reply(&mut self) -> Result<SubmitReply, Error> {
        while self.owed > 0 {
            self.read_owed().await?;
        }
        self.read_reply().await
    }

    async fn read_reply(&mut self) -> Result<SubmitReply, Error> {
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
        let mut bytes = encode(req)?;
        if !self.held.is_empty() {
            let mut all = std::mem::take(&mut self.held);
            all.append(&mut bytes);
            bytes = all;
        }
        tokio::time::timeout(CALL_TIMEOUT, self.writer.write_all(&bytes))
            .await
            .map_err(|_| Error::Io(std::io::ErrorKind::TimedOut.into()))??;
        self.last_used = Instant::now();
        Ok(())
    }

    /// Keeps a request back, to go out in one write with the next one
    /// [`send`](Self::send) sends: a message's last chunk with its end,
    /// one write and one wake-up of queued, not two.
    pub fn hold(&mut self, req: &SubmitRequest) -> Result<(), Error> {
        self.held.extend_from_slice(&encode(req)?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tambo_proto::submit::RcptVerdict;
    use tokio::net::UnixStream;

    /// The link, and queued's end of it.
    fn pair() -> (QueueLink, FrameReader<UnixStream>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let b2 = b.into_std().unwrap();
        let w = UnixStream::from_std(b2.try_clone().unwrap()).unwrap();
        (
            QueueLink::over(a),
            FrameReader::new(UnixStream::from_std(b2).unwrap()),
            w,
        )
    }

    async fn answer(w: &mut UnixStream, reply: &SubmitReply) {
        w.write_all(&encode(reply).unwrap()).await.unwrap();
    }

    #[tokio::test]
    async fn foreseen_answers_are_read_before_the_next_reply() {
        let (mut link, mut queued, mut w) = pair();
        link.send_foreseen(&SubmitRequest::Rset).await.unwrap();
        link.send_foreseen(&SubmitRequest::Ping).await.unwrap();
        answer(&mut w, &SubmitReply::Ok).await;
        answer(&mut w, &SubmitReply::Ok).await;
        answer(&mut w, &SubmitReply::Rcpt(RcptVerdict::NoSuchUser)).await;
        let reply = link
            .call(&SubmitRequest::Rcpt { to: "a@b".into() })
            .await
            .unwrap();
        assert_eq!(reply, SubmitReply::Rcpt(RcptVerdict::NoSuchUser));
        for want in ["Rset", "Ping", "Rcpt"] {
            let got: SubmitRequest = queued.read(MAX_SMALL_FRAME).await.unwrap().unwrap();
            assert!(format!("{got:?}").starts_with(want), "{got:?}");
        }
    }

    #[tokio::test]
    async fn a_foreseen_request_refused_breaks_the_link() {
        let (mut link, _queued, mut w) = pair();
        link.send_foreseen(&SubmitRequest::Rset).await.unwrap();
        answer(&mut w, &SubmitReply::BadSequence("no".into())).await;
        answer(&mut w, &SubmitReply::Rcpt(RcptVerdict::Accepted)).await;
        let r = link.call(&SubmitRequest::Rcpt { to: "a@b".into() }).await;
        assert!(r.is_err(), "{r:?}");
    }

    #[tokio::test]
    async fn a_client_pipelining_mails_leaves_at_most_two_replies_unread() {
        let (mut link, mut queued, mut w) = pair();
        link.send_foreseen(&SubmitRequest::Rset).await.unwrap();
        link.send_foreseen(&SubmitRequest::Rset).await.unwrap();
        // A third waits for the first reply before it goes out.
        let mut third = tokio::spawn(async move {
            link.send_foreseen(&SubmitRequest::Rset)
                .await
                .map(|()| link)
        });
        for _ in 0..2 {
            let _: SubmitRequest = queued.read(MAX_SMALL_FRAME).await.unwrap().unwrap();
        }
        // What must not happen can only be waited for a while.
        let early = tokio::time::timeout(Duration::from_millis(200), &mut third).await;
        assert!(early.is_err(), "the third went out with two replies unread");
        answer(&mut w, &SubmitReply::Ok).await;
        let link = third.await.unwrap().unwrap();
        assert_eq!(link.owed, 2);
        let _: SubmitRequest = queued.read(MAX_SMALL_FRAME).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_held_request_goes_before_the_next_one_and_not_alone() {
        let (mut link, mut queued, w) = pair();
        link.hold(&SubmitRequest::DataChunk(b"last".to_vec()))
            .unwrap();
        // Nothing written yet (hold does no I/O, so nothing to wait for):
        // a non-blocking read on the socket itself finds nothing.
        let std = w.into_std().unwrap();
        std.set_nonblocking(true).unwrap();
        let early = std::io::Read::read(&mut &std, &mut [0u8; 64]);
        assert!(
            matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a held request went out alone: {early:?}"
        );
        link.send(&SubmitRequest::DataEnd).await.unwrap();
        let got: SubmitRequest = queued.read(MAX_SMALL_FRAME).await.unwrap().unwrap();
        assert_eq!(got, SubmitRequest::DataChunk(b"last".to_vec()));
        let got: SubmitRequest = queued.read(MAX_SMALL_FRAME).await.unwrap().unwrap();
        assert_eq!(got, SubmitRequest::DataEnd);
    }
}
