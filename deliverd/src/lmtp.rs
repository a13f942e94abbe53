//! Native LMTP delivery (RFC 2033, REFERENCE §4.3): every recipient of a
//! local job in one transaction, with one reply per accepted recipient
//! after the data.
//!
//! 4xx and connection errors are temporary, 5xx permanent (chasquid's
//! mda-lmtp made 5xx temporary too). Timeouts: 30 s to connect (the
//! server is local), 10 minutes for the whole session and for any one
//! wait, as for SMTP; `[testing] smtp_out_timeout` replaces both.

use std::fs::File;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use tambo_common::config::Config;
use tambo_proto::deliver::{Job, Outcome};
use tambo_proto::metrics::{self, names};

use crate::smtp::client::{greeting, hello, transaction};
use crate::smtp::{Conn, Failure, Protocol, Stage, Stream, Transaction};

/// Connecting to the LMTP server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A whole session, and any one wait within it.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Delivers a Local job to the LMTP server at `address` (a Unix socket
/// path starting with `/`, or host:port): one outcome per recipient.
pub async fn deliver(cfg: &Config, address: &str, job: &Job, message: File) -> Vec<Outcome> {
    // The failure texts reach DSNs, possibly to outside senders: they say
    // "LMTP", not where the server is (deliverd's log says that).
    let label = "LMTP";
    let all = |f: Failure| vec![f.into_outcome(); job.to.len()];
    let limit = cfg.testing.smtp_out_timeout.unwrap_or(SESSION_TIMEOUT);
    let deadline = Instant::now() + limit;
    let until = deadline.min(Instant::now() + CONNECT_TIMEOUT.min(limit));
    let stream = match tokio::time::timeout_at(until, connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(id = %job.queue_id, "cannot connect to the LMTP server {address}: {e}");
            return all(Failure::temporary(format!(
                "{}: {e} ({label})",
                Stage::Connect
            )));
        }
        Err(_) => {
            return all(Failure::temporary(format!(
                "{}: timed out ({label})",
                Stage::Connect
            )));
        }
    };
    metrics::inc(names::SMTP_OUT_CONNECTIONS);
    let mut conn = Conn::new(stream, deadline, limit);
    if let Err(f) = greeting(&mut conn, label).await {
        return all(f);
    }
    let name = idna::domain_to_ascii(&cfg.hostname).unwrap_or_else(|_| cfg.hostname.clone());
    let ext = match hello(&mut conn, Protocol::Lmtp, &name, label).await {
        Ok(ext) => ext,
        Err(f) => return all(f),
    };
    let mut message = tokio::fs::File::from_std(message);
    let tx = transaction(
        &mut conn,
        ext,
        Protocol::Lmtp,
        &job.from,
        &job.to,
        &mut message,
        label,
    )
    .await;
    tokio::spawn(conn.quit());
    match tx {
        Transaction::Whole { failure, .. } => all(failure),
        Transaction::Each { results, .. } => results
            .into_iter()
            .map(|r| r.map_or_else(Failure::into_outcome, |()| Outcome::Delivered))
            .collect(),
    }
}

async fn connect(address: &str) -> std::io::Result<Stream> {
    if address.starts_with('/') {
        Ok(Stream::Unix(UnixStream::connect(address).await?))
    } else {
        Ok(Stream::Tcp(TcpStream::connect(address).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    use tambo_proto::deliver::Target;

    use crate::smtp::testserver::{FakeServer, Peer};

    fn job(to: &[&str]) -> Job {
        Job {
            job: 1,
            queue_id: "q1".into(),
            from: "ann@example.org".into(),
            to: to.iter().map(|s| s.to_string()).collect(),
            target: Target::Local,
            security: None,
            maybe_delivered: false,
            positions: Vec::new(),
        }
    }

    fn message(text: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(text).unwrap();
        f
    }

    fn config() -> Config {
        let mut cfg = Config::defaults(Path::new("/nonexistent"));
        cfg.hostname = "tambo.test".into();
        cfg.testing.smtp_out_timeout = Some(Duration::from_secs(20));
        cfg
    }

    #[tokio::test]
    async fn one_reply_per_accepted_recipient() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lmtp.sock");
        let mut server = FakeServer::unix(&path, |_, mut p: Peer| async move {
            p.send("220 lmtp.test LMTP").await;
            let lhlo = p.expect("LHLO ").await;
            p.send("250-lmtp.test\n250-8BITMIME\n250 PIPELINING").await;
            let mail = p.expect("MAIL FROM:").await;
            p.send("250 2.1.0 ok").await;
            let mut rcpts = Vec::new();
            for reply in [
                "250 2.1.5 ok",
                "250 2.1.5 ok",
                "550 5.1.1 no such user",
                "250 2.1.5 ok",
            ] {
                rcpts.push(p.expect("RCPT TO:").await);
                p.send(reply).await;
            }
            p.expect("DATA").await;
            p.send("354 go on").await;
            let data = p.data().await;
            // One reply per accepted recipient, in RCPT order.
            p.send("250 2.0.0 delivered\n452 4.2.2 mailbox full\n550 5.2.1 disabled")
                .await;
            p.quit().await;
            (lhlo, mail, rcpts, data)
        })
        .await;
        let to = [
            "a@example.org",
            "b@example.org",
            "c@example.org",
            "d@example.org",
        ];
        let got = deliver(
            &config(),
            path.to_str().unwrap(),
            &job(&to),
            message(b"Subject: hi\r\n\r\n.x\r\n"),
        )
        .await;
        let label = "LMTP";
        assert_eq!(
            got,
            [
                Outcome::Delivered,
                Outcome::TempFail(format!("end of DATA: 452 4.2.2 mailbox full ({label})")),
                Outcome::PermFail(format!("RCPT TO: 550 5.1.1 no such user ({label})")),
                Outcome::PermFail(format!("end of DATA: 550 5.2.1 disabled ({label})")),
            ]
        );
        let (lhlo, mail, rcpts, data) = server.next().await;
        assert_eq!(lhlo, "LHLO tambo.test");
        assert_eq!(mail, "MAIL FROM:<ann@example.org> BODY=8BITMIME");
        assert_eq!(rcpts[3], "RCPT TO:<d@example.org>");
        assert_eq!(data, b"Subject: hi\r\n\r\n..x\r\n.\r\n");
    }

    #[tokio::test]
    async fn no_server_is_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let got = deliver(
            &config(),
            path.to_str().unwrap(),
            &job(&["a@example.org", "b@example.org"]),
            message(b"x\r\n"),
        )
        .await;
        assert_eq!(got.len(), 2);
        let Outcome::TempFail(t) = &got[0] else {
            panic!("{got:?}")
        };
        assert!(t.starts_with("connect: "), "{t}");
    }

    #[tokio::test]
    async fn tcp_and_a_refused_sender() {
        let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
            p.send("220 lmtp.test LMTP").await;
            p.expect("LHLO ").await;
            p.send("250 lmtp.test").await;
            p.expect("MAIL FROM:<>").await;
            p.send("451 4.3.0 try later").await;
            p.quit().await;
        })
        .await;
        let mut j = job(&["a@example.org"]);
        j.from = String::new();
        let addr = server.addr.to_string();
        let got = deliver(&config(), &addr, &j, message(b"x\r\n")).await;
        assert_eq!(
            got,
            [Outcome::TempFail(
                "MAIL FROM: 451 4.3.0 try later (LMTP)".into()
            )]
        );
        server.next().await;
    }
}
