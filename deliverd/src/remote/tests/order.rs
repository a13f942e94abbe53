//! The order hosts are tried in, and when the next one is not tried.

use std::time::Duration;

use tambo_proto::deliver::Outcome;
use tambo_proto::metrics::names;

use super::*;
use crate::smtp::testserver::{FakeServer, Peer};

/// Takes every message offered (any number of transactions on one
/// connection); returns the recipients it got, connection by connection.
async fn mx() -> FakeServer<Vec<String>> {
    FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        let mut got = Vec::new();
        loop {
            match p.line().await.as_deref() {
                Some(l) if l.starts_with("MAIL FROM:") => p.send("250 ok").await,
                Some(l) if l.starts_with("RCPT TO:") => {
                    got.push(l["RCPT TO:".len()..].to_string());
                    p.send("250 ok").await;
                }
                Some("DATA") => {
                    p.send("354 go on").await;
                    p.data().await;
                    p.send("250 2.0.0 queued").await;
                }
                Some("QUIT") => {
                    p.send("221 bye").await;
                    p.closed().await;
                    return got;
                }
                None => return got,
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_cached_connection_to_a_backup_does_not_jump_the_queue() {
    let mut primary = mx().await;
    let mut backup = mx().await;
    let r = remote(no_roots(), |c| {
        c.tambo.smtp_connection_cache_time = Duration::from_secs(60)
    });
    // As after an outage of the primary: the backup took a message and
    // its connection is kept.
    let (got, _) = deliver_one(&r, b"x\r\n", host("backup.test", backup.addr)).await;
    assert_eq!(got, [Outcome::Delivered]);
    assert_eq!(r.pool.hosts("mx example.net", |_| true), ["backup.test"]);

    // Both up: the primary comes first, cached connection or not.
    let (got, _) = deliver_to(
        &r,
        &job(&["b@example.net"]),
        b"x\r\n",
        &dest(None),
        vec![
            host("primary.test", primary.addr),
            host("backup.test", backup.addr),
        ],
    )
    .await;
    assert_eq!(got, [Outcome::Delivered]);
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_REUSED, ""), 0);
    assert_eq!(m.get(names::SMTP_OUT_CONNECTIONS, ""), 2);
    let mut cached = r.pool.hosts("mx example.net", |_| true);
    cached.sort();
    assert_eq!(cached, ["backup.test", "primary.test"]);
    drop(r);
    assert_eq!(primary.next().await, ["<b@example.net>"]);
    assert_eq!(backup.next().await, ["<a@example.net>"]);
}

#[tokio::test]
async fn a_cached_connection_is_used_when_its_host_is_next() {
    let port = closed_port().await;
    let mut backup = mx().await;
    let r = remote(no_roots(), |c| {
        c.tambo.smtp_connection_cache_time = Duration::from_secs(60)
    });
    let hosts = || {
        vec![
            host("primary.test", ([127, 0, 0, 1], port).into()),
            host("backup.test", backup.addr),
        ]
    };
    for to in ["a@example.net", "b@example.net"] {
        let (got, _) = deliver_to(&r, &job(&[to]), b"x\r\n", &dest(None), hosts()).await;
        assert_eq!(got, [Outcome::Delivered]);
    }
    // The primary was tried each time (and refused); then the backup's
    // one connection took both.
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_REUSED, ""), 1);
    assert_eq!(m.get(names::SMTP_OUT_CONNECTIONS, ""), 1);
    drop(r);
    assert_eq!(backup.next().await, ["<a@example.net>", "<b@example.net>"]);
}

#[tokio::test]
async fn no_other_host_once_the_message_was_sent() {
    // Takes the whole message for a, refuses b for now, and is gone
    // before its answer to the final dot: it may have taken the message.
    let mut first = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL").await;
        p.send("250 ok").await;
        p.expect("RCPT TO:<a@").await;
        p.send("250 ok").await;
        p.expect("RCPT TO:<b@").await;
        p.send("451 4.7.1 greylisted").await;
        p.expect("DATA").await;
        p.send("354 go on").await;
        p.data().await;
    })
    .await;
    let mut second = mx().await;
    let r = remote(no_roots(), |_| {});
    let (got, _) = deliver_to(
        &r,
        &job(&["a@example.net", "b@example.net"]),
        b"x\r\n",
        &dest(None),
        vec![host("mx1.test", first.addr), host("mx2.test", second.addr)],
    )
    .await;
    assert_eq!(
        got,
        [
            Outcome::TempFail(
                "end of DATA: connection lost after the message was sent (connection closed by the server); will retry (mx1.test)"
                    .into()
            ),
            Outcome::Delivered,
        ]
    );
    first.next().await;
    // b, which mx1 never took, still went on; a did not.
    assert_eq!(second.next().await, ["<b@example.net>"]);
}

#[tokio::test]
async fn no_other_host_after_a_timeout_at_the_final_dot() {
    let mut first = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL").await;
        p.send("250 ok").await;
        p.expect("RCPT").await;
        p.send("250 ok").await;
        p.expect("DATA").await;
        p.send("354 go on").await;
        p.data().await;
        // No answer to the final dot; the client must give up and close.
        p.closed().await;
    })
    .await;
    let second = mx().await;
    // Short, but long enough for the dialog up to the dot on a busy
    // machine.
    let r = remote(no_roots(), |c| {
        c.testing.smtp_out_timeout = Some(Duration::from_secs(1))
    });
    let (got, _) = deliver_to(
        &r,
        &job(&["a@example.net"]),
        b"x\r\n",
        &dest(None),
        vec![host("mx1.test", first.addr), host("mx2.test", second.addr)],
    )
    .await;
    assert_eq!(
        got,
        [Outcome::TempFail(
            "end of DATA: connection lost after the message was sent (timed out); will retry (mx1.test)"
                .into()
        )]
    );
    first.next().await;
    assert_eq!(r.dialer.meter.get(names::SMTP_OUT_CONNECTIONS, ""), 1);
}
