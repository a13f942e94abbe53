//! What a server can make deliverd read, and wait for.

use std::time::Duration;

use tambo_proto::deliver::Outcome;

use super::*;
use crate::smtp::testserver::{FakeServer, Peer};

/// Sends `chunk` `times` times, or until the client is gone; then
/// whether the client said anything more (it must not: a connection out
/// of step gets no QUIT).
async fn flood(p: &mut Peer, chunk: &str, times: usize) -> Option<String> {
    for _ in 0..times {
        if p.try_send_raw(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    p.line().await
}

#[tokio::test]
async fn one_reply_is_capped_at_64_kib() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.send("220 fake.test").await;
        p.expect("EHLO").await;
        // An EHLO reply that never ends: the client stops at 64 KiB,
        // far below the 2 MiB it may read on the connection.
        let line = format!("250-{}\r\n", "x".repeat(1000));
        flood(&mut p, &line.repeat(16), 50).await
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let (got, _) = deliver_one(&r, b"x\r\n", host("mx.test", server.addr)).await;
    assert_eq!(
        got,
        [Outcome::TempFail(
            "EHLO: a reply longer than 65536 bytes (mx.test)".into()
        )]
    );
    assert_eq!(server.next().await, None, "dropped, not QUIT");
}

#[tokio::test]
async fn replies_are_capped_per_connection() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL").await;
        p.send("250 ok").await;
        // Replies of 50 KiB each, every one within the per-reply cap:
        // the 42nd takes the connection past 2 MiB.
        let mut big = format!("250-{}\r\n", "x".repeat(1020)).repeat(49);
        big.push_str("250 ok\r\n");
        for _ in 0..45 {
            p.line().await?;
            if p.try_send_raw(big.as_bytes()).await.is_err() {
                return None;
            }
        }
        p.line().await
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let to: Vec<String> = (0..45).map(|i| format!("u{i}@example.net")).collect();
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    let (got, _) = deliver_to(
        &r,
        &job(&to),
        b"x\r\n",
        &dest(None),
        vec![host("mx.test", server.addr)],
    )
    .await;
    let want = Outcome::TempFail(
        "RCPT TO: the server sent more than 2097152 bytes of replies on this connection (mx.test)"
            .into(),
    );
    assert!(got.iter().all(|o| *o == want), "{got:?}");
    assert_eq!(server.next().await, None, "dropped, not QUIT");
}

#[tokio::test]
async fn a_server_that_stops_answering_times_out() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL").await;
        // No reply; the client must give up and close.
        p.closed().await;
    })
    .await;
    // Short, but long enough for the dialog up to MAIL on a busy machine.
    let r = remote(no_roots(), |c| {
        c.testing.smtp_out_timeout = Some(Duration::from_secs(1))
    });
    let (got, _) = deliver_one(&r, b"x\r\n", host("mx.test", server.addr)).await;
    assert_eq!(
        got,
        [Outcome::TempFail("MAIL FROM: timed out (mx.test)".into())]
    );
    server.next().await;
}
