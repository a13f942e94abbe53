//! One SMTP session: reads commands, answers them, streams DATA to queued.
//!
//! Everything the client sends is parsed here under fixed limits (line
//! length, timeouts, recipients, errors); every decision about where mail
//! may go is asked of queued, over a link opened at the first MAIL.
//!
//! # Layout
//! - this file: the session, its command loop, replies and line reading;
//! - `hello`: HELO and EHLO;
//! - `envelope`: MAIL (with its SPF check), RCPT, RSET and the link to
//!   queued;
//! - `data`: DATA, streaming the body to queued.
//! - `starttls`: STARTTLS, and the implicit TLS of port 465.
//! - `auth`: AUTH PLAIN and LOGIN, checked by queued.

mod auth;
mod data;
mod envelope;
mod hello;
mod reader;
mod starttls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt};

use reader::LazyReader;
use tokio::net::TcpStream;

use tambo_proto::identity::Identities;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{MailLogEvent, Mode, SpfReport};

use crate::command::{self, Verb};
use crate::conn::Conn;
use crate::queue::QueueLink;
use crate::spf::SpfChecker;
use crate::tls::Tls;

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
    pub ids: Identities,
    pub mode: Mode,
    /// From accept: covers the PROXY header, the implicit-TLS handshake
    /// and sending the greeting, together.
    pub first_deadline: Duration,
    /// For each command, and for each read inside DATA.
    pub command_timeout: Duration,
    /// Checked before each command; DATA runs under it.
    pub lifetime: Duration,
    /// How often a quiet link to queued is kept alive.
    pub link_keepalive: Duration,
    /// TLS, once the certificates arrived from queued.
    pub tls: Option<Arc<Tls>>,
    /// `haproxy_incoming`: every connection starts with a PROXY header.
    pub haproxy: bool,
    /// Checks the sender's SPF at MAIL. None: no check (a library user
    /// without a resolver); tambo-smtpd always has one.
    pub spf: Option<Arc<SpfChecker>>,
    /// `[tambo] relay_networks`: their clients relay without AUTH and,
    /// like authenticated sessions, are not SPF-checked (they send as our
    /// own domains, from hosts our SPF record rarely lists).
    pub relay_networks: Vec<tambo_common::cidr::Cidr>,
}

impl SessionConfig {
    pub fn new(
        hostname: String,
        max_data_size: u64,
        submit_socket: PathBuf,
        ids: Identities,
        mode: Mode,
    ) -> Self {
        Self {
            hostname,
            max_data_size,
            submit_socket,
            ids,
            mode,
            first_deadline: Duration::from_secs(60),
            command_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(20 * 60),
            link_keepalive: Duration::from_secs(60),
            tls: None,
            haproxy: false,
            spf: None,
            relay_networks: Vec::new(),
        }
    }
}

/// What the Received header says of a TLS session.
#[derive(Debug, Clone)]
struct TlsInfo {
    version: String,
    cipher: String,
}

/// How reading a command line can fail.
enum LineError {
    Eof,
    TooLong,
    Io(std::io::Error),
    /// No whole line within the command timeout.
    Timeout,
    /// Keeping the link to queued alive failed.
    QueueLost(tambo_proto::Error),
}

/// Whether the session goes on after a command.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Close,
}

struct Session {
    conn: LazyReader<Conn>,
    /// When the first deadline ends.
    first_deadline: tokio::time::Instant,
    /// Replies not yet written: flushed when the client has nothing more
    /// buffered, so pipelined commands get their replies in one write.
    out: Vec<u8>,
    /// The client: the connection's peer, or behind a proxy the source
    /// its PROXY header named. Used for everything (logs, Received, what
    /// queued is told), so the proxy's own address appears nowhere.
    peer: SocketAddr,
    cfg: Arc<SessionConfig>,
    /// `hostname`, or the client's SNI when a certificate covers it.
    hostname: String,
    /// Set once on TLS.
    tls: Option<TlsInfo>,
    /// The identity queued accepted at AUTH.
    auth: Option<String>,
    /// The link to queued, opened at the first MAIL.
    queue: Option<QueueLink>,
    started: Instant,
    errors: u32,
    /// EHLO/HELO name, once given.
    ehlo: Option<String>,
    esmtp: bool,
    /// The envelope: sender (empty for `<>`), accepted recipients, and
    /// the sender's SPF check when one ran (for Received-SPF).
    mail_from: Option<String>,
    rcpts: usize,
    spf: Option<SpfReport>,
    /// For the mail log: the command being answered, the address it
    /// named (MAIL, RCPT), and the recipients accepted so far (the first
    /// [`LOGGED_RCPTS`]).
    verb: Verb,
    log_verb: String,
    naming: Option<String>,
    accepted: Vec<String>,
    /// The envelope the message being answered had (cleared from the
    /// session before its final reply).
    answered: (Option<String>, Vec<String>),
    /// This session's trace (`/debug/traces`, family `SMTP.Conn`): sent to
    /// monitord when the session ends.
    trace: tambo_proto::trace::Trace,
}

/// Recipients a DATA refusal's mail-log line lists at most.
const LOGGED_RCPTS: usize = 32;

/// Serves one connection until it ends. Never panics on client input.
/// `peer` is the client: behind a proxy, the source its PROXY header named.
/// `first_deadline` ends the implicit-TLS handshake and the greeting.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: Arc<SessionConfig>,
    first_deadline: tokio::time::Instant,
) {
    let hostname = cfg.hostname.clone();
    let mut s = Session {
        conn: LazyReader::new(Conn::Plain(stream)),
        first_deadline,
        out: Vec::new(),
        peer,
        cfg,
        hostname,
        tls: None,
        auth: None,
        queue: None,
        started: Instant::now(),
        errors: 0,
        ehlo: None,
        esmtp: false,
        mail_from: None,
        rcpts: 0,
        spf: None,
        verb: Verb::Unknown,
        log_verb: String::new(),
        naming: None,
        accepted: Vec::new(),
        answered: (None, Vec::new()),
        trace: tambo_proto::trace::Trace::new("SMTP.Conn", peer.to_string()),
    };
    if s.cfg.mode == Mode::SubmissionTls && !s.implicit_tls().await {
        return;
    }
    s.run().await;
    let status = if s.tls.is_some() { "tls" } else { "plain" };
    metrics::inc_label(names::SMTP_IN_TLS_COUNT, status);
}

impl Session {
    async fn run(&mut self) {
        let greeting = format!("{} ESMTP tambo", self.hostname);
        self.reply(220, "", &greeting);
        if tokio::time::timeout_at(self.first_deadline, self.flush())
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
            if flush_now {
                // Idle sessions hold no reply buffer.
                self.out = Vec::new();
            }
            let line = match self.next_line().await {
                Err(LineError::Timeout) => {
                    self.reply(421, "4.4.2", "Timed out waiting for a command, closing");
                    break;
                }
                Err(LineError::Eof) => return,
                Err(LineError::Io(e)) => {
                    tracing::debug!(peer = %self.peer, "read error: {e}");
                    return;
                }
                Err(LineError::TooLong) => {
                    self.reply(554, "5.5.2", "Line too long, closing");
                    break;
                }
                Err(LineError::QueueLost(e)) => {
                    tracing::error!(peer = %self.peer, "queued link failed while idle: {e}");
                    self.queue_lost();
                    break;
                }
                Ok(line) => line,
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
        // AUTH's arguments are never recorded (REFERENCE §7.5), nor what
        // is not a command (a client that sends its credentials after a
        // refusal sends them as lines of its own): only known verbs'
        // lines are.
        self.trace.event(match cmd.verb {
            Verb::Auth => "AUTH (arguments redacted)".to_string(),
            Verb::Unknown => "(not a command; not recorded)".to_string(),
            _ => String::from_utf8_lossy(line).trim_end().to_string(),
        });
        self.verb = cmd.verb;
        self.log_verb = match cmd.verb {
            Verb::Unknown => "unknown".into(),
            _ => String::from_utf8_lossy(cmd.raw_verb).to_ascii_uppercase(),
        };
        self.naming = match cmd.verb {
            Verb::Mail | Verb::Rcpt => Some(named_address(cmd.arg)),
            _ => None,
        };
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
            Verb::StartTls => self.starttls(arg).await,
            Verb::Auth => self.auth(arg).await,
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

    /// Reads the next command line within the command timeout, keeping
    /// the link to queued (if any) alive meanwhile.
    async fn next_line(&mut self) -> Result<Vec<u8>, LineError> {
        let every = self.cfg.link_keepalive;
        let queue = &mut self.queue;
        let read = tokio::time::timeout(self.cfg.command_timeout, read_line(&mut self.conn));
        tokio::pin!(read);
        loop {
            // Due when the link has been quiet for `every`, however often
            // the client itself speaks (a NOOP every few seconds talks to
            // smtpd, not to queued).
            let due = queue
                .as_ref()
                .map(|q| q.keepalive_due(every))
                .unwrap_or_else(|| tokio::time::Instant::now() + self.cfg.command_timeout);
            tokio::select! {
                r = &mut read => return r.map_err(|_| LineError::Timeout)?,
                _ = tokio::time::sleep_until(due), if queue.is_some() => {
                    if let Some(q) = queue.as_mut() {
                        q.keep_alive(every).await.map_err(LineError::QueueLost)?;
                    }
                }
            }
        }
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
        if code >= 400 {
            self.log_refusal(code, enhanced, text);
            self.trace.error(format!("→ {code} {enhanced} {text}"));
        } else {
            self.trace.event(format!("→ {code} {enhanced} {text}"));
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

    /// The mail log's line for a refusal (REFERENCE §8): MAIL, RCPT or
    /// DATA refused is `rejected` (5xx) or `deferred` (4xx), with the
    /// sender and recipients known then; any other reply of 500 or more,
    /// and too many errors, is `error`. Left out: AUTH's own verdicts (an
    /// `auth` line says them), timeouts and a lost queue link. fail2ban
    /// counts `rejected`, never `deferred`: a DNS or Dovecot outage, a
    /// greylisting hook or a full queue must never ban a client.
    fn log_refusal(&mut self, code: u16, enhanced: &str, text: &str) {
        let client = self.peer.to_string();
        let server_side = enhanced == "4.4.2" || (enhanced == "4.3.0" && code == 421);
        let ev = match self.verb {
            _ if enhanced == "4.5.0" => MailLogEvent::Error {
                client,
                verb: self.log_verb.clone(),
                code,
                reason: text.into(),
            },
            _ if server_side => return,
            Verb::Mail | Verb::Rcpt | Verb::Data => {
                let (from, to) = match self.verb {
                    Verb::Mail => (self.naming.clone(), Vec::new()),
                    Verb::Rcpt => (
                        self.mail_from.clone(),
                        self.naming.clone().into_iter().collect(),
                    ),
                    _ if self.mail_from.is_some() => {
                        (self.mail_from.clone(), self.accepted.clone())
                    }
                    _ => self.answered.clone(),
                };
                MailLogEvent::Rejected {
                    client,
                    from,
                    to,
                    reason: text.into(),
                    temporary: code < 500,
                }
            }
            Verb::Auth if code == 535 || code == 454 => return,
            _ if code >= 500 => MailLogEvent::Error {
                client,
                verb: self.log_verb.clone(),
                code,
                reason: text.into(),
            },
            _ => return,
        };
        crate::maillog::log(ev);
    }

    /// Remembers an accepted recipient for the mail log.
    fn accepted_rcpt(&mut self) {
        if self.accepted.len() < LOGGED_RCPTS
            && let Some(a) = &self.naming
        {
            self.accepted.push(a.clone());
        }
    }

    /// A hook's refusal (REFERENCE §6): its last line, made safe for the
    /// wire, or a generic text. A line that already starts with an
    /// enhanced code of the reply's class is used as it is (§2.4).
    fn hook_reply(&mut self, code: u16, enhanced: &str, text: &str) {
        let text = hook_text(text);
        let text = if text.is_empty() {
            "Rejected by local policy".to_string()
        } else {
            text
        };
        match text.split_once(' ') {
            Some((first, rest)) if is_enhanced_code(first, enhanced) => {
                self.reply(code, first, rest.trim_start())
            }
            // A line that is only a code: that code, and the generic text.
            None if is_enhanced_code(&text, enhanced) => {
                self.reply(code, &text, "Rejected by local policy")
            }
            _ => self.reply(code, enhanced, &text),
        }
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

/// Reads one command line (LF or CRLF ended, the ending removed), draining
/// and refusing lines over [`MAX_LINE`].
async fn read_line<R: AsyncBufRead + Unpin>(conn: &mut R) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = conn.fill_buf().await.map_err(LineError::Io)?;
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
        conn.consume(take);
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

/// A hook's text as it may go on the wire: printable ASCII only (others
/// become `?`), at most [`MAX_HOOK_TEXT`] bytes, trimmed.
/// The address a MAIL or RCPT argument names, for the mail log: between
/// `<` and `>`, else the argument after its colon, as text.
fn named_address(arg: &[u8]) -> String {
    let text = String::from_utf8_lossy(arg);
    match (text.find('<'), text.find('>')) {
        (Some(a), Some(b)) if a < b => text[a + 1..b].to_string(),
        _ => text
            .split_once(':')
            .map_or(text.as_ref(), |(_, rest)| rest)
            .trim()
            .to_string(),
    }
}

fn hook_text(text: &str) -> String {
    text.chars()
        .take(tambo_proto::submit::MAX_HOOK_TEXT)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Whether `word` is an enhanced status code (RFC 3463: class 2, 4 or 5,
/// subject and detail of 1 to 3 digits) of the same class as `ours`.
fn is_enhanced_code(word: &str, ours: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    let digits = |p: &str, max: usize| {
        !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
    };
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && digits(parts[1], 3)
        && digits(parts[2], 3)
        && ours.starts_with(parts[0])
}

#[cfg(test)]
mod tests {
    use super::{hook_text, is_enhanced_code};

    #[test]
    fn a_hook_line_keeps_its_own_code_only_of_our_class() {
        assert!(is_enhanced_code("5.7.1", "5.7.1"));
        assert!(is_enhanced_code("5.1.10", "5.7.1"));
        assert!(is_enhanced_code("4.7.0", "4.7.1"));
        for bad in [
            "4.7.1", "55.1.1", "500.0.0", "5.7", "5.7.1.2", "5..1", "5.1234.1", "x.7.1", "3.1.1",
        ] {
            assert!(!is_enhanced_code(bad, "5.7.1"), "{bad}");
        }
    }

    #[test]
    fn hook_text_is_safe_on_the_wire() {
        assert_eq!(hook_text(" go\r\naway\u{7f} é "), "go??away? ?");
        assert_eq!(
            hook_text(&"x".repeat(1000)).len(),
            tambo_proto::submit::MAX_HOOK_TEXT
        );
    }
}
