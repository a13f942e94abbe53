//! The SMTP dialog: replies at every stage, their classification and
//! texts, addresses, the data, limits.

use tambo_proto::deliver::{Outcome, SecLevel, Target};
use tambo_proto::metrics::names;

use super::*;
use crate::smtp::testserver::{FakeServer, Peer};

#[tokio::test]
async fn forward_with_mixed_recipient_replies() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&["8BITMIME", "SIZE 1000000"]).await;
        let mail = p.expect("MAIL FROM:").await;
        p.send("250 2.1.0 ok").await;
        let mut rcpts = Vec::new();
        for reply in [
            "250 2.1.5 ok",
            "550-5.1.1 no such user\n550 5.1.1 really",
            "451 4.2.0 greylisted",
            "251 2.1.5 will forward",
        ] {
            rcpts.push(p.expect("RCPT TO:").await);
            p.send(reply).await;
        }
        p.expect("DATA").await;
        p.send("354 go on").await;
        let data = p.data().await;
        p.send("250 2.0.0 queued as X").await;
        p.quit().await;
        (mail, rcpts, data)
    })
    .await;
    let port = server.addr.port();
    let r = remote(no_roots(), |c| c.testing.smtp_port = Some(port));
    let mut j = job(&[
        "a@example.net",
        "b@example.net",
        "c@example.net",
        "d@example.net",
    ]);
    j.target = Target::Forward(vec!["127.0.0.1".into()]);
    let (got, seen) = r.deliver(&j, message(b"Subject: x\r\n\r\nhi\r\n")).await;
    assert_eq!(
        got,
        [
            Outcome::Delivered,
            Outcome::PermFail("RCPT TO: 550 5.1.1 no such user 5.1.1 really (127.0.0.1)".into()),
            Outcome::TempFail("RCPT TO: 451 4.2.0 greylisted (127.0.0.1)".into()),
            Outcome::Delivered,
        ]
    );
    assert_eq!(seen, Some(SecLevel::Plain));
    let (mail, rcpts, data) = server.next().await;
    assert_eq!(mail, "MAIL FROM:<ann@example.org> BODY=8BITMIME");
    assert_eq!(rcpts[0], "RCPT TO:<a@example.net>");
    assert_eq!(data, b"Subject: x\r\n\r\nhi\r\n.\r\n");
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_CONNECTIONS, ""), 1);
    assert_eq!(m.get(names::SMTP_OUT_TLS_COUNT, "plain"), 1);
    assert_eq!(m.get(names::SMTP_OUT_SECURITY_LEVEL_CHECKS, "pass"), 1);
}

/// How a server misbehaves at one stage.
#[derive(Clone, Copy, Debug)]
enum At {
    Greeting,
    Ehlo,
    Mail,
    Data,
    End,
}

async fn fail_at(at: At, reply: &'static str) -> Outcome {
    let server = FakeServer::tcp(move |_, mut p: Peer| async move {
        if let At::Greeting = at {
            p.send(reply).await;
            return p.quit().await;
        }
        p.send("220 fake.test").await;
        p.expect("EHLO").await;
        if let At::Ehlo = at {
            p.send(reply).await;
            return p.quit().await;
        }
        p.send("250 fake.test").await;
        p.expect("MAIL").await;
        if let At::Mail = at {
            p.send(reply).await;
            return p.quit().await;
        }
        p.send("250 ok").await;
        p.expect("RCPT").await;
        p.send("250 ok").await;
        p.expect("DATA").await;
        if let At::Data = at {
            p.send(reply).await;
            return p.quit().await;
        }
        p.send("354 go on").await;
        p.data().await;
        p.send(reply).await;
        p.quit().await;
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let (got, _) = deliver_one(&r, b"x\r\n", host("mx.test", server.addr)).await;
    assert_eq!(got.len(), 1);
    got.into_iter().next().unwrap()
}

#[tokio::test]
async fn each_stage_quotes_the_reply_and_classifies_it() {
    let cases = [
        (
            At::Greeting,
            "554 5.3.2 go away",
            false,
            "greeting: 554 5.3.2 go away",
        ),
        (
            At::Greeting,
            "421 4.3.2 busy",
            true,
            "greeting: 421 4.3.2 busy",
        ),
        (At::Ehlo, "421 4.7.0 later", true, "EHLO: 421 4.7.0 later"),
        (
            At::Mail,
            "553 5.7.1 sender refused",
            false,
            "MAIL FROM: 553 5.7.1 sender refused",
        ),
        (
            At::Mail,
            "451 4.3.0 later",
            true,
            "MAIL FROM: 451 4.3.0 later",
        ),
        (
            At::Data,
            "554 5.5.1 no valid recipients",
            false,
            "DATA: 554 5.5.1 no valid recipients",
        ),
        (At::Data, "451 4.3.0 later", true, "DATA: 451 4.3.0 later"),
        (
            At::End,
            "552 5.3.4 too big",
            false,
            "end of DATA: 552 5.3.4 too big",
        ),
        (
            At::End,
            "452 4.3.1 disk full",
            true,
            "end of DATA: 452 4.3.1 disk full",
        ),
    ];
    for (at, reply, temporary, text) in cases {
        let want = format!("{text} (mx.test)");
        let want = if temporary {
            Outcome::TempFail(want)
        } else {
            Outcome::PermFail(want)
        };
        assert_eq!(fail_at(at, reply).await, want, "{at:?} {reply}");
    }
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.send("220 old.test").await;
        p.expect("EHLO tambo.test").await;
        p.send("502 5.5.1 what?").await;
        p.expect("HELO tambo.test").await;
        p.send("250 old.test").await;
        let (mail, _) = p.accept_mail(1).await;
        p.quit().await;
        mail
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let (got, _) = deliver_one(&r, b"x\r\n", host("mx.test", server.addr)).await;
    assert_eq!(got, [Outcome::Delivered]);
    // No extensions after HELO.
    assert_eq!(server.next().await, "MAIL FROM:<ann@example.org>");
}

#[tokio::test]
async fn temporary_recipients_go_on_to_the_next_host_permanent_ones_stop() {
    let mut first = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL").await;
        p.send("250 ok").await;
        for reply in [
            "250 ok",
            "452 4.5.3 too many recipients",
            "550 5.1.1 unknown",
        ] {
            p.expect("RCPT").await;
            p.send(reply).await;
        }
        p.accept_data().await;
        p.quit().await;
    })
    .await;
    let mut second = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL").await;
        p.send("250 ok").await;
        let rcpt = p.expect("RCPT").await;
        p.send("250 ok").await;
        p.accept_data().await;
        p.quit().await;
        rcpt
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let (got, _) = deliver_to(
        &r,
        &job(&["a@example.net", "b@example.net", "c@example.net"]),
        b"x\r\n",
        &dest(None),
        vec![host("mx1.test", first.addr), host("mx2.test", second.addr)],
    )
    .await;
    assert_eq!(
        got,
        [
            Outcome::Delivered,
            Outcome::Delivered,
            Outcome::PermFail("RCPT TO: 550 5.1.1 unknown (mx1.test)".into())
        ]
    );
    first.next().await;
    assert_eq!(second.next().await, "RCPT TO:<b@example.net>");

    // A permanent failure of the whole transaction ends the attempt.
    let first = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL").await;
        p.send("550 5.7.1 you are blocked").await;
        p.quit().await;
    })
    .await;
    let r = remote(no_roots(), |_| {});
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
        [Outcome::PermFail(
            "MAIL FROM: 550 5.7.1 you are blocked (mx1.test)".into()
        )]
    );
    assert_eq!(r.dialer.meter.get(names::SMTP_OUT_CONNECTIONS, ""), 1);
}

#[tokio::test]
async fn all_hosts_temporary_quotes_the_last() {
    let port = closed_port().await;
    let busy = FakeServer::tcp(|_, mut p: Peer| async move {
        p.send("421 4.3.2 busy").await;
        p.closed().await;
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let (got, seen) = deliver_to(
        &r,
        &job(&["a@example.net"]),
        b"x\r\n",
        &dest(None),
        vec![
            host("mx1.test", busy.addr),
            host("mx2.test", ([127, 0, 0, 1], port).into()),
        ],
    )
    .await;
    let Outcome::TempFail(t) = &got[0] else {
        panic!("{got:?}")
    };
    assert!(
        t.starts_with(&format!("connect: 127.0.0.1:{port}: ")),
        "{t}"
    );
    assert!(t.ends_with(" (mx2.test)"), "{t}");
    assert_eq!(seen, None);
}

#[tokio::test]
async fn data_is_dot_stuffed_and_ends_with_crlf() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        let (_, data) = p.accept_mail(1).await;
        p.quit().await;
        data
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let (got, _) = deliver_one(
        &r,
        b"Subject: dots\r\n\r\n.\r\n..two\r\nlast line without end",
        host("mx.test", server.addr),
    )
    .await;
    assert_eq!(got, [Outcome::Delivered]);
    assert_eq!(
        server.next().await,
        b"Subject: dots\r\n\r\n..\r\n...two\r\nlast line without end\r\n.\r\n"
    );
}

/// Runs one delivery of `from` → `to` against a server offering `ext`;
/// returns the outcomes and the MAIL and RCPT lines it saw.
async fn utf8_case(
    ext: &'static [&'static str],
    from: &str,
    to: &[&str],
) -> (Vec<Outcome>, Vec<String>) {
    let mut server = FakeServer::tcp(move |_, mut p: Peer| async move {
        p.open(ext).await;
        let mut lines = Vec::new();
        while let Some(l) = p.line().await {
            if l == "QUIT" {
                p.send("221 bye").await;
                break;
            }
            if l == "DATA" {
                p.send("354 go").await;
                p.data().await;
            }
            lines.push(l);
            p.send("250 ok").await;
        }
        lines
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let mut j = job(to);
    j.from = from.into();
    let (got, _) = deliver_to(
        &r,
        &j,
        b"x\r\n",
        &dest(None),
        vec![host("mx.test", server.addr)],
    )
    .await;
    drop(r);
    (got, server.next().await)
}

#[tokio::test]
async fn non_ascii_addresses() {
    // The server takes SMTPUTF8: everything as is, with the flag.
    let (got, lines) = utf8_case(&["SMTPUTF8"], "añá@example.org", &["bob@ñ.example"]).await;
    assert_eq!(got, [Outcome::Delivered]);
    assert_eq!(lines[0], "MAIL FROM:<añá@example.org> SMTPUTF8");
    assert_eq!(lines[1], "RCPT TO:<bob@ñ.example>");

    // It does not: a non-ASCII domain goes out IDNA-encoded, without the
    // flag; a non-ASCII local part cannot go at all.
    let (got, lines) =
        utf8_case(&[], "ann@example.org", &["bob@ñ.example", "ñu@example.net"]).await;
    assert_eq!(got[0], Outcome::Delivered);
    let Outcome::PermFail(t) = &got[1] else {
        panic!("{got:?}")
    };
    assert!(t.starts_with("RCPT TO: 5.6.7 "), "{t}");
    assert_eq!(lines[0], "MAIL FROM:<ann@example.org>");
    assert_eq!(lines[1], "RCPT TO:<bob@xn--ida.example>");
    assert_eq!(lines[2], "DATA");

    // A sender that cannot go fails every recipient, before MAIL.
    let (got, lines) = utf8_case(&[], "ñu@example.org", &["bob@example.net"]).await;
    let Outcome::PermFail(t) = &got[0] else {
        panic!("{got:?}")
    };
    assert!(t.starts_with("MAIL FROM: 5.6.7 "), "{t}");
    assert!(lines.is_empty(), "{lines:?}");
}

#[tokio::test]
async fn a_domain_that_is_not_one_fails_permanently() {
    let r = remote(no_roots(), |_| {});
    let mut j = job(&["nodomain"]);
    j.security = None;
    let (got, seen) = r.deliver(&j, message(b"x\r\n")).await;
    let Outcome::PermFail(t) = &got[0] else {
        panic!("{got:?}")
    };
    assert!(t.starts_with("5.1.3 "), "{t}");
    assert_eq!(seen, None);
}

#[test]
fn via_entries() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let r = remote(no_roots(), |c| c.testing.smtp_port = Some(2525));
    let h = r.via_host("[2001:db8::1]");
    assert_eq!(h.name, "2001:db8::1");
    assert_eq!(h.addrs.unwrap()[0].to_string(), "[2001:db8::1]:2525");
    let h = r.via_host("192.0.2.7");
    assert_eq!(h.addrs.unwrap()[0].to_string(), "192.0.2.7:2525");
    let h = r.via_host("Relay.Ñ.example.");
    assert_eq!((h.name.as_str(), h.addrs), ("relay.xn--ida.example", None));
}

#[tokio::test]
async fn connections_start_from_the_configured_source_address() {
    let mut server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.accept_mail(1).await;
        p.quit().await;
        p.client.unwrap().ip()
    })
    .await;
    // Loopback is a /8: 127.0.0.2 is ours too. The IPv6 entry is for
    // the other family and must not be used here.
    let r = remote(no_roots(), |c| {
        c.tambo.outgoing_source_address = vec!["::1".parse().unwrap(), "127.0.0.2".parse().unwrap()]
    });
    let (got, _) = deliver_one(&r, b"x\r\n", host("mx.test", server.addr)).await;
    assert_eq!(got, [Outcome::Delivered]);
    assert_eq!(server.next().await.to_string(), "127.0.0.2");
}

#[tokio::test]
async fn a_connection_lost_in_the_data_keeps_earlier_refusals() {
    let server = FakeServer::tcp(|_, mut p: Peer| async move {
        p.open(&[]).await;
        p.expect("MAIL").await;
        p.send("250 ok").await;
        p.expect("RCPT").await;
        p.send("250 ok").await;
        p.expect("RCPT").await;
        p.send("550 5.1.1 unknown").await;
        p.expect("DATA").await;
        p.send("354 go on").await;
        p.data().await;
        // Gone before the final reply.
    })
    .await;
    let r = remote(no_roots(), |_| {});
    let (got, seen) = deliver_to(
        &r,
        &job(&["a@example.net", "b@example.net"]),
        b"x\r\n",
        &dest(None),
        vec![host("mx.test", server.addr)],
    )
    .await;
    assert_eq!(
        got,
        [
            Outcome::TempFail(
                "end of DATA: connection lost after the message was sent (connection closed by the server); will retry (mx.test)"
                    .into()
            ),
            Outcome::PermFail("RCPT TO: 550 5.1.1 unknown (mx.test)".into()),
        ]
    );
    // The session passed its checks before it broke.
    assert_eq!(seen, Some(SecLevel::Plain));
}
