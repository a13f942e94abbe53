//! `tambo sendmail` (also run as `sendmail`) and `mailq`: the local
//! submission of cron, mdadm, git send-email and scripts.
//!
//! The message goes to queued over local.sock, which takes the user from
//! the connection's credentials: this program holds no privilege and
//! needs none. It is all or nothing: every recipient is accepted and the
//! message queued (exit 0), or nothing is sent and the exit status says
//! why (sysexits.h). With queued down it exits 75 (EX_TEMPFAIL) and the
//! caller keeps the message; there is no maildrop directory to fill
//! (docs/operations.md says why).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tambo_common::config::Config;
use tambo_common::sockets::IpcSocket;
use tambo_proto::frame::{read_frame_max, write_frame};
use tambo_proto::submit::{RcptVerdict, SubmitReply, SubmitRequest};

/// sysexits.h.
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_NOUSER: u8 = 67;
pub const EX_UNAVAILABLE: u8 = 69;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_IOERR: u8 = 74;
pub const EX_TEMPFAIL: u8 = 75;
pub const EX_NOPERM: u8 = 77;
pub const EX_CONFIG: u8 = 78;

/// One body chunk on the wire.
const CHUNK: usize = 64 * 1024;

/// How long queued may take with one request (DATA's end included).
const TIMEOUT: Duration = Duration::from_secs(150);

/// A failure: the exit status and the line for stderr.
#[derive(Debug, PartialEq, Eq)]
pub struct Fail(pub u8, pub String);

fn fail(code: u8, msg: impl Into<String>) -> Fail {
    Fail(code, msg.into())
}

/// What the command line asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub config_dir: Option<PathBuf>,
    /// `-t`: recipients from To, Cc and Bcc (Bcc removed).
    pub extract: bool,
    /// `-i`/`-oi`: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    /// `-f`/`-r`: the envelope sender.
    pub from: Option<String>,
    /// `-F`: the sender's full name, for a From: header tambo writes.
    pub full_name: Option<String>,
    pub recipients: Vec<String>,
    /// `-bp`: list the queue (as mailq).
    pub list_queue: bool,
}

/// Parses sendmail's options, as Postfix's and sendmail's take them:
/// `-f addr` or `-faddr`, clustered `-ti`, `-o…` options ignored (but
/// `-oi`), recipients after the options or after `--`.
pub fn parse(args: &[String]) -> Result<Args, Fail> {
    let mut a = Args::default();
    let mut i = 0;
    let value = |i: &mut usize, attached: &str, flag: char| -> Result<String, Fail> {
        if !attached.is_empty() {
            return Ok(attached.to_string());
        }
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| fail(EX_USAGE, format!("option -{flag} needs a value")))
    };
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            a.recipients.extend(args[i + 1..].iter().cloned());
            break;
        }
        if let Some(dir) = arg.strip_prefix("--config_dir=") {
            a.config_dir = Some(PathBuf::from(dir));
            i += 1;
            continue;
        }
        let Some(opts) = arg.strip_prefix('-').filter(|o| !o.is_empty()) else {
            a.recipients.push(arg.clone());
            i += 1;
            continue;
        };
        for (at, c) in opts.char_indices() {
            let rest = &opts[at + c.len_utf8()..];
            match c {
                't' => a.extract = true,
                'i' => a.ignore_dots = true,
                'v' | 'm' | 'n' | 'U' => {}
                'o' => {
                    // -oi is -i; every other -o option is the server's
                    // business (-oem, -odi, -oQ…), ignored as Postfix does.
                    if rest == "i" {
                        a.ignore_dots = true;
                    }
                    break;
                }
                'f' | 'r' => {
                    a.from = Some(value(&mut i, rest, c)?);
                    break;
                }
                'F' => {
                    a.full_name = Some(value(&mut i, rest, c)?);
                    break;
                }
                'C' => {
                    a.config_dir = Some(PathBuf::from(value(&mut i, rest, c)?));
                    break;
                }
                // DSN and 8BITMIME options with their values, ignored.
                'N' | 'R' | 'V' | 'B' | 'X' | 'L' => {
                    value(&mut i, rest, c)?;
                    break;
                }
                'b' => {
                    match rest {
                        "m" | "" => {}
                        "p" => a.list_queue = true,
                        other => {
                            return Err(fail(
                                EX_USAGE,
                                format!("-b{other} is not supported (only -bm and -bp)"),
                            ));
                        }
                    }
                    break;
                }
                other => return Err(fail(EX_USAGE, format!("unknown option -{other}"))),
            }
        }
        i += 1;
    }
    Ok(a)
}

/// Reads the message from `input`: up to a line with a single dot unless
/// `ignore_dots` (and then no further: a writer may wait for us to exit),
/// at most `max` bytes; line ends become CRLF. Bytes are kept as they are
/// (8-bit bodies included).
pub fn read_message(
    input: &mut dyn std::io::BufRead,
    ignore_dots: bool,
    max: u64,
) -> Result<Vec<u8>, Fail> {
    let mut out = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = std::io::Read::take(&mut *input, max + 2);
        let n = std::io::BufRead::read_until(&mut limited, b'\n', &mut line)
            .map_err(|e| fail(EX_IOERR, format!("cannot read the message: {e}")))?;
        if n == 0 {
            break;
        }
        let body = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(&line);
        if !ignore_dots && body == b"." {
            break;
        }
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
        if out.len() as u64 > max {
            return Err(fail(
                EX_DATAERR,
                format!("the message is larger than {} MiB", max >> 20),
            ));
        }
    }
    Ok(out)
}

/// The addresses of an address-list header value (`A <a@b>, c@d`).
fn addresses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0usize);
    let mut parts = Vec::new();
    for (i, ch) in value.char_indices() {
        match ch {
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    for p in parts {
        // Group syntax (`undisclosed-recipients:;`, `team: a@b, c@d;`): the
        // group's name is no address.
        let p = p.trim().trim_end_matches(';');
        let p = match p.split_once(':') {
            Some((name, members)) if !name.contains(['<', '@', '"']) => members,
            _ => p,
        };
        let p = p.trim();
        let addr = match (p.rfind('<'), p.rfind('>')) {
            (Some(a), Some(b)) if a < b => p[a + 1..b].trim(),
            _ => p.split_whitespace().next().unwrap_or(""),
        };
        if !addr.is_empty() {
            out.push(addr.to_string());
        }
    }
    out
}

/// Whether a line (without its CRLF) can be in a header section: a field
/// (`Name: value`) or the continuation of one.
fn header_line(line: &[u8]) -> bool {
    if line.starts_with(b" ") || line.starts_with(b"\t") {
        return true;
    }
    match line.iter().position(|&b| b == b':') {
        Some(0) | None => false,
        Some(i) => line[..i].iter().all(|&b| (33..=126).contains(&b)),
    }
}

/// Completes the message as a submission server would (RFC 6409 §8): a
/// From: for the sender if there is none (with `-F`'s name), Date: and
/// Message-ID:; with `-t`, the recipients it names, and no Bcc: left.
/// The header section ends at the first line that is not a header (a
/// blank line is put there if there was none); the body's bytes are
/// copied as they are. Returns the message and the recipients it named.
pub fn prepare(
    msg: &[u8],
    sender: &str,
    full_name: Option<&str>,
    host: &str,
    extract: bool,
) -> (Vec<u8>, Vec<String>) {
    // The header lines, each with its CRLF, and where the body starts.
    let mut head: Vec<&[u8]> = Vec::new();
    let mut rest = msg;
    let mut blank = false;
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(rest.len(), |i| i + 2);
        let line = &rest[..end];
        let bare = line.strip_suffix(b"\r\n").unwrap_or(line);
        if bare.is_empty() {
            blank = true;
            rest = &rest[end..];
            break;
        }
        // A continuation before any field is not a header.
        if !header_line(bare) || (head.is_empty() && bare.starts_with(b" ")) {
            break;
        }
        head.push(line);
        rest = &rest[end..];
    }
    let _ = blank;
    // Fields, unfolded, for the checks below.
    let mut fields: Vec<(String, String)> = Vec::new();
    for l in &head {
        let text = String::from_utf8_lossy(l);
        let text = text.trim_end_matches("\r\n");
        if text.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(text.trim());
            }
        } else if let Some((n, v)) = text.split_once(':') {
            fields.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let has = |name: &str| fields.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut rcpts = Vec::new();
    if extract {
        for (n, v) in &fields {
            if ["to", "cc", "bcc"].contains(&n.to_ascii_lowercase().as_str()) {
                rcpts.extend(addresses(v));
            }
        }
    }
    let mut out: Vec<u8> = Vec::with_capacity(msg.len() + 256);
    if !has("From") {
        match full_name {
            Some(name) => out.extend_from_slice(
                format!(
                    "From: \"{}\" <{sender}>\r\n",
                    name.replace(['"', '\\'], "'")
                )
                .as_bytes(),
            ),
            None => out.extend_from_slice(format!("From: {sender}\r\n").as_bytes()),
        }
    }
    if !has("Date") {
        out.extend_from_slice(
            format!(
                "Date: {}\r\n",
                chrono::Local::now().format("%a, %d %b %Y %H:%M:%S %z")
            )
            .as_bytes(),
        );
    }
    if !has("Message-ID") {
        let mut r = [0u8; 12];
        let _ = getrandom::fill(&mut r);
        let id: String = r.iter().map(|b| format!("{b:02x}")).collect();
        out.extend_from_slice(format!("Message-ID: <{id}@{host}>\r\n").as_bytes());
    }
    // The header lines as they were, less Bcc: fields (and their
    // continuations) when the recipients came from them (-t).
    let mut skipping = false;
    for l in &head {
        if !(l.starts_with(b" ") || l.starts_with(b"\t")) {
            skipping = extract && l.len() >= 4 && l[..4].eq_ignore_ascii_case(b"bcc:");
        }
        if !skipping {
            out.extend_from_slice(l);
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(rest);
    (out, rcpts)
}

/// `tambo sendmail …`: the exit status.
pub fn run(args: &[String]) -> ExitCode {
    match send(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("sendmail: {msg}");
            ExitCode::from(code)
        }
    }
}

fn send(args: &[String]) -> Result<(), Fail> {
    let a = parse(args)?;
    let config_dir = a
        .config_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/etc/tambo"));
    if a.list_queue {
        return crate::admin::ask(&config_dir, tambo_proto::submit::AdminRequest::QueueList)
            .map(|t| print!("{t}"))
            .map_err(|e| fail(EX_NOPERM, e));
    }
    let cfg = Config::load(&config_dir, None)
        .map_err(|e| fail(EX_CONFIG, e.to_string()))?
        .resolve_paths();
    let msg = read_message(
        &mut std::io::stdin().lock(),
        a.ignore_dots,
        cfg.max_data_size(),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(EX_SOFTWARE, format!("cannot start the runtime: {e}")))?;
    rt.block_on(submit(&IpcSocket::Local.path(&cfg), &cfg.hostname, a, msg))
}

async fn call(s: &mut tokio::net::UnixStream, req: &SubmitRequest) -> Result<SubmitReply, Fail> {
    let lost = |e: String| fail(EX_TEMPFAIL, format!("queued went away: {e}"));
    tokio::time::timeout(TIMEOUT, async {
        write_frame(s, req).await.map_err(|e| lost(e.to_string()))?;
        read_frame_max(s, 1 << 20)
            .await
            .map_err(|e| lost(e.to_string()))?
            .ok_or_else(|| lost("no answer".into()))
    })
    .await
    .map_err(|_| fail(EX_TEMPFAIL, "queued did not answer in time"))?
}

async fn submit(socket: &Path, host: &str, a: Args, msg: Vec<u8>) -> Result<(), Fail> {
    let mut s = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        fail(
            EX_TEMPFAIL,
            format!(
                "cannot reach queued at {} ({e}): nothing was sent, try again later",
                socket.display()
            ),
        )
    })?;
    let login = match tokio::time::timeout(TIMEOUT, read_frame_max(&mut s, 1 << 16)).await {
        Ok(Ok(Some(SubmitReply::LocalLogin(l)))) => l,
        Ok(Ok(Some(SubmitReply::Failed { reason }))) => return Err(fail(EX_NOPERM, reason)),
        _ => return Err(fail(EX_TEMPFAIL, "queued did not greet: nothing was sent")),
    };
    let domain = login.rsplit_once('@').map_or("", |(_, d)| d).to_string();
    // `-f root` (cronie) and `-f '<a@b>'` mean what they say.
    let sender = match a
        .from
        .as_deref()
        .map(|f| f.trim().trim_start_matches('<').trim_end_matches('>'))
    {
        None => login.clone(),
        Some("") => String::new(),
        Some(f) if !f.contains('@') => format!("{f}@{domain}"),
        Some(f) => f.to_string(),
    };
    let (msg, named) = prepare(&msg, &sender, a.full_name.as_deref(), host, a.extract);
    let mut rcpts: Vec<String> = a.recipients.iter().chain(named.iter()).cloned().collect();
    // A bare name is a local user (`root`, as cron writes it).
    for r in rcpts.iter_mut() {
        if !r.contains('@') {
            *r = format!("{r}@{domain}");
        }
    }
    // Each address once, in the order given.
    let mut seen = std::collections::HashSet::new();
    rcpts.retain(|r| seen.insert(r.to_lowercase()));
    if rcpts.is_empty() {
        return Err(fail(EX_USAGE, "no recipients (give them, or use -t)"));
    }
    match call(
        &mut s,
        &SubmitRequest::Mail {
            from: sender.clone(),
            ehlo: String::new(),
            server_name: host.to_string(),
            spf: None,
        },
    )
    .await?
    {
        SubmitReply::Ok => {}
        SubmitReply::SenderNotAllowed => {
            return Err(fail(
                EX_NOPERM,
                format!("{login} may not send as <{sender}>"),
            ));
        }
        other => return Err(refused(&format!("sender <{sender}>"), other)),
    }
    for r in &rcpts {
        match call(&mut s, &SubmitRequest::Rcpt { to: r.clone() }).await? {
            SubmitReply::Rcpt(RcptVerdict::Accepted) => {}
            SubmitReply::Rcpt(RcptVerdict::NoSuchUser) => {
                return Err(fail(EX_NOUSER, format!("<{r}>: no such user")));
            }
            SubmitReply::Rcpt(RcptVerdict::TempError(e)) => {
                return Err(fail(EX_TEMPFAIL, format!("<{r}>: {e}")));
            }
            SubmitReply::Rcpt(v) => {
                return Err(fail(EX_UNAVAILABLE, format!("<{r}>: refused: {v:?}")));
            }
            other => return Err(refused(&format!("<{r}>"), other)),
        }
    }
    match call(&mut s, &SubmitRequest::DataBegin).await? {
        SubmitReply::DataReady => {}
        other => return Err(refused("the message", other)),
    }
    for chunk in msg.chunks(CHUNK) {
        write_frame(&mut s, &SubmitRequest::DataChunk(chunk.to_vec()))
            .await
            .map_err(|e| fail(EX_TEMPFAIL, format!("queued went away: {e}")))?;
    }
    match call(&mut s, &SubmitRequest::DataEnd).await? {
        SubmitReply::Queued { .. } => Ok(()),
        other => Err(refused("the message", other)),
    }
}

/// A refusal as a sysexits status: temporary ones 75 (the caller keeps
/// the message and may try again), permanent ones 69.
fn refused(what: &str, reply: SubmitReply) -> Fail {
    match reply {
        SubmitReply::NoSpace { reason } => fail(EX_TEMPFAIL, format!("{what}: {reason}")),
        SubmitReply::Failed { reason } => fail(EX_TEMPFAIL, format!("{what}: {reason}")),
        SubmitReply::HookRejected {
            permanent: false,
            text,
        } => fail(EX_TEMPFAIL, format!("{what}: {text}")),
        SubmitReply::HookRejected {
            permanent: true,
            text,
        } => fail(EX_UNAVAILABLE, format!("{what}: refused: {text}")),
        SubmitReply::BadSequence(e) => fail(EX_DATAERR, format!("{what}: {e}")),
        SubmitReply::SecurityLevelTooLow => fail(EX_UNAVAILABLE, format!("{what}: refused")),
        other => fail(EX_SOFTWARE, format!("{what}: unexpected answer {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Args, Fail> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_flags_cron_mdadm_and_git_use() {
        // cron: -FCronDaemon -i -B8BITMIME -oem user
        let a = args(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]).unwrap();
        assert_eq!(a.full_name.as_deref(), Some("CronDaemon"));
        assert!(a.ignore_dots);
        assert_eq!(a.recipients, ["root"]);
        // git send-email: -i -f <sender> -- <recipients>
        let a = args(&[
            "-oi",
            "-f",
            "me@x.example",
            "--",
            "a@b.example",
            "-c@d.example",
        ])
        .unwrap();
        assert!(a.ignore_dots);
        assert_eq!(a.from.as_deref(), Some("me@x.example"));
        assert_eq!(a.recipients, ["a@b.example", "-c@d.example"]);
        // mdadm, scripts: -t
        let a = args(&["-ti"]).unwrap();
        assert!(a.extract && a.ignore_dots);
        assert!(args(&["-bp"]).unwrap().list_queue);
        assert_eq!(args(&["-q"]).unwrap_err().0, EX_USAGE);
        assert_eq!(args(&["-f"]).unwrap_err().0, EX_USAGE);
        assert_eq!(args(&["-bs"]).unwrap_err().0, EX_USAGE);
    }

    #[test]
    fn a_dot_ends_the_message_unless_i() {
        let input = b"Subject: x\n\nline\n.\nafter\n";
        let m = read_message(&mut &input[..], false, 1 << 20).unwrap();
        // Nothing after the dot is read.
        assert_eq!(m, b"Subject: x\r\n\r\nline\r\n");
        let m = read_message(&mut &input[..], true, 1 << 20).unwrap();
        assert_eq!(m, b"Subject: x\r\n\r\nline\r\n.\r\nafter\r\n");
        assert_eq!(
            read_message(&mut &input[..], true, 4).unwrap_err().0,
            EX_DATAERR
        );
    }

    #[test]
    fn t_takes_to_cc_bcc_and_drops_bcc() {
        let msg = b"To: Ann <ann@example.org>, \"B, b\" <b@x.example>\r\nCc: c@y.example\r\nBcc: secret@z.example,\r\n  other@z.example\r\nSubject: s\r\n\r\nbody\r\n";
        let (out, rcpts) = prepare(msg, "me@example.org", Some("Me"), "mx.example.org", true);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            rcpts,
            [
                "ann@example.org",
                "b@x.example",
                "c@y.example",
                "secret@z.example",
                "other@z.example"
            ]
        );
        assert!(!out.to_lowercase().contains("bcc"), "{out}");
        assert!(!out.contains("secret@"), "{out}");
        assert!(
            out.starts_with("From: \"Me\" <me@example.org>\r\nDate: "),
            "{out}"
        );
        assert!(
            out.contains("\r\nMessage-ID: <") && out.contains("@mx.example.org>\r\n"),
            "{out}"
        );
        assert!(out.ends_with("Subject: s\r\n\r\nbody\r\n"), "{out}");
    }

    #[test]
    fn eight_bit_bodies_stay_as_they_are() {
        let msg = b"Subject: caf\xe9\r\n\r\nLatin-1: caf\xe9\r\n";
        let (out, _) = prepare(msg, "me@example.org", None, "h", false);
        assert!(out.ends_with(b"Subject: caf\xe9\r\n\r\nLatin-1: caf\xe9\r\n"));
    }

    #[test]
    fn the_header_section_ends_at_the_first_non_header() {
        // No blank line: the body starts at the first line that is not a
        // field, and a blank line goes before it.
        let (out, _) = prepare(b"Subject: x\r\nbody here\r\n", "me@e.org", None, "h", false);
        assert!(out.ends_with(b"Subject: x\r\n\r\nbody here\r\n"));
        let (out, _) = prepare(b"text\r\n\r\nmore\r\n", "me@e.org", None, "h", false);
        assert!(
            out.ends_with(b"\r\n\r\ntext\r\n\r\nmore\r\n"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn group_syntax_names_no_recipient() {
        let (_, rcpts) = prepare(
            b"To: undisclosed-recipients:;\r\nCc: team: a@x.example, b@x.example;\r\n\r\nx\r\n",
            "me@e.org",
            None,
            "h",
            true,
        );
        assert_eq!(rcpts, ["a@x.example", "b@x.example"]);
    }

    #[test]
    fn a_message_keeps_its_own_headers() {
        let msg = b"From: x@example.org\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <a@b>\r\n\r\nhi\r\n";
        let (out, rcpts) = prepare(msg, "me@example.org", None, "h", false);
        assert_eq!(out, msg);
        assert!(rcpts.is_empty());
        // No header at all: all body.
        let (out, _) = prepare(b"just text\r\n", "me@example.org", None, "h", false);
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("\r\n\r\njust text\r\n"), "{out}");
    }
}
