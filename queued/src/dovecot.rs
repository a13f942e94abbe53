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
mod tests;
