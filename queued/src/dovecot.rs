//! Dovecot as the fallback for authentication and user existence
//! (REFERENCE §5.5): a client of Dovecot's auth-userdb (master) and
//! auth-client protocols over Unix sockets.
//!
//! queued asks Dovecot only about users tambo's own files do not know (the
//! lookup order of REFERENCE §5.4 is the callers' business). Each call opens
//! a fresh connection and is bounded as a whole, connect included, by
//! [`TIMEOUT`]; a call never asks twice.
//!
//! Dovecot is trusted, but a wrong socket path could lead anywhere, so every
//! read is bounded: lines by [`MAX_LINE`], the auth-client handshake by
//! [`MAX_HANDSHAKE_LINES`]. Anything but the expected answers is an error,
//! never a "yes". The password is sent base64-encoded and never logged, nor
//! put into an error.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use tambo_common::config::Config;

/// How long one call may take, connect and I/O together.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Longest line read from Dovecot, without its newline. Real lines are far
/// shorter (a USER reply carries a few userdb fields); anything longer is
/// not Dovecot.
pub const MAX_LINE: usize = 16 * 1024;

/// Most lines the auth-client handshake may send before `DONE`: one per
/// mechanism, plus VERSION, SPID, CUID and COOKIE. Dovecot has about 20
/// mechanisms; a peer that keeps talking is not Dovecot.
pub const MAX_HANDSHAKE_LINES: usize = 128;

/// Where Dovecot's auth-userdb listener is looked for when
/// `dovecot_userdb_path` is empty, in order.
pub const USERDB_CANDIDATES: [&str; 3] = [
    "/var/run/dovecot/auth-tambo-userdb",
    "/var/run/dovecot/auth-chasquid-userdb",
    "/var/run/dovecot/auth-userdb",
];

/// Where Dovecot's auth-client listener is looked for when
/// `dovecot_client_path` is empty, in order.
pub const CLIENT_CANDIDATES: [&str; 3] = [
    "/var/run/dovecot/auth-tambo-client",
    "/var/run/dovecot/auth-chasquid-client",
    "/var/run/dovecot/auth-client",
];

/// Why a call got no answer. Every one of these is a temporary failure for
/// the caller (`454 4.7.0` at AUTH, `451 4.4.3` at RCPT).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user name cannot be sent: whitespace or control characters would
    /// split or end a protocol line.
    #[error("the user name {0:?} contains whitespace or control characters")]
    InvalidUser(String),
    /// No configured path, and none of the usual paths accepts a
    /// connection.
    #[error("no Dovecot {which} socket found (tried {tried})")]
    NoSocket { which: &'static str, tried: String },
    /// The configured (or found) socket refused the connection.
    #[error("cannot connect to Dovecot's {which} socket {path}: {source}")]
    Connect {
        which: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The whole call took longer than its budget.
    #[error("Dovecot did not answer within {0:?}")]
    Timeout(Duration),
    /// Reading or writing failed, or Dovecot hung up.
    #[error("talking to Dovecot: {0}")]
    Io(#[from] std::io::Error),
    /// Dovecot said something this client does not expect.
    #[error("unexpected answer from Dovecot: {0}")]
    Protocol(String),
}

/// One of Dovecot's two sockets: a configured path, or the first candidate
/// that accepts a connection.
#[derive(Debug)]
struct Socket {
    which: &'static str,
    configured: Option<PathBuf>,
    candidates: Vec<PathBuf>,
    /// The candidate found last time. Cleared when it stops accepting
    /// connections, so a Dovecot that moves is found again; until one is
    /// found, every call looks again (REFERENCE §5.5: discovery is lazy).
    found: Mutex<Option<PathBuf>>,
}

impl Socket {
    fn new(which: &'static str, configured: &str, candidates: &[&str]) -> Self {
        Self {
            which,
            configured: (!configured.is_empty()).then(|| PathBuf::from(configured)),
            candidates: candidates.iter().map(PathBuf::from).collect(),
            found: Mutex::new(None),
        }
    }

    fn found(&self) -> std::sync::MutexGuard<'_, Option<PathBuf>> {
        // Only a cached path: still right after a panic elsewhere.
        self.found.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self) -> Result<UnixStream, Error> {
        let connect_to = |path: &Path| {
            let path = path.to_path_buf();
            async move {
                UnixStream::connect(&path)
                    .await
                    .map_err(|source| Error::Connect {
                        which: self.which,
                        path,
                        source,
                    })
            }
        };
        if let Some(path) = &self.configured {
            return connect_to(path).await;
        }
        let cached = self.found().clone();
        if let Some(path) = cached {
            match connect_to(&path).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    // Dovecot stopped or moved: look again from the top, so
                    // this call answers for wherever it is now.
                    tracing::debug!("{e}; looking for Dovecot again");
                    *self.found() = None;
                }
            }
        }
        for path in &self.candidates {
            if let Ok(s) = UnixStream::connect(path).await {
                tracing::info!("Dovecot {} socket found at {}", self.which, path.display());
                *self.found() = Some(path.clone());
                return Ok(s);
            }
        }
        Err(Error::NoSocket {
            which: self.which,
            tried: self
                .candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The path in use, for messages.
    fn describe(&self) -> String {
        match (&self.configured, &*self.found()) {
            (Some(p), _) | (None, Some(p)) => p.display().to_string(),
            (None, None) => "not found yet".into(),
        }
    }
}

/// The Dovecot client: one per queued, shared by every session and the
/// queue's delivery-time checks.
#[derive(Debug)]
pub struct Dovecot {
    userdb: Socket,
    client: Socket,
    timeout: Duration,
}

impl Dovecot {
    /// The client `cfg` asks for, or None when `dovecot_auth` is off.
    pub fn from_config(cfg: &Config) -> Option<Self> {
        cfg.dovecot_auth.then(|| {
            Self::with_candidates(
                &cfg.dovecot_userdb_path,
                &cfg.dovecot_client_path,
                &USERDB_CANDIDATES,
                &CLIENT_CANDIDATES,
            )
        })
    }

    /// A client with its own paths to look in when none is configured
    /// (empty strings), as the tests need.
    pub fn with_candidates(
        userdb: &str,
        client: &str,
        userdb_candidates: &[&str],
        client_candidates: &[&str],
    ) -> Self {
        Self {
            userdb: Socket::new("userdb", userdb, userdb_candidates),
            client: Socket::new("client", client, client_candidates),
            timeout: TIMEOUT,
        }
    }

    /// Replaces [`TIMEOUT`] (tests).
    #[cfg(test)]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// The sockets in use, for log lines.
    pub fn describe(&self) -> String {
        format!(
            "userdb {}, client {}",
            self.userdb.describe(),
            self.client.describe()
        )
    }

    /// Whether Dovecot can be reached now: both sockets accept a
    /// connection (and are remembered, if looked for). For the startup
    /// warning; the connections are closed at once.
    pub async fn reachable(&self) -> Result<(), Error> {
        self.bounded(async {
            self.userdb.connect().await?;
            self.client.connect().await?;
            Ok(())
        })
        .await
    }

    /// Whether Dovecot's userdb knows `id` (`user@domain`, or a bare
    /// `user`).
    pub async fn exists(&self, id: &str) -> Result<bool, Error> {
        check_user(id)?;
        self.bounded(async {
            let stream = self.userdb.connect().await?;
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            // The server speaks first: its version, then its pid.
            let version = read_line(&mut r).await?;
            if !is_major_version_1(&version) {
                return Err(Error::Protocol(format!(
                    "expected VERSION 1 from the userdb socket, got {}",
                    quote(&version)
                )));
            }
            let spid = read_line(&mut r).await?;
            if !spid.starts_with("SPID\t") {
                return Err(Error::Protocol(format!(
                    "expected SPID from the userdb socket, got {}",
                    quote(&spid)
                )));
            }
            w.write_all(format!("VERSION\t1\t1\nUSER\t1\t{id}\tservice=smtp\n").as_bytes())
                .await?;
            let answer = read_line(&mut r).await?;
            let mut fields = answer.split('\t');
            match (fields.next(), fields.next()) {
                (Some("USER"), Some("1")) => Ok(true),
                (Some("NOTFOUND"), _) => Ok(false),
                _ => Err(Error::Protocol(format!(
                    "USER lookup answered {}",
                    quote(&answer)
                ))),
            }
        })
        .await
    }

    /// Whether Dovecot accepts `password` for `id` (SASL PLAIN, with `id`
    /// as both authorization and authentication identity).
    pub async fn authenticate(&self, id: &str, password: &[u8]) -> Result<bool, Error> {
        check_user(id)?;
        // A NUL would shift PLAIN's fields: whatever Dovecot made of it,
        // it would not be this password. smtpd's decoding rules it out.
        if password.contains(&0) {
            return Ok(false);
        }
        self.bounded(async {
            let stream = self.client.connect().await?;
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            w.write_all(format!("VERSION\t1\t1\nCPID\t{}\n", std::process::id()).as_bytes())
                .await?;
            // The server's handshake: VERSION, its mechanisms, SPID, CUID,
            // COOKIE, DONE. Only the version and PLAIN matter here.
            let mut plain = false;
            let mut lines = 0;
            loop {
                let line = read_line(&mut r).await?;
                if lines == 0 && !is_major_version_1(&line) {
                    return Err(Error::Protocol(format!(
                        "expected VERSION 1 from the client socket, got {}",
                        quote(&line)
                    )));
                }
                if line == "DONE" {
                    break;
                }
                lines += 1;
                if lines > MAX_HANDSHAKE_LINES {
                    return Err(Error::Protocol(format!(
                        "no DONE within {MAX_HANDSHAKE_LINES} handshake lines"
                    )));
                }
                let mut fields = line.split('\t');
                if fields.next() == Some("MECH")
                    && fields
                        .next()
                        .is_some_and(|m| m.eq_ignore_ascii_case("PLAIN"))
                {
                    plain = true;
                }
            }
            if !plain {
                // Dovecot would answer FAIL, and a configuration mistake
                // would look like every password being wrong.
                return Err(Error::Protocol(
                    "Dovecot does not offer PLAIN (add it to auth_mechanisms)".into(),
                ));
            }
            let mut sasl = Vec::with_capacity(2 * id.len() + 2 + password.len());
            sasl.extend_from_slice(id.as_bytes());
            sasl.push(0);
            sasl.extend_from_slice(id.as_bytes());
            sasl.push(0);
            sasl.extend_from_slice(password);
            let resp = base64::engine::general_purpose::STANDARD.encode(&sasl);
            // `secured`: smtpd only offers AUTH on TLS. `no-penalty`: the
            // failure budget is queued's; `nologin`: only the check.
            w.write_all(
                format!(
                    "AUTH\t1\tPLAIN\tservice=smtp\tsecured\tno-penalty\tnologin\tresp={resp}\n"
                )
                .as_bytes(),
            )
            .await?;
            let answer = read_line(&mut r).await?;
            let mut fields = answer.split('\t');
            match (fields.next(), fields.next()) {
                (Some("OK"), Some("1")) => Ok(true),
                (Some("FAIL"), Some("1")) => Ok(false),
                // A CONT would ask for another round, which PLAIN never
                // has; the answer is quoted without its fields, which
                // may echo the identity but never the password.
                (Some(kind), _) => Err(Error::Protocol(format!(
                    "AUTH answered {}",
                    quote(&kind.chars().take(32).collect::<String>())
                ))),
                (None, _) => Err(Error::Protocol("AUTH answered nothing".into())),
            }
        })
        .await
    }

    /// Runs one call within the time budget.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(Error::Timeout(self.timeout)))
    }
}

/// REFERENCE §5.5: a user name with whitespace is an error. Control
/// characters too: a tab or newline would let the name add protocol
/// fields or lines.
fn check_user(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidUser(id.to_string()));
    }
    Ok(())
}

fn is_major_version_1(line: &str) -> bool {
    let mut fields = line.split('\t');
    fields.next() == Some("VERSION") && fields.next() == Some("1")
}

/// Reads one `\n`-terminated line (a `\r` before it is dropped), at most
/// [`MAX_LINE`] bytes. EOF before a newline and a longer line are errors.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<String, Error> {
    let mut buf = Vec::new();
    // One byte past the limit tells a line that is just long enough from
    // one that is too long.
    let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
    (&mut *r).take(limit).read_until(b'\n', &mut buf).await?;
    if buf.last() != Some(&b'\n') {
        return Err(if buf.len() > MAX_LINE {
            Error::Protocol(format!("a line longer than {MAX_LINE} bytes"))
        } else {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "Dovecot closed the connection",
            ))
        });
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A line from the peer, cut short and escaped, for an error message.
fn quote(line: &str) -> String {
    let short: String = line.chars().take(100).collect();
    let more = if short.len() < line.len() { "…" } else { "" };
    format!("{short:?}{more}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;
    use tokio::net::UnixListener;

    /// What a fake Dovecot does with each connection: send `greeting`,
    /// read `read` lines (kept in `seen`), then send `reply` (unless it
    /// stalls), then hang up.
    #[derive(Clone)]
    struct Script {
        greeting: String,
        read: usize,
        reply: String,
        stall: bool,
    }

    const USERDB_HELLO: &str = "VERSION\t1\t1\nSPID\t4242\n";
    const CLIENT_HELLO: &str = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t4242\nCUID\t7\nCOOKIE\t0123456789abcdef\nDONE\n";

    fn userdb(reply: &str) -> Script {
        Script {
            greeting: USERDB_HELLO.into(),
            read: 2,
            reply: reply.into(),
            stall: false,
        }
    }

    fn client(reply: &str) -> Script {
        Script {
            greeting: CLIENT_HELLO.into(),
            read: 3,
            reply: reply.into(),
            stall: false,
        }
    }

    type Seen = Arc<std::sync::Mutex<Vec<String>>>;

    /// Serves `script` on a socket at `path`, every connection, until the
    /// test's runtime ends. Returns the lines it was sent.
    fn serve(path: &Path, script: Script) -> Seen {
        let listener = UnixListener::bind(path).unwrap();
        let seen = Seen::default();
        let s2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (script, seen) = (script.clone(), s2.clone());
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    if w.write_all(script.greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    for _ in 0..script.read {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        seen.lock()
                            .unwrap()
                            .push(line.trim_end_matches('\n').to_string());
                    }
                    if script.stall {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    let _ = w.write_all(script.reply.as_bytes()).await;
                });
            }
        });
        seen
    }

    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        /// A client whose sockets are configured: `userdb` and `client`.
        fn dovecot(&self) -> Dovecot {
            Dovecot::with_candidates(&self.path("userdb"), &self.path("client"), &[], &[])
                .timeout(Duration::from_millis(500))
        }

        fn userdb(&self, script: Script) -> Seen {
            serve(Path::new(&self.path("userdb")), script)
        }

        fn client(&self, script: Script) -> Seen {
            serve(Path::new(&self.path("client")), script)
        }
    }

    #[tokio::test]
    async fn exists_asks_the_userdb() {
        let f = Fake::new();
        let seen = f.userdb(userdb("USER\t1\tdave@example.test\thome=/home/dave\n"));
        assert!(f.dovecot().exists("dave@example.test").await.unwrap());
        assert_eq!(
            *seen.lock().unwrap(),
            ["VERSION\t1\t1", "USER\t1\tdave@example.test\tservice=smtp"]
        );
    }

    #[tokio::test]
    async fn not_found_is_no() {
        let f = Fake::new();
        let seen = f.userdb(userdb("NOTFOUND\t1\n"));
        assert!(!f.dovecot().exists("nobody").await.unwrap());
        // A bare user goes as it is.
        assert_eq!(seen.lock().unwrap()[1], "USER\t1\tnobody\tservice=smtp");
    }

    #[tokio::test]
    async fn anything_else_from_the_userdb_is_an_error() {
        for reply in [
            "FAIL\t1\treason=ldap down\n",
            "USER\t12\tdave\n",
            "USER\n",
            "user\t1\tdave\n",
            "\n",
            "NOTFOUNDX\t1\n",
            // No newline: the peer hung up mid-line.
            "USER\t1\tdave",
            "",
        ] {
            let f = Fake::new();
            f.userdb(userdb(reply));
            let r = f.dovecot().exists("dave").await;
            assert!(
                matches!(r, Err(Error::Protocol(_) | Error::Io(_))),
                "{reply:?}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_userdb_greeting_is_checked() {
        for greeting in [
            "VERSION\t2\t0\nSPID\t1\n",
            "SPID\t1\nVERSION\t1\t0\n",
            "VERSION\t1\t0\nCUID\t1\n",
            // The auth-client socket configured as the userdb.
            CLIENT_HELLO,
        ] {
            let f = Fake::new();
            f.userdb(Script {
                greeting: greeting.into(),
                ..userdb("USER\t1\tdave\n")
            });
            let r = f.dovecot().exists("dave").await;
            assert!(matches!(r, Err(Error::Protocol(_))), "{greeting:?}: {r:?}");
        }
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let f = Fake::new();
        f.userdb(Script {
            stall: true,
            ..userdb("USER\t1\tdave\n")
        });
        let start = Instant::now();
        let r = f.dovecot().exists("dave").await;
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
        // A listener that never accepts: connect works (the backlog), then
        // nothing is ever said.
        let f = Fake::new();
        let _held = std::os::unix::net::UnixListener::bind(f.path("client")).unwrap();
        let start = Instant::now();
        let r = f.dovecot().authenticate("dave", b"pw").await;
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn the_default_budget_is_five_seconds() {
        assert_eq!(TIMEOUT, Duration::from_secs(5));
        let d = Dovecot::with_candidates("/x", "/y", &[], &[]);
        assert_eq!(d.timeout, TIMEOUT);
    }

    #[tokio::test]
    async fn authenticate_with_plain() {
        let f = Fake::new();
        let seen = f.client(client("OK\t1\tuser=dave@example.test\n"));
        assert!(
            f.dovecot()
                .authenticate("dave@example.test", "sécret pw".as_bytes())
                .await
                .unwrap()
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0], "VERSION\t1\t1");
        assert_eq!(seen[1], format!("CPID\t{}", std::process::id()));
        let resp = seen[2]
            .strip_prefix("AUTH\t1\tPLAIN\tservice=smtp\tsecured\tno-penalty\tnologin\tresp=")
            .unwrap_or_else(|| panic!("{:?}", seen[2]));
        let sasl = base64::engine::general_purpose::STANDARD
            .decode(resp)
            .unwrap();
        assert_eq!(
            sasl,
            "dave@example.test\0dave@example.test\0sécret pw".as_bytes()
        );
    }

    #[tokio::test]
    async fn fail_is_a_refusal() {
        let f = Fake::new();
        f.client(client("FAIL\t1\tuser=dave\treason=bad password\n"));
        assert!(!f.dovecot().authenticate("dave", b"wrong").await.unwrap());
    }

    #[tokio::test]
    async fn anything_else_from_the_client_socket_is_an_error() {
        for reply in [
            "CONT\t1\t\n",
            "OK\t2\n",
            "OK\n",
            "ok\t1\n",
            "FAIL\n",
            "garbage\n",
            "\n",
            "OK\t1",
            "",
        ] {
            let f = Fake::new();
            f.client(client(reply));
            let r = f.dovecot().authenticate("dave", b"pw").await;
            assert!(
                matches!(r, Err(Error::Protocol(_) | Error::Io(_))),
                "{reply:?}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_client_handshake_is_checked() {
        for greeting in [
            // No version first.
            "MECH\tPLAIN\nVERSION\t1\t2\nDONE\n",
            "VERSION\t2\t0\nMECH\tPLAIN\nDONE\n",
            // The userdb socket configured as the client: no DONE ever;
            // the peer hangs up.
            USERDB_HELLO,
        ] {
            let f = Fake::new();
            f.client(Script {
                greeting: greeting.into(),
                read: 0,
                ..client("OK\t1\n")
            });
            let r = f.dovecot().authenticate("dave", b"pw").await;
            assert!(
                matches!(r, Err(Error::Protocol(_) | Error::Io(_))),
                "{greeting:?}: {r:?}"
            );
        }
        // PLAIN not offered: a clear error, not a wrong password.
        let f = Fake::new();
        f.client(Script {
            greeting: "VERSION\t1\t2\nMECH\tLOGIN\tplaintext\nDONE\n".into(),
            ..client("FAIL\t1\n")
        });
        let r = f.dovecot().authenticate("dave", b"pw").await;
        let Err(Error::Protocol(e)) = r else {
            panic!("{r:?}")
        };
        assert!(e.contains("auth_mechanisms"), "{e}");
    }

    #[tokio::test]
    async fn reads_are_bounded() {
        // One line too long, in each protocol.
        let long = format!("SPID\t{}\n", "x".repeat(MAX_LINE));
        let f = Fake::new();
        f.userdb(Script {
            greeting: format!("VERSION\t1\t1\n{long}"),
            ..userdb("USER\t1\n")
        });
        let r = f.dovecot().exists("dave").await;
        assert!(
            matches!(&r, Err(Error::Protocol(e)) if e.contains("longer")),
            "{r:?}"
        );
        f.client(Script {
            greeting: format!("VERSION\t1\t2\n{long}DONE\n"),
            ..client("OK\t1\n")
        });
        let r = f.dovecot().authenticate("dave", b"pw").await;
        assert!(
            matches!(&r, Err(Error::Protocol(e)) if e.contains("longer")),
            "{r:?}"
        );
        // A handshake that never ends: refused at the line limit, well
        // before the time budget.
        let f = Fake::new();
        let endless = "MECH\tX\n".repeat(MAX_HANDSHAKE_LINES + 1);
        f.client(Script {
            greeting: format!("VERSION\t1\t2\nMECH\tPLAIN\n{endless}DONE\n"),
            ..client("OK\t1\n")
        });
        let d = f.dovecot().timeout(Duration::from_secs(30));
        let start = Instant::now();
        let r = d.authenticate("dave", b"pw").await;
        assert!(
            matches!(&r, Err(Error::Protocol(e)) if e.contains("DONE")),
            "{r:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn read_line_limits() {
        let ok = format!("{}\nnext\r\n", "a".repeat(MAX_LINE));
        let mut r = ok.as_bytes();
        assert_eq!(read_line(&mut r).await.unwrap(), "a".repeat(MAX_LINE));
        assert_eq!(read_line(&mut r).await.unwrap(), "next");
        assert!(matches!(read_line(&mut r).await, Err(Error::Io(_))));
        let too_long = format!("{}\n", "a".repeat(MAX_LINE + 1));
        assert!(matches!(
            read_line(&mut too_long.as_bytes()).await,
            Err(Error::Protocol(_))
        ));
        // Not UTF-8: read, not trusted (nothing matches it).
        assert_eq!(
            read_line(&mut &b"\xff\tx\n"[..]).await.unwrap(),
            "\u{fffd}\tx"
        );
    }

    #[tokio::test]
    async fn user_names_with_whitespace_are_errors() {
        let f = Fake::new();
        let seen = f.userdb(userdb("USER\t1\n"));
        f.client(client("OK\t1\n"));
        let d = f.dovecot();
        for id in [
            "da ve",
            "dave\t",
            "dave\nUSER\t2\troot",
            "\u{a0}dave",
            "da\u{7}ve",
            "",
        ] {
            assert!(
                matches!(d.exists(id).await, Err(Error::InvalidUser(_))),
                "{id:?}"
            );
            assert!(
                matches!(d.authenticate(id, b"pw").await, Err(Error::InvalidUser(_))),
                "{id:?}"
            );
        }
        assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
        // A NUL in the password is no password Dovecot could check.
        assert!(!d.authenticate("dave", b"pw\0root").await.unwrap());
    }

    #[tokio::test]
    async fn configured_paths_win() {
        let f = Fake::new();
        // A working Dovecot at the usual place, but the configured path
        // has none: the configured one is what counts.
        f.userdb(userdb("USER\t1\n"));
        let d = Dovecot::with_candidates(&f.path("missing"), "", &[&f.path("userdb")], &[]);
        let r = d.exists("dave").await;
        assert!(matches!(r, Err(Error::Connect { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn sockets_are_found_in_order_and_lazily() {
        let f = Fake::new();
        let candidates = [f.path("tambo"), f.path("chasquid"), f.path("plain")];
        let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
        let d = Dovecot::with_candidates("", "", &candidates, &candidates)
            .timeout(Duration::from_millis(500));
        // Nothing there yet: an error (a warning at startup), not a
        // verdict.
        let r = d.exists("dave").await;
        assert!(
            matches!(&r, Err(Error::NoSocket { tried, .. }) if tried.contains("chasquid")),
            "{r:?}"
        );
        assert!(d.reachable().await.is_err());
        // Dovecot comes up later: the next call finds it.
        serve(Path::new(&f.path("plain")), userdb("NOTFOUND\t1\n"));
        assert!(!d.exists("dave").await.unwrap());
        // An earlier candidate wins once it exists, but only when the one
        // found stops answering.
        serve(Path::new(&f.path("chasquid")), userdb("USER\t1\n"));
        assert!(!d.exists("dave").await.unwrap(), "still the one found");
        std::fs::remove_file(f.path("plain")).unwrap();
        assert!(d.exists("dave").await.unwrap(), "found again, in order");
        assert!(d.describe().contains("chasquid"), "{}", d.describe());
    }
}
