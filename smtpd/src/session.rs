//! One SMTP session: reads commands, answers them, streams DATA to queued.
//!
//! Everything the client sends is parsed here under fixed limits (line
//! length, timeouts, recipients, errors); every decision about where mail
//! may go is asked of queued.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use tambo_proto::frame::CHUNK_SIZE;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{Mode, RcptVerdict, SubmitReply, SubmitRequest};

use crate::command::{self, PathError, Verb};
use crate::dotreader::{DotDecoder, DotError, Progress};
use crate::queue::QueueLink;
use crate::received::{self, ReceivedInfo};

/// Longest command line, without its line ending (REFERENCE §2.2).
pub const MAX_LINE: usize = 1000;
/// Most recipients per transaction.
pub const MAX_RCPTS: usize = 100;
/// Error replies allowed before the session is closed (the third becomes
/// a 421).
pub const MAX_ERRORS: u32 = 3;
/// More `Received:` headers than this is a mail loop.
pub const MAX_RECEIVED: u32 = 50;
/// Reply bytes held before they are written even if the client has more
/// commands buffered.
const MAX_PENDING_REPLIES: usize = 4096;

/// What every session on one listener shares.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_data_size: u64,
    pub submit_socket: PathBuf,
    pub mode: Mode,
    /// Covers reaching queued and sending the greeting.
    pub first_deadline: Duration,
    pub command_timeout: Duration,
    /// Checked before each command; DATA runs under it.
    pub lifetime: Duration,
}

impl SessionConfig {
    pub fn new(hostname: String, max_data_size: u64, submit_socket: PathBuf, mode: Mode) -> Self {
        Self {
            hostname,
            max_data_size,
            submit_socket,
            mode,
            first_deadline: Duration::from_secs(60),
            command_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(20 * 60),
        }
    }
}

/// How reading a command line can fail.
enum LineError {
    Eof,
    TooLong,
    Io(std::io::Error),
}

/// Whether the session goes on after a command.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Close,
}

struct Session<S> {
    conn: BufReader<S>,
    /// Replies not yet written: flushed when the client has nothing more
    /// buffered, so pipelined commands get their replies in one write.
    out: Vec<u8>,
    peer: SocketAddr,
    cfg: Arc<SessionConfig>,
    queue: QueueLink,
    started: Instant,
    errors: u32,
    /// EHLO/HELO name, once given.
    ehlo: Option<String>,
    esmtp: bool,
    /// The envelope: sender (empty for `<>`) and accepted recipients.
    mail_from: Option<String>,
    rcpts: usize,
}

/// Serves one connection until it ends. Never panics on client input.
pub async fn serve<S>(stream: S, peer: SocketAddr, cfg: Arc<SessionConfig>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = BufReader::with_capacity(16 * 1024, stream);
    let link = tokio::time::timeout(
        cfg.first_deadline,
        QueueLink::connect(&cfg.submit_socket, peer.to_string(), cfg.mode),
    )
    .await;
    let queue = match link {
        Ok(Ok(q)) => q,
        Ok(Err(e)) => {
            tracing::error!(%peer, "cannot reach queued: {e}; refusing the session");
            refuse(&mut conn, &cfg).await;
            return;
        }
        Err(_) => {
            tracing::error!(%peer, "queued did not answer in time; refusing the session");
            refuse(&mut conn, &cfg).await;
            return;
        }
    };
    let mut s = Session {
        conn,
        out: Vec::with_capacity(1024),
        peer,
        cfg,
        queue,
        started: Instant::now(),
        errors: 0,
        ehlo: None,
        esmtp: false,
        mail_from: None,
        rcpts: 0,
    };
    s.run().await;
    metrics::inc_label(names::SMTP_IN_TLS_COUNT, "plain");
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut BufReader<S>, cfg: &SessionConfig) {
    metrics::inc_label(names::SMTP_IN_RESPONSE_CODE_COUNT, "421");
    let msg = format!(
        "421 4.3.0 {} Service not available, try again later\r\n",
        cfg.hostname
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        conn.get_mut().write_all(msg.as_bytes()).await?;
        conn.get_mut().flush().await
    })
    .await;
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn run(&mut self) {
        let greeting = format!("{} ESMTP tambo", self.cfg.hostname);
        self.reply(220, "", &greeting);
        if tokio::time::timeout(self.cfg.first_deadline, self.flush())
            .await
            .is_err()
        {
            return;
        }
        loop {
            if self.started.elapsed() > self.cfg.lifetime {
                self.reply(421, "4.4.2", "Connection lifetime exceeded, closing");
                break;
            }
            // Flush when the client has nothing more buffered (so pipelined
            // replies go out together), or when replies pile up, so a client
            // that never lets the buffer drain cannot grow them unbounded.
            let flush_now = self.conn.buffer().is_empty() || self.out.len() > MAX_PENDING_REPLIES;
            if flush_now && self.flush().await.is_err() {
                return;
            }
            let line = match tokio::time::timeout(self.cfg.command_timeout, self.read_line()).await
            {
                Err(_) => {
                    self.reply(421, "4.4.2", "Timed out waiting for a command, closing");
                    break;
                }
                Ok(Err(LineError::Eof)) => return,
                Ok(Err(LineError::Io(e))) => {
                    tracing::debug!(peer = %self.peer, "read error: {e}");
                    return;
                }
                Ok(Err(LineError::TooLong)) => {
                    self.reply(554, "5.5.2", "Line too long, closing");
                    break;
                }
                Ok(Ok(line)) => line,
            };
            let next = self.dispatch(&line).await;
            if next == Next::Close {
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.flush()).await;
    }

    async fn dispatch(&mut self, line: &[u8]) -> Next {
        let cmd = command::parse(line);
        metrics::inc_label(names::SMTP_IN_COMMAND_COUNT, &command::metric_label(&cmd));
        let arg = cmd.arg;
        let next = match cmd.verb {
            Verb::Helo | Verb::Ehlo => self.hello(cmd.verb == Verb::Ehlo, arg).await,
            Verb::Mail => self.mail(arg).await,
            Verb::Rcpt => self.rcpt(arg).await,
            Verb::Data => self.data().await,
            Verb::Rset => {
                if !self.reset_envelope().await {
                    return self.queue_lost();
                }
                self.reply(250, "2.0.0", "Reset");
                Next::Continue
            }
            Verb::Noop => {
                self.reply(250, "2.0.0", "Ok");
                Next::Continue
            }
            Verb::Help => {
                self.reply(
                    214,
                    "2.0.0",
                    "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT; see RFC 5321",
                );
                Next::Continue
            }
            Verb::Quit => {
                self.reply(221, "2.0.0", "Bye");
                Next::Close
            }
            Verb::Vrfy | Verb::Expn => {
                self.reply(502, "5.5.1", "Command not implemented");
                Next::Continue
            }
            Verb::StartTls | Verb::Auth => {
                self.reply(502, "5.5.1", "Command not implemented yet");
                Next::Continue
            }
            Verb::Http => {
                let verb = String::from_utf8_lossy(cmd.raw_verb).to_ascii_uppercase();
                metrics::inc_label(names::SMTP_IN_WRONG_PROTO_COUNT, &verb);
                tracing::info!(peer = %self.peer, "{verb} on the SMTP port: not an HTTP server, closing");
                self.reply(502, "5.7.0", "This is an SMTP server, not an HTTP server");
                Next::Close
            }
            Verb::Unknown => {
                self.reply(500, "5.5.1", "Unknown command");
                Next::Continue
            }
        };
        if self.errors >= MAX_ERRORS {
            Next::Close
        } else {
            next
        }
    }

    async fn hello(&mut self, esmtp: bool, arg: &[u8]) -> Next {
        let arg = String::from_utf8_lossy(arg);
        let Some(name) = arg.split_whitespace().next() else {
            self.reply(501, "", "Invalid domain name");
            return Next::Continue;
        };
        self.ehlo = Some(name.to_string());
        self.esmtp = esmtp;
        // RFC 5321 §4.1.4: HELO/EHLO clears the envelope.
        if !self.reset_envelope().await {
            return self.queue_lost();
        }
        if !esmtp {
            let text = format!("{} Hello", self.cfg.hostname);
            self.reply(250, "", &text);
            return Next::Continue;
        }
        let lines = [
            self.cfg.hostname.clone(),
            "8BITMIME".into(),
            "PIPELINING".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            format!("SIZE {}", self.cfg.max_data_size),
            "HELP".into(),
        ];
        self.reply_multi(250, &lines);
        Next::Continue
    }

    async fn mail(&mut self, arg: &[u8]) -> Next {
        let path = match command::parse_path(arg, "FROM:") {
            Ok(p) => p,
            Err(e) => {
                match e {
                    PathError::NoKeyword => {
                        self.reply(500, "5.5.2", "Syntax error: expected MAIL FROM:<address>")
                    }
                    PathError::Empty => {
                        self.reply(500, "5.5.4", "Malformed command: missing sender")
                    }
                    PathError::TooLong => self.reply(501, "5.1.7", "Sender address too long"),
                    PathError::Malformed(why) => {
                        let t = format!("Malformed sender address: {why}");
                        self.reply(501, "5.1.7", &t)
                    }
                    PathError::NoDomain | PathError::BadDomain => {
                        self.reply(501, "5.1.8", "Sender address needs a valid domain")
                    }
                }
                return Next::Continue;
            }
        };
        if !path.address.is_empty() && !path.address.contains('@') {
            self.reply(501, "5.1.8", "Sender address needs a valid domain");
            return Next::Continue;
        }
        if path.size.is_some_and(|s| s > self.cfg.max_data_size) {
            self.reply(552, "5.3.4", "Message too big");
            return Next::Continue;
        }
        // A second MAIL starts over (no 503).
        self.mail_from = None;
        self.rcpts = 0;
        match self
            .queue
            .call(&SubmitRequest::Mail {
                from: path.address.clone(),
            })
            .await
        {
            Ok(SubmitReply::Ok) => {
                self.mail_from = Some(path.address);
                self.reply(250, "2.1.5", "Ok");
            }
            Ok(SubmitReply::BadSequence(why)) => {
                tracing::info!(peer = %self.peer, "queued refused the sender: {why}");
                self.reply(501, "5.1.7", "Malformed sender address");
            }
            Ok(other) => {
                tracing::warn!(peer = %self.peer, "queued answered MAIL with {other:?}");
                self.reply(451, "4.3.0", "Temporary error, try again later");
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, "queued link failed at MAIL: {e}");
                return self.queue_lost();
            }
        }
        Next::Continue
    }

    async fn rcpt(&mut self, arg: &[u8]) -> Next {
        if self.mail_from.is_none() {
            self.reply(503, "5.5.1", "Sender not given yet");
            return Next::Continue;
        }
        let path = match command::parse_path(arg, "TO:") {
            Ok(p) if p.address.is_empty() => {
                self.reply(501, "5.1.3", "Malformed recipient address");
                return Next::Continue;
            }
            Ok(p) => p,
            Err(e) => {
                match e {
                    PathError::NoKeyword => {
                        self.reply(500, "5.5.2", "Syntax error: expected RCPT TO:<address>")
                    }
                    PathError::Empty => {
                        self.reply(500, "5.5.4", "Malformed command: missing recipient")
                    }
                    PathError::TooLong => self.reply(501, "5.1.3", "Recipient address too long"),
                    PathError::Malformed(_) | PathError::NoDomain => {
                        self.reply(501, "5.1.3", "Malformed recipient address")
                    }
                    PathError::BadDomain => self.reply(501, "5.1.2", "Malformed recipient domain"),
                }
                return Next::Continue;
            }
        };
        if self.rcpts >= MAX_RCPTS {
            self.reply(452, "4.5.3", "Too many recipients");
            return Next::Continue;
        }
        let verdict = match self
            .queue
            .call(&SubmitRequest::Rcpt {
                to: path.address.clone(),
            })
            .await
        {
            Ok(SubmitReply::Rcpt(v)) => v,
            Ok(other) => {
                tracing::warn!(peer = %self.peer, "queued answered RCPT with {other:?}");
                RcptVerdict::TempError("unexpected answer from the queue".into())
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, "queued link failed at RCPT: {e}");
                return self.queue_lost();
            }
        };
        match verdict {
            RcptVerdict::Accepted => {
                self.rcpts += 1;
                self.reply(250, "2.1.5", "Ok")
            }
            RcptVerdict::NoSuchUser => self.reply(
                550,
                "5.1.1",
                "Destination address is unknown (user does not exist)",
            ),
            RcptVerdict::RelayDenied => self.reply(503, "5.7.1", "Relaying not allowed"),
            RcptVerdict::Invalid(why) => {
                tracing::debug!(peer = %self.peer, "invalid recipient: {why}");
                self.reply(550, "5.1.3", "Destination address is invalid")
            }
            RcptVerdict::TempError(why) => {
                tracing::warn!(peer = %self.peer, "error checking recipient: {why}");
                self.reply(451, "4.4.3", "Temporary error checking address")
            }
            RcptVerdict::TooMany => self.reply(452, "4.5.3", "Too many recipients"),
        }
        Next::Continue
    }

    async fn data(&mut self) -> Next {
        if self.ehlo.is_none() {
            self.reply(503, "5.5.1", "Invalid command: say hello first");
            return Next::Continue;
        }
        let Some(from) = self.mail_from.clone() else {
            self.reply(503, "5.5.1", "Invalid command: sender not given yet");
            return Next::Continue;
        };
        if self.rcpts == 0 {
            self.reply(503, "5.5.1", "Invalid command: no valid recipients");
            return Next::Continue;
        }
        match self.queue.call(&SubmitRequest::DataBegin).await {
            Ok(SubmitReply::DataReady) => {}
            Ok(SubmitReply::Failed { reason }) => {
                tracing::warn!(peer = %self.peer, "queue refused DATA: {reason}");
                let text = format!("Could not queue message: {reason}");
                self.reply(451, "4.3.0", &text);
                return Next::Continue;
            }
            Ok(other) => {
                tracing::warn!(peer = %self.peer, "queued answered DATA with {other:?}");
                self.reply(451, "4.3.0", "Temporary error, try again later");
                return Next::Continue;
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, "queued link failed at DATA: {e}");
                return self.queue_lost();
            }
        }
        self.reply(354, "", "Go ahead; end data with <CR><LF>.<CR><LF>");
        if self.flush().await.is_err() {
            let _ = self.queue.send(&SubmitRequest::DataAbort).await;
            return Next::Close;
        }
        let header = received::header(&ReceivedInfo {
            ehlo: self.ehlo.as_deref().unwrap_or("unknown"),
            esmtp: self.esmtp,
            client: self.peer,
            hostname: &self.cfg.hostname,
            mode: self.cfg.mode,
            from: &from,
        });
        let remaining = self.cfg.lifetime.saturating_sub(self.started.elapsed());
        let outcome =
            match tokio::time::timeout(remaining, self.stream_body(header.into_bytes())).await {
                Ok(o) => o,
                Err(_) => BodyOutcome::Timeout,
            };
        // The final reply to message content clears the envelope, whatever
        // it was (REFERENCE §2.3).
        self.mail_from = None;
        self.rcpts = 0;
        match outcome {
            BodyOutcome::Complete => match self.queue.call(&SubmitRequest::DataEnd).await {
                Ok(SubmitReply::Queued { id }) => {
                    let text = format!("Queued as {id}");
                    self.reply(250, "2.0.0", &text);
                    Next::Continue
                }
                Ok(SubmitReply::Failed { reason }) => {
                    tracing::warn!(peer = %self.peer, "message not queued: {reason}");
                    let text = format!("Could not queue message: {reason}");
                    self.reply(451, "4.3.0", &text);
                    Next::Continue
                }
                Ok(other) => {
                    tracing::warn!(peer = %self.peer, "queued answered end of DATA with {other:?}");
                    self.reply(451, "4.3.0", "Temporary error, try again later");
                    Next::Continue
                }
                Err(e) => {
                    tracing::error!(peer = %self.peer, "queued link failed at end of DATA: {e}");
                    self.queue_lost()
                }
            },
            BodyOutcome::TooBig => {
                self.reply(552, "5.3.4", "Message too big");
                Next::Continue
            }
            BodyOutcome::Loop => {
                metrics::inc(names::SMTP_IN_LOOPS_DETECTED);
                self.reply(554, "5.4.6", "Loop detected (too many Received headers)");
                Next::Continue
            }
            BodyOutcome::BareLineEnding => {
                self.reply(
                    521,
                    "5.5.2",
                    "Invalid line ending: only CRLF is accepted, closing",
                );
                Next::Close
            }
            BodyOutcome::Timeout => {
                self.reply(
                    421,
                    "4.4.2",
                    "Connection lifetime exceeded during DATA, closing",
                );
                Next::Close
            }
            BodyOutcome::ClientGone => Next::Close,
            BodyOutcome::QueueLost => self.queue_lost(),
        }
    }

    /// Reads the message to its terminator, sending it to queued in chunks
    /// as it arrives; smtpd never holds more than a chunk.
    async fn stream_body(&mut self, first: Vec<u8>) -> BodyOutcome {
        let mut dec = DotDecoder::new();
        let mut headers = HeaderScan::default();
        let mut chunk = first;
        let mut sending = true;
        let mut result = None;
        loop {
            let buf = match self.conn.fill_buf().await {
                Ok([]) => {
                    result = Some(BodyOutcome::ClientGone);
                    break;
                }
                Ok(b) => b,
                Err(_) => {
                    result = Some(BodyOutcome::ClientGone);
                    break;
                }
            };
            let before = chunk.len();
            let progress = dec.feed(buf, &mut chunk);
            headers.scan(&chunk[before..]);
            let (consumed, done) = match progress {
                Ok(Progress::More) => (buf.len(), false),
                Ok(Progress::End(n)) => (n, true),
                Err(DotError::BareLineEnding) => {
                    result = Some(BodyOutcome::BareLineEnding);
                    break;
                }
            };
            self.conn.consume(consumed);
            if sending && dec.size() > self.cfg.max_data_size {
                // Over the limit: stop forwarding but read on to the real
                // terminator, so the session stays in sync.
                sending = false;
                result = Some(BodyOutcome::TooBig);
            }
            if sending && headers.received > MAX_RECEIVED {
                sending = false;
                result = Some(BodyOutcome::Loop);
            }
            if !sending {
                chunk.clear();
            } else if chunk.len() >= CHUNK_SIZE || (done && !chunk.is_empty()) {
                let data = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_SIZE + 1024));
                if self
                    .queue
                    .send(&SubmitRequest::DataChunk(data))
                    .await
                    .is_err()
                {
                    return BodyOutcome::QueueLost;
                }
            }
            if done {
                break;
            }
        }
        match result {
            None => {
                if self.queue.flush().await.is_err() {
                    return BodyOutcome::QueueLost;
                }
                BodyOutcome::Complete
            }
            Some(r) => {
                if self.queue.send(&SubmitRequest::DataAbort).await.is_err()
                    || self.queue.flush().await.is_err()
                {
                    return BodyOutcome::QueueLost;
                }
                r
            }
        }
    }

    /// Forgets the envelope here and in queued. False if queued is gone.
    async fn reset_envelope(&mut self) -> bool {
        self.mail_from = None;
        self.rcpts = 0;
        matches!(
            self.queue.call(&SubmitRequest::Rset).await,
            Ok(SubmitReply::Ok)
        )
    }

    /// queued went away: the session's state there is gone, so end it.
    fn queue_lost(&mut self) -> Next {
        self.reply(421, "4.3.0", "Temporary queue error, closing");
        Next::Close
    }

    async fn read_line(&mut self) -> Result<Vec<u8>, LineError> {
        let mut line = Vec::new();
        let mut too_long = false;
        loop {
            let buf = self.conn.fill_buf().await.map_err(LineError::Io)?;
            if buf.is_empty() {
                return Err(LineError::Eof);
            }
            let (take, found) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if !too_long {
                line.extend_from_slice(&buf[..take]);
                // +2 leaves room for the CRLF itself.
                if line.len() > MAX_LINE + 2 {
                    too_long = true;
                    line.clear();
                }
            }
            self.conn.consume(take);
            if found {
                break;
            }
        }
        if too_long {
            return Err(LineError::TooLong);
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > MAX_LINE {
            return Err(LineError::TooLong);
        }
        Ok(line)
    }

    /// Queues a reply. The third error reply becomes a 421 and the session
    /// ends (REFERENCE §2.2).
    fn reply(&mut self, code: u16, enhanced: &str, text: &str) {
        let (code, enhanced, text) = if code >= 400 && code != 421 {
            self.errors += 1;
            if self.errors >= MAX_ERRORS {
                (421, "4.5.0", "Too many errors, closing")
            } else {
                (code, enhanced, text)
            }
        } else {
            (code, enhanced, text)
        };
        if code == 421 {
            self.errors = self.errors.max(MAX_ERRORS);
        }
        metrics::inc_label(names::SMTP_IN_RESPONSE_CODE_COUNT, &code.to_string());
        self.out.extend_from_slice(code.to_string().as_bytes());
        self.out.push(b' ');
        if !enhanced.is_empty() {
            self.out.extend_from_slice(enhanced.as_bytes());
            self.out.push(b' ');
        }
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn reply_multi(&mut self, code: u16, lines: &[String]) {
        metrics::inc_label(names::SMTP_IN_RESPONSE_CODE_COUNT, &code.to_string());
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("{code}{sep}{l}\r\n").as_bytes());
        }
    }

    /// Writes the pending replies, under the command timeout: a client
    /// that stops reading cannot pin the session.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let timeout = self.cfg.command_timeout;
        let w = self.conn.get_mut();
        let write = async {
            w.write_all(&self.out).await?;
            w.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client is not reading its replies",
                ));
            }
        }
        self.out.clear();
        Ok(())
    }
}

enum BodyOutcome {
    Complete,
    TooBig,
    Loop,
    BareLineEnding,
    Timeout,
    ClientGone,
    QueueLost,
}

/// Counts `Received:` lines in the header section of the (unstuffed)
/// message as it streams past, for loop detection.
#[derive(Default)]
struct HeaderScan {
    done: bool,
    /// Bytes of the current line seen so far, up to 9.
    prefix: Vec<u8>,
    /// Past the prefix of the current line.
    line_len: usize,
    received: u32,
}

impl HeaderScan {
    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            if b == b'\n' {
                // A line that is just CRLF ends the header section.
                if self.line_len == 1 && self.prefix.first() == Some(&b'\r') {
                    self.done = true;
                }
                self.prefix.clear();
                self.line_len = 0;
                continue;
            }
            self.line_len += 1;
            if self.prefix.len() < 9 {
                self.prefix.push(b);
                if self.prefix.len() == 9 && self.prefix.eq_ignore_ascii_case(b"received:") {
                    self.received += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_scan_counts_only_headers() {
        let mut h = HeaderScan::default();
        let msg = b"Received: a\r\nRECEIVED: b\r\nSubject: x\r\n\r\nReceived: in body\r\n";
        for piece in msg.chunks(3) {
            h.scan(piece);
        }
        assert_eq!(h.received, 2);
        assert!(h.done);
    }
}
