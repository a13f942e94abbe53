//! local.sock: mail from this machine's users (`tambo sendmail`, cron,
//! scripts). Any local user may connect (mode 0666); queued takes who it
//! is from the connection's credentials (SO_PEERCRED), never from what the
//! client says, and runs the session as that user's authenticated
//! submission: `alice` may send as `alice@<local domain>` (and her
//! aliases), as an AUTH'd alice would (`sender_bound_to_login`).
//!
//! queued speaks first: `LocalLogin` with the address the user submits as.
//! The client then speaks the envelope and data requests of submit.sock
//! (MAIL, RCPT, RSET, DATA and its chunks) with no hello: it has no role
//! to claim. Anything else closes the connection. queued writes the Received
//! header itself, naming the user and uid it saw.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use tambo_common::config::Config;
use tambo_common::domains::Domains;
use tambo_common::loglimit::{LogLimiter, skipped};
use tambo_proto::frame::{FrameReader, MAX_CHUNK_FRAME, MAX_SMALL_FRAME, write_frame};
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{SubmitReply, SubmitRequest};

use crate::queue::Queue;
use crate::session::Session;

/// Local sessions at once, all users together: a loop of `sendmail` in a
/// user's crontab must not take every queue slot from SMTP.
const MAX_SESSIONS: usize = 64;

/// Local sessions at once from one uid: one user cannot take them all.
const MAX_SESSIONS_PER_UID: usize = 8;

/// How long a local client may stay silent.
const IDLE: Duration = Duration::from_secs(60);

const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Listener {
    queue: Arc<Queue>,
    auth: Arc<crate::auth::Service>,
    sessions: Arc<Semaphore>,
    per_uid: std::sync::Mutex<std::collections::HashMap<u32, usize>>,
    refused: LogLimiter,
}

/// A uid's hold on one of its session slots, given back when dropped.
struct UidSlot<'a> {
    l: &'a Listener,
    uid: u32,
}

impl Drop for UidSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.l.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

impl Listener {
    fn take_uid_slot(&self, uid: u32) -> Option<UidSlot<'_>> {
        let mut m = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(uid).or_default();
        if *n >= MAX_SESSIONS_PER_UID {
            return None;
        }
        *n += 1;
        Some(UidSlot { l: self, uid })
    }
}

impl Listener {
    pub fn new(queue: Arc<Queue>, auth: Arc<crate::auth::Service>) -> Self {
        Self {
            queue,
            auth,
            sessions: Arc::new(Semaphore::new(MAX_SESSIONS)),
            per_uid: std::sync::Mutex::default(),
            refused: LogLimiter::new(),
        }
    }
}

/// The user name of `uid` in /etc/passwd (the local users tambo knows;
/// users only a directory service knows cannot submit locally).
fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

/// The domain a local user's address is in: the host name if it is a
/// local domain, else the local domain the host name is in
/// (`mx.example.org` → `example.org`), else the first local domain (a
/// host named `vm` serving `example.org`). A local address, so the user
/// may send as it and DSNs come back.
pub fn login_domain(cfg: &Config, domains: &Domains) -> String {
    let host = cfg.hostname.to_lowercase();
    if domains.get(&host).is_some() {
        return host;
    }
    domains
        .iter()
        .map(|(d, _)| d.as_str())
        .filter(|d| host.ends_with(&format!(".{d}")))
        .max_by_key(|d| d.len())
        .or_else(|| domains.first())
        .map_or(host.clone(), str::to_string)
}

fn received(user: &str, uid: u32, host: &str, id: &str) -> Vec<u8> {
    format!(
        "Received: from local user {user} (uid {uid})\r\n\tby {host} (tambo) with local id {id};\r\n\t{}\r\n",
        chrono::Local::now().format("%a, %d %b %Y %H:%M:%S %z")
    )
    .into_bytes()
}

pub async fn serve(l: Arc<Listener>, stream: UnixStream) {
    let Ok(_slot) = l.sessions.clone().try_acquire_owned() else {
        if let Some(n) = l.refused.allow() {
            tracing::warn!(
                "local.sock: refusing a connection: too many local sessions{}",
                skipped(n)
            );
        }
        return;
    };
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            tracing::warn!("local.sock: no credentials on a connection: {e}");
            return;
        }
    };
    let Some(_uid_slot) = l.take_uid_slot(uid) else {
        if let Some(n) = l.refused.allow() {
            tracing::warn!(
                "local.sock: refusing a connection: uid {uid} has {MAX_SESSIONS_PER_UID} sessions already{}",
                skipped(n)
            );
        }
        return;
    };
    let (r, mut writer) = stream.into_split();
    let mut reader = FrameReader::new(r);
    let Some(user) = tokio::task::spawn_blocking(move || user_name(uid))
        .await
        .ok()
        .flatten()
    else {
        tracing::warn!("local.sock: uid {uid} has no name in /etc/passwd; refused");
        let r = SubmitReply::Failed {
            reason: format!("uid {uid} has no user name in /etc/passwd"),
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut writer, &r)).await;
        return;
    };
    let domain = login_domain(&l.queue.cfg, &l.queue.domains());
    let login = format!("{}@{domain}", user.to_lowercase());
    tracing::info!("local.sock: a session for {user} (uid {uid}) as {login}");
    let hello = SubmitReply::LocalLogin(login.clone());
    if tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut writer, &hello))
        .await
        .map(|r| r.is_err())
        .unwrap_or(true)
    {
        return;
    }
    let mut s = Session::local(l.queue.clone(), l.auth.clone(), login);
    let result: Result<(), tambo_proto::Error> = async {
        loop {
            let max = if s.in_body() {
                MAX_CHUNK_FRAME
            } else {
                MAX_SMALL_FRAME
            };
            let req = match tokio::time::timeout(IDLE, reader.read(max)).await {
                Err(_) => return Err(tambo_proto::Error::Idle(IDLE)),
                Ok(r) => match r? {
                    Some(req) => req,
                    None => return Ok(()),
                },
            };
            // No Ping: a local client that dawdles is closed after IDLE,
            // whatever it says.
            let req = match req {
                // What smtpd would say of an SMTP client, queued says of a
                // local one: the client's own words reach no hook.
                SubmitRequest::Mail { from, .. } => SubmitRequest::Mail {
                    from,
                    ehlo: "localhost".into(),
                    server_name: l.queue.cfg.hostname.clone(),
                    spf: None,
                },
                r @ (SubmitRequest::Rcpt { .. }
                | SubmitRequest::Rset
                | SubmitRequest::DataBegin
                | SubmitRequest::DataChunk(_)
                | SubmitRequest::DataEnd
                | SubmitRequest::DataAbort) => r,
                _ => {
                    return Err(tambo_proto::Error::Unexpected(
                        "not a local submission request",
                    ));
                }
            };
            let begin = req == SubmitRequest::DataBegin;
            let reply = s.handle(req).await?;
            // The Received header: first in the message, from what queued
            // saw of the connection.
            if begin && reply == Some(SubmitReply::DataReady) {
                let head = received(&user, uid, &l.queue.cfg.hostname, s.body_id().unwrap_or(""));
                s.handle(SubmitRequest::DataChunk(head)).await?;
            }
            if let Some(reply) = reply {
                tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut writer, &reply))
                    .await
                    .map_err(|_| tambo_proto::Error::Io(std::io::ErrorKind::TimedOut.into()))??;
            }
        }
    }
    .await;
    if let Err(e) = result {
        metrics::inc_label(names::IPC_ERRORS, "queued");
        tracing::warn!("local.sock: closing {user}'s session: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use tambo_common::domains::Domain;

    #[test]
    fn a_local_user_is_in_the_hosts_domain() {
        let mut cfg = Config::defaults(Path::new("/etc/tambo"));
        let domains = Domains::from_parts([
            ("example.org".to_string(), Domain::default()),
            ("other.example".to_string(), Domain::default()),
        ]);
        cfg.hostname = "mx.example.org".into();
        assert_eq!(login_domain(&cfg, &domains), "example.org");
        cfg.hostname = "example.org".into();
        assert_eq!(login_domain(&cfg, &domains), "example.org");
        cfg.hostname = "vm".into();
        assert_eq!(login_domain(&cfg, &domains), "example.org");
        cfg.hostname = "vm".into();
        assert_eq!(login_domain(&cfg, &Domains::default()), "vm");
    }

    #[test]
    fn user_names_come_from_passwd() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(user_name(4_000_000_000), None);
    }
}
