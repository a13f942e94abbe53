//! The mail log (REFERENCE §8): one stream for the whole system, written
//! by queued alone, at `mail_log_path` (a file, `<syslog>`, `<stdout>` or
//! `<stderr>`).
//!
//! queued's own events (queued, sent, failed, loops, done) and smtpd's
//! (listening, auth, rejected, error), which arrive on smtpd's log link,
//! go through one bounded channel to one writer thread: lines never
//! interleave, and mail never waits for the log (a full channel drops the
//! line and counts it in `tambo/maillog/dropped`). Every field an outsider
//! chose is escaped and bounded, so no line can be forged inside another.
//!
//! The writer lets lines gather for [`GATHER`] after the first before it
//! writes them: a busy server makes three or four lines a message, and
//! waking a thread for each cost more than all the rest of the log. Each
//! line keeps the time it was made at.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime};

use tambo_common::config::Config;
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::MailLogEvent;

/// Lines waiting for the writer at most.
const QUEUE: usize = 8192;

/// How long lines gather after the first before they are written. Senders
/// wake nobody meanwhile: the writer sleeps on its own, not on the
/// channel.
const GATHER: Duration = Duration::from_millis(20);

/// Longest field written (an address, a reason), in characters.
const MAX_FIELD: usize = 256;

/// Most recipients written on one line (the rest are counted).
const MAX_RCPTS: usize = 32;

/// The syslog socket, and syslog's priority for facility mail, level info.
const SYSLOG_SOCKET: &str = "/dev/log";
const SYSLOG_PRI: u8 = 2 * 8 + 6;

enum Msg {
    /// A line and when it was made.
    Line(String, SystemTime),
    Reopen,
    /// Everything sent before is written: answered once it is.
    Flush(SyncSender<()>),
}

static LOG: OnceLock<SyncSender<Msg>> = OnceLock::new();

/// The writer thread, woken early by [`flush`].
static WRITER: OnceLock<Thread> = OnceLock::new();

/// Set by [`flush`]: the writer stops gathering.
static HURRY: AtomicBool = AtomicBool::new(false);

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    File(PathBuf),
    Syslog,
    Stdout,
    Stderr,
}

impl Dest {
    /// `mail_log_path`, relative paths under the config directory.
    pub fn of(cfg: &Config) -> Self {
        match (cfg.mail_log_file(), cfg.mail_log_path.as_str()) {
            (Some(p), _) => Dest::File(p),
            (None, "<stdout>") => Dest::Stdout,
            (None, "<stderr>") => Dest::Stderr,
            (None, _) => Dest::Syslog,
        }
    }
}

/// An open destination, made by [`open`] before queued locks itself down
/// and handed to [`start`] after.
pub struct Writer {
    dest: Dest,
    out: Out,
    /// When a failure was last reported to the debug log.
    reported: Option<Instant>,
    /// When the syslog socket was last tried: at most once a second, so a
    /// machine without syslog does not pay a socket and a connect a line.
    tried: Option<Instant>,
}

enum Out {
    File(File),
    Syslog(Option<UnixDatagram>),
    Stdout,
    Stderr,
}

fn open_file(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
}

fn syslog_socket() -> Option<UnixDatagram> {
    let s = UnixDatagram::unbound().ok()?;
    s.connect(SYSLOG_SOCKET).ok()?;
    Some(s)
}

/// Opens the mail log. A file that cannot be opened is a startup error;
/// syslog not answering yet is not (it is tried again, at most once a
/// second, as lines come).
pub fn open(cfg: &Config) -> Result<Writer, String> {
    let dest = Dest::of(cfg);
    let out = match &dest {
        Dest::File(p) => Out::File(
            open_file(p).map_err(|e| format!("mail_log_path: cannot open {}: {e}", p.display()))?,
        ),
        Dest::Syslog => Out::Syslog(syslog_socket()),
        Dest::Stdout => Out::Stdout,
        Dest::Stderr => Out::Stderr,
    };
    Ok(Writer {
        dest,
        out,
        reported: None,
        tried: None,
    })
}

/// Starts the writer thread. Call it after the lockdown: a thread made
/// before would not be bound by it.
pub fn start(writer: Writer) {
    let (tx, rx) = sync_channel(QUEUE);
    if LOG.set(tx).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("maillog".into())
        .spawn(move || run(writer, rx));
    match spawned {
        Ok(h) => {
            let _ = WRITER.set(h.thread().clone());
        }
        Err(e) => tracing::error!("cannot start the mail log writer: {e}; no mail log"),
    }
}

fn run(mut w: Writer, rx: Receiver<Msg>) {
    // Asleep in recv only while nothing is waiting to be written.
    while let Ok(first) = rx.recv() {
        let until = Instant::now() + GATHER;
        while !HURRY.load(Ordering::Acquire) {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                break;
            };
            std::thread::park_timeout(left);
        }
        let mut lines = Vec::new();
        // At most a channel's worth a batch: what came in meanwhile waits
        // in the channel, which stays the bound on what is held.
        for msg in std::iter::once(first).chain(rx.try_iter().take(QUEUE)) {
            match msg {
                Msg::Line(text, at) => lines.push((text, at)),
                Msg::Reopen => {
                    w.write(&std::mem::take(&mut lines));
                    w.reopen();
                }
                Msg::Flush(done) => {
                    w.write(&std::mem::take(&mut lines));
                    HURRY.store(false, Ordering::Release);
                    let _ = done.try_send(());
                }
            }
        }
        w.write(&lines);
    }
}

impl Writer {
    /// Writes lines in the order given: a file or stream in one write, the
    /// syslog socket a datagram each (its format).
    fn write(&mut self, lines: &[(String, SystemTime)]) {
        if lines.is_empty() {
            return;
        }
        // Lines not written when it fails: all, but for syslog's own count.
        let mut unsent = lines.len();
        let result = match &mut self.out {
            Out::File(f) => f.write_all(stamped(lines).as_bytes()),
            Out::Stdout => io::stdout().lock().write_all(stamped(lines).as_bytes()),
            Out::Stderr => io::stderr().lock().write_all(stamped(lines).as_bytes()),
            Out::Syslog(sock) => {
                if sock.is_none()
                    && self
                        .tried
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    self.tried = Some(Instant::now());
                    *sock = syslog_socket();
                }
                // No time: syslog adds its own.
                let sent = sock.as_ref().map(|s| {
                    lines.iter().try_for_each(|(line, _)| {
                        s.send(format!("<{SYSLOG_PRI}>tambo: {line}").as_bytes())?;
                        unsent -= 1;
                        Ok::<(), io::Error>(())
                    })
                });
                match sent {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => {
                        *sock = None;
                        Err(e)
                    }
                    None => Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        format!("{SYSLOG_SOCKET} does not answer"),
                    )),
                }
            }
        };
        if let Err(e) = result {
            // One for every line lost, as when lines were written one by
            // one.
            metrics::global().add(names::MAILLOG_ERRORS, None, unsent as u64);
            // Once, then at most once an hour: the debug log must not fill
            // with the same line when the disk is full.
            if self
                .reported
                .is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
            {
                self.reported = Some(Instant::now());
                tracing::error!("cannot write the mail log ({:?}): {e}", self.dest);
            }
        }
    }

    /// SIGHUP: the file again (log rotation), the syslog socket anew.
    fn reopen(&mut self) {
        match &self.dest {
            Dest::File(p) => match open_file(p) {
                Ok(f) => {
                    self.out = Out::File(f);
                    self.reported = None;
                }
                Err(e) => tracing::error!(
                    "cannot reopen the mail log {}, writing to the old one: {e}",
                    p.display()
                ),
            },
            Dest::Syslog => {
                self.tried = Some(Instant::now());
                self.out = Out::Syslog(syslog_socket());
            }
            Dest::Stdout | Dest::Stderr => {}
        }
    }
}

/// File or stream lines: each the local time it was made at, with
/// microseconds, the text, LF.
fn stamped(lines: &[(String, SystemTime)]) -> String {
    let mut out = String::new();
    for (line, at) in lines {
        let at = chrono::DateTime::<chrono::Local>::from(*at);
        out.push_str(&format!("{} {line}\n", at.format("%Y-%m-%d %H:%M:%S%.6f")));
    }
    out
}

fn send_line(line: String) {
    send(Msg::Line(line, SystemTime::now()));
}

/// Writes out every line sent so far, waiting at most a second: at exit,
/// so the gathered lines are not lost with the process.
pub fn flush() {
    let deadline = Instant::now() + Duration::from_secs(1);
    let (done, wait) = sync_channel(1);
    let Some(tx) = LOG.get() else { return };
    // Before the request: the writer clears it once it has answered.
    HURRY.store(true, Ordering::Release);
    if let Some(t) = WRITER.get() {
        t.unpark();
    }
    // The channel may be full of lines a stuck writer (a syslog that does
    // not read) never takes: the second is for this too.
    let mut msg = Msg::Flush(done);
    loop {
        match tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => {
                HURRY.store(false, Ordering::Release);
                return;
            }
        }
    }
    let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

fn send(msg: Msg) {
    match LOG.get().map(|tx| tx.try_send(msg)) {
        Some(Ok(())) => {}
        Some(Err(TrySendError::Full(_))) => metrics::inc(names::MAILLOG_DROPPED),
        // No mail log (a test's queue without one, or the writer gone).
        Some(Err(TrySendError::Disconnected(_))) | None => {}
    }
}

/// Reopens the mail log (SIGHUP).
pub fn reopen() {
    send(Msg::Reopen);
}

/// A field as written: control characters, spaces' look-alikes and
/// backslashes escaped, at most [`MAX_FIELD`] characters.
fn safe(field: &str) -> String {
    let mut out = String::new();
    for (i, c) in field.chars().enumerate() {
        if i == MAX_FIELD {
            out.push('…');
            break;
        }
        if c.is_control() || c == '\\' || (c.is_whitespace() && c != ' ') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A field that must stay one word (an address): spaces escaped too.
fn word(field: &str) -> String {
    safe(field).replace(' ', "\\u{20}")
}

fn list(items: &[String]) -> String {
    let mut out: Vec<String> = items.iter().take(MAX_RCPTS).map(|s| word(s)).collect();
    if items.len() > MAX_RCPTS {
        out.push(format!("(+{} more)", items.len() - MAX_RCPTS));
    }
    format!("[{}]", out.join(" "))
}

/// `<id> from=<sender> queued ip=<client> to=[<rcpts>]`
pub fn queued(id: &str, from: &str, client: &str, to: &[String]) {
    send_line(format!(
        "{id} from={} queued ip={} to={}",
        word(from),
        word(client),
        list(to)
    ));
}

/// `<id> from=<sender> to=<address> sent`
pub fn sent(id: &str, from: &str, to: &str) {
    send_line(format!("{id} from={} to={} sent", word(from), word(to)));
}

/// `<id> from=<sender> to=<address> failed (temporary|permanent): <error>`
pub fn failed(id: &str, from: &str, to: &str, permanent: bool, error: &str) {
    let how = if permanent { "permanent" } else { "temporary" };
    send_line(format!(
        "{id} from={} to={} failed ({how}): {}",
        word(from),
        word(to),
        safe(error)
    ));
}

/// `<id> from=<sender> completed loop, next in <delay>`
pub fn round_done(id: &str, from: &str, next: Duration) {
    send_line(format!(
        "{id} from={} completed loop, next in {}",
        word(from),
        tambo_common::duration::format(next)
    ));
}

/// `<id> from=<sender> all done`
pub fn done(id: &str, from: &str) {
    send_line(format!("{id} from={} all done", word(from)));
}

/// One of smtpd's events, as its line.
pub fn event_line(ev: &MailLogEvent) -> String {
    match ev {
        MailLogEvent::Listening { what, addr } => {
            format!("smtpd listening for {} on {}", safe(what), word(addr))
        }
        MailLogEvent::Auth { client, user, ok } => format!(
            "{} auth {} for {}",
            word(client),
            if *ok { "succeeded" } else { "failed" },
            word(user)
        ),
        MailLogEvent::Rejected {
            client,
            from,
            to,
            reason,
            temporary,
        } => {
            let what = if *temporary { "deferred" } else { "rejected" };
            let mut l = format!("{} {what}", word(client));
            if let Some(f) = from {
                l.push_str(&format!(" from={}", word(f)));
            }
            if !to.is_empty() {
                l.push_str(&format!(" to={}", list(to)));
            }
            l.push_str(&format!(" - {}", safe(reason)));
            l
        }
        MailLogEvent::Error {
            client,
            verb,
            code,
            reason,
        } => format!(
            "{} error {} {code} {}",
            word(client),
            word(verb),
            safe(reason)
        ),
    }
}

/// Writes a line made by [`event_line`].
pub fn line(line: String) {
    send_line(line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_chasquids() {
        let ev = MailLogEvent::Rejected {
            client: "192.0.2.1:4444".into(),
            from: Some("a@b.example".into()),
            to: vec!["x@y.example".into()],
            reason: "relay not allowed".into(),
            temporary: false,
        };
        assert_eq!(
            event_line(&ev),
            "192.0.2.1:4444 rejected from=a@b.example to=[x@y.example] - relay not allowed"
        );
        let ev = MailLogEvent::Error {
            client: "[2001:db8::1]:25".into(),
            verb: "GET".into(),
            code: 502,
            reason: "This is an SMTP server, not an HTTP server".into(),
        };
        assert_eq!(
            event_line(&ev),
            "[2001:db8::1]:25 error GET 502 This is an SMTP server, not an HTTP server"
        );
        let ev = MailLogEvent::Auth {
            client: "192.0.2.1:4444".into(),
            user: "ann@example.org".into(),
            ok: false,
        };
        assert_eq!(
            event_line(&ev),
            "192.0.2.1:4444 auth failed for ann@example.org"
        );
    }

    #[test]
    fn nobody_forges_a_line_inside_another() {
        let ev = MailLogEvent::Rejected {
            client: "192.0.2.1:4444".into(),
            from: Some("a@b\n2026-01-01 00:00:00.000000 10.0.0.1:1 auth failed for x".into()),
            to: vec!["a b@c".into(); 40],
            reason: "x".repeat(1000),
            temporary: false,
        };
        let l = event_line(&ev);
        assert!(!l.contains('\n'), "{l}");
        assert!(l.contains("a@b\\n2026-01-01\\u{20}00"), "{l}");
        assert!(l.contains("(+8 more)"), "{l}");
        assert!(l.chars().count() < 256 * 36, "{}", l.len());
        assert!(l.ends_with('…'), "{l}");
    }

    #[test]
    fn gathered_lines_are_written_in_order_with_their_own_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mail.log");
        let writer = Writer {
            dest: Dest::File(path.clone()),
            out: Out::File(open_file(&path).unwrap()),
            reported: None,
            tried: None,
        };
        let (tx, rx) = sync_channel(QUEUE);
        let t = std::thread::spawn(move || run(writer, rx));
        let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(86400 * 365 * 30);
        tx.send(Msg::Line("first".into(), long_ago)).unwrap();
        tx.send(Msg::Line("second".into(), SystemTime::now()))
            .unwrap();
        let (done, wait) = sync_channel(1);
        tx.send(Msg::Flush(done)).unwrap();
        wait.recv_timeout(Duration::from_secs(10)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].ends_with(" first") && lines[1].ends_with(" second"));
        let stamp = chrono::DateTime::<chrono::Local>::from(long_ago)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string();
        assert!(lines[0].starts_with(&stamp), "{text}");
        drop(tx);
        t.join().unwrap();
    }

    #[test]
    fn destinations() {
        let mut cfg = Config::defaults(Path::new("/etc/tambo"));
        assert_eq!(Dest::of(&cfg), Dest::Syslog);
        cfg.mail_log_path = "log/mail.log".into();
        assert_eq!(
            Dest::of(&cfg),
            Dest::File(PathBuf::from("/etc/tambo/log/mail.log"))
        );
    }
}
