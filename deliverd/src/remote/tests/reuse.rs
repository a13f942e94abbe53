//! Connections kept for the next job to the same destination.

use std::time::Duration;

use tambo_proto::deliver::{Outcome, SecLevel};
use tambo_proto::metrics::names;

use super::*;
use crate::smtp::testserver::{FakeServer, Peer};

fn keep(secs: u64) -> impl FnOnce(&mut Config) {
    move |c| c.tambo.smtp_connection_cache_time = Duration::from_secs(secs)
}

async fn send<T>(r: &Remote, server: &FakeServer<T>, to: &str) -> Vec<Outcome> {
    deliver_to(
        r,
        &job(&[to]),
        b"x\r\n",
        &dest(None),
        vec![host("mx.test", server.addr)],
    )
    .await
    .0
}

#[tokio::test]
async fn the_next_job_reuses_the_connection() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        let mut mails = Vec::new();
        for _ in 0..2 {
            mails.push(p.accept_mail(1).await.0);
        }
        p.quit().await;
        mails
    })
    .await;
    let r = remote(no_roots(), keep(60));
    assert_eq!(
        send(&r, &server, "a@example.net").await,
        [Outcome::Delivered]
    );
    assert_eq!(
        send(&r, &server, "b@example.net").await,
        [Outcome::Delivered]
    );
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_CONNECTIONS, ""), 1);
    assert_eq!(m.get(names::SMTP_OUT_REUSED, ""), 1);
    // The check runs again for the second job.
    assert_eq!(m.get(names::SMTP_OUT_SECURITY_LEVEL_CHECKS, "pass"), 2);
    drop(r);
    assert_eq!(server.next().await.len(), 2, "both over one connection");
}

#[tokio::test]
async fn a_dead_cached_connection_is_replaced_without_a_failure() {
    let mut server = FakeServer::tcp(|n, mut p: Peer| async move {
        p.open(&[]).await;
        let (mail, _) = p.accept_mail(1).await;
        if n == 1 {
            p.quit().await;
        }
        // Connection 0 closes here, while the client keeps it idle.
        vec![mail]
    })
    .await;
    let r = remote(no_roots(), keep(60));
    assert_eq!(
        send(&r, &server, "a@example.net").await,
        [Outcome::Delivered]
    );
    server.next().await;
    assert_eq!(
        send(&r, &server, "b@example.net").await,
        [Outcome::Delivered]
    );
    // Found closed before any command: no reuse.
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_REUSED, ""), 0);
    assert_eq!(m.get(names::SMTP_OUT_CONNECTIONS, ""), 2);
}

/// How the server treats the second job's MAIL on the kept connection.
#[derive(Clone, Copy, Debug)]
enum Stale {
    /// Reads it, never answers.
    Silent,
    /// A 4xx: a limit on messages per connection, say.
    Refuses,
}

/// Two jobs to one host; connection 0 is kept after the first, and the
/// second job's MAIL on it goes as `stale` says. The second job must be
/// delivered on a new connection, without waiting the session time.
async fn stale_cached_connection(stale: Stale) {
    let mut server = FakeServer::tcp(move |n, mut p: Peer| async move {
        p.open(&[]).await;
        let (mail, _) = p.accept_mail(1).await;
        if n == 0 {
            p.expect("MAIL FROM:").await;
            match stale {
                Stale::Silent => p.closed().await,
                Stale::Refuses => {
                    p.send("452 4.5.3 too many messages on this connection")
                        .await;
                    p.quit().await;
                }
            }
        } else {
            p.quit().await;
        }
        vec![mail]
    })
    .await;
    let mut r = remote(no_roots(), keep(60));
    // The session time is 20 s (the tests' smtp_out_timeout).
    r.remote.dialer.timeouts.reuse = Duration::from_millis(300);
    assert_eq!(
        send(&r, &server, "a@example.net").await,
        [Outcome::Delivered]
    );
    let start = tokio::time::Instant::now();
    assert_eq!(
        send(&r, &server, "b@example.net").await,
        [Outcome::Delivered],
        "{stale:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(10), "{stale:?}");
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_CONNECTIONS, ""), 2, "{stale:?}");
    assert_eq!(m.get(names::SMTP_OUT_REUSED, ""), 0, "{stale:?}");
    // Connection 1 is kept in turn; dropping the pool closes it.
    drop(r);
    server.next().await;
    server.next().await;
}

#[tokio::test]
async fn a_cached_connection_that_stops_answering_costs_only_the_reuse_wait() {
    stale_cached_connection(Stale::Silent).await;
}

#[tokio::test]
async fn a_4xx_to_mail_on_a_cached_connection_opens_a_new_one() {
    stale_cached_connection(Stale::Refuses).await;
}

#[tokio::test]
async fn a_connection_with_bytes_after_its_last_reply_is_not_kept() {
    let mut server = FakeServer::tcp(|n, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL FROM:").await;
        p.send("250 ok").await;
        p.expect("RCPT TO:").await;
        p.send("250 ok").await;
        p.expect("DATA").await;
        p.send("354 go on").await;
        p.data().await;
        if n == 0 {
            // One write: the client reads both lines at once.
            p.send("250 2.0.0 queued\n250 2.0.0 and this too").await;
            // Out of step: closed without a QUIT.
            p.line().await
        } else {
            p.send("250 2.0.0 queued").await;
            p.quit().await;
            None
        }
    })
    .await;
    let r = remote(no_roots(), keep(60));
    assert_eq!(
        send(&r, &server, "a@example.net").await,
        [Outcome::Delivered]
    );
    assert!(r.pool.hosts("mx example.net", |_| true).is_empty());
    assert_eq!(server.next().await, None);
    assert_eq!(
        send(&r, &server, "b@example.net").await,
        [Outcome::Delivered]
    );
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_CONNECTIONS, ""), 2);
    assert_eq!(m.get(names::SMTP_OUT_REUSED, ""), 0);
}

#[tokio::test]
async fn idle_connections_get_quit_when_their_time_is_up() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.accept_mail(1).await;
        // The client says QUIT by itself, with no job asking.
        p.expect("QUIT").await;
        p.send("221 bye").await;
        p.closed().await;
        Vec::<String>::new()
    })
    .await;
    let r = remote(no_roots(), |c| {
        c.tambo.smtp_connection_cache_time = Duration::from_millis(50)
    });
    assert_eq!(
        send(&r, &server, "a@example.net").await,
        [Outcome::Delivered]
    );
    server.next().await;
    assert!(r.pool.hosts("mx example.net", |_| true).is_empty());
}

#[tokio::test]
async fn a_cached_connection_below_the_recorded_level_is_not_taken() {
    let mut server = FakeServer::tcp(|n, mut p: Peer| async move {
        p.open(&[]).await;
        if n == 0 {
            p.accept_mail(1).await;
        }
        // Connection 1 is refused by the check; the cached 0 stays idle.
        p.quit().await;
        Vec::<String>::new()
    })
    .await;
    let r = remote(no_roots(), keep(60));
    assert_eq!(
        send(&r, &server, "a@example.net").await,
        [Outcome::Delivered]
    );
    let mut j = job(&["b@example.net"]);
    j.security = Some(("example.net".into(), SecLevel::TlsInsecure));
    let (got, _) = deliver_to(
        &r,
        &j,
        b"x\r\n",
        &dest(None),
        vec![host("mx.test", server.addr)],
    )
    .await;
    let Outcome::TempFail(t) = &got[0] else {
        panic!("{got:?}")
    };
    assert!(t.starts_with("security level check failed"), "{t}");
    assert_eq!(r.dialer.meter.get(names::SMTP_OUT_REUSED, ""), 0);
    assert_eq!(r.pool.hosts("mx example.net", |_| true), ["mx.test"]);
    server.next().await;
}
