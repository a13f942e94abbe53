//! STARTTLS, the certificate verdict, the plain retry, the domaininfo and
//! MTA-STS checks.

use tambo_proto::deliver::{Outcome, SecLevel};
use tambo_proto::metrics::names;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::smtp::testserver::{FakeServer, Peer, pki};

/// What a TLS server saw after the handshake and its second EHLO.
#[derive(Debug, PartialEq, Eq)]
enum Saw {
    Mail,
    Quit,
}

/// Offers STARTTLS, hands out `acceptor`'s certificate, then takes the
/// mail or the QUIT that follows.
async fn tls_server(acceptor: TlsAcceptor) -> FakeServer<Saw> {
    FakeServer::tcp(move |_, mut p: Peer| {
        let acceptor = acceptor.clone();
        async move {
            p.open(&["STARTTLS", "8BITMIME"]).await;
            p.expect("STARTTLS").await;
            p.send("220 2.0.0 ready").await;
            let mut p = p.starttls(&acceptor).await.expect("handshake");
            p.expect("EHLO tambo.test").await;
            p.ehlo_reply(&["8BITMIME"]).await;
            match p.line().await.as_deref() {
                Some("QUIT") => {
                    p.send("221 bye").await;
                    p.closed().await;
                    Saw::Quit
                }
                Some(l) if l.starts_with("MAIL FROM:") => {
                    p.send("250 ok").await;
                    p.expect("RCPT").await;
                    p.send("250 ok").await;
                    p.accept_data().await;
                    p.quit().await;
                    Saw::Mail
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
}

/// One delivery to `mx.test` at `server` with `recorded` as the
/// domain's level, under an MTA-STS policy in `sts` mode if any.
async fn attempt(
    r: &Remote,
    server: &FakeServer<Saw>,
    recorded: SecLevel,
    sts: Option<Mode>,
) -> (Vec<Outcome>, Option<SecLevel>) {
    let mut j = job(&["a@example.net"]);
    j.security = Some(("example.net".into(), recorded));
    deliver_to(
        r,
        &j,
        b"x\r\n",
        &dest(sts),
        vec![host("mx.test", server.addr)],
    )
    .await
}

#[tokio::test]
async fn a_certificate_from_the_roots_is_tls_secure() {
    let p = pki();
    let mut server = tls_server(p.ca_signed.clone()).await;
    let r = remote(p.roots.clone(), |_| {});
    let got = attempt(&r, &server, SecLevel::TlsInsecure, None).await;
    assert_eq!(got, (vec![Outcome::Delivered], Some(SecLevel::TlsSecure)));
    assert_eq!(server.next().await, Saw::Mail);
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_TLS_COUNT, "tls:secure"), 1);
    assert_eq!(m.get(names::SMTP_OUT_SECURITY_LEVEL_CHECKS, "pass"), 1);
}

#[tokio::test]
async fn a_self_signed_certificate_is_tls_insecure_and_still_used() {
    let p = pki();
    let mut server = tls_server(p.self_signed.clone()).await;
    let r = remote(p.roots.clone(), |_| {});
    let got = attempt(&r, &server, SecLevel::Plain, None).await;
    assert_eq!(got, (vec![Outcome::Delivered], Some(SecLevel::TlsInsecure)));
    assert_eq!(server.next().await, Saw::Mail);
    assert_eq!(
        r.dialer
            .meter
            .get(names::SMTP_OUT_TLS_COUNT, "tls:insecure"),
        1
    );
}

#[tokio::test]
async fn a_level_below_the_recorded_one_fails_temporarily() {
    let p = pki();
    let mut server = tls_server(p.self_signed.clone()).await;
    let r = remote(p.roots.clone(), |_| {});
    let got = attempt(&r, &server, SecLevel::TlsSecure, None).await;
    assert_eq!(
        got,
        (
            vec![Outcome::TempFail(
                "security level check failed: the connection is TLS_INSECURE, and TLS_SECURE is recorded for example.net (mx.test)"
                    .into()
            )],
            None
        )
    );
    assert_eq!(server.next().await, Saw::Quit, "no mail over it");
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_SECURITY_LEVEL_CHECKS, "fail"), 1);
    assert_eq!(m.get(names::SMTP_OUT_SECURITY_LEVEL_CHECKS, "pass"), 0);
}

#[tokio::test]
async fn sts_enforce_demands_tls_secure() {
    let p = pki();
    let mut server = tls_server(p.self_signed.clone()).await;
    let r = remote(p.roots.clone(), |_| {});
    let got = attempt(&r, &server, SecLevel::Plain, Some(Mode::Enforce)).await;
    assert_eq!(
        got,
        (
            vec![Outcome::TempFail(
                "the MTA-STS policy of example.net requires TLS with a valid certificate, and the connection is TLS_INSECURE (mx.test)"
                    .into()
            )],
            None
        )
    );
    assert_eq!(server.next().await, Saw::Quit);
    assert_eq!(r.dialer.meter.get(names::SMTP_OUT_STS_SECURITY, "fail"), 1);

    // `testing` only counts.
    let got = attempt(&r, &server, SecLevel::Plain, Some(Mode::Testing)).await;
    assert_eq!(got.0, [Outcome::Delivered]);
    assert_eq!(server.next().await, Saw::Mail);

    let mut server = tls_server(p.ca_signed.clone()).await;
    let got = attempt(&r, &server, SecLevel::Plain, Some(Mode::Enforce)).await;
    assert_eq!(got, (vec![Outcome::Delivered], Some(SecLevel::TlsSecure)));
    assert_eq!(server.next().await, Saw::Mail);
    assert_eq!(r.dialer.meter.get(names::SMTP_OUT_STS_SECURITY, "pass"), 1);
}

/// STARTTLS fails on the first connection in the way `fail` plays it;
/// the second connection must go without TLS.
async fn plain_retry(fail: fn(Peer) -> tokio::task::JoinHandle<()>) {
    let p = pki();
    let mut server = FakeServer::tcp(move |n, mut peer: Peer| async move {
        peer.open(&["STARTTLS"]).await;
        if n == 0 {
            peer.expect("STARTTLS").await;
            fail(peer).await.unwrap();
            return None;
        }
        // No STARTTLS this time, though offered.
        peer.accept_mail(1).await;
        peer.quit().await;
        Some(n)
    })
    .await;
    let r = remote(p.roots.clone(), |_| {});
    let got = deliver_one(&r, b"x\r\n", host("mx.test", server.addr)).await;
    assert_eq!(got, (vec![Outcome::Delivered], Some(SecLevel::Plain)));
    let mut done = vec![server.next().await, server.next().await];
    done.sort();
    assert_eq!(done, [None, Some(1)]);
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_TLS_COUNT, "tls:failed"), 1);
    assert_eq!(m.get(names::SMTP_OUT_TLS_COUNT, "plain"), 1);
    assert_eq!(m.get(names::SMTP_OUT_CONNECTIONS, ""), 2);
}

#[tokio::test]
async fn starttls_refused_retries_in_plain() {
    plain_retry(|mut p| {
        tokio::spawn(async move {
            p.send("454 4.7.0 TLS not available").await;
            p.closed().await;
        })
    })
    .await;
}

#[tokio::test]
async fn a_failed_handshake_retries_in_plain() {
    plain_retry(|mut p| {
        tokio::spawn(async move {
            p.send("220 go ahead").await;
            let _ = p.try_send_raw(b"this is not a TLS record\r\n").await;
            p.closed().await;
        })
    })
    .await;
}

#[tokio::test]
async fn no_mx_matching_an_enforced_policy_fails_after_a_refetch() {
    let fake = Arc::new(Fake::new());
    let r = remote_scripted(no_roots(), fake.clone());
    let elsewhere = "version: STSv1\nmode: enforce\nmx: mx.elsewhere.example\nmax_age: 3600\n";
    fake.set("example.net", Ok(elsewhere));
    let policy = r.sts.policy("example.net").await;
    assert_eq!(fake.calls().len(), 1);
    let hosts = vec!["mx1.example.net".to_string(), "mx2.example.net".to_string()];
    // No MX matches: the policy is fetched again before giving up; the
    // same policy comes back, and the failure says why.
    let got = r.apply_sts("example.net", hosts.clone(), policy).await;
    assert_eq!(
        got.unwrap_err(),
        crate::smtp::Failure::Temporary(
            "no MX matches the MTA-STS policy of example.net (MX: mx1.example.net, mx2.example.net; policy: mx.elsewhere.example)"
                .into()
        )
    );
    assert_eq!(fake.calls().len(), 2, "refetched");
    // `testing` and no policy only count; nothing is fetched for them.
    let testing = Arc::new(Policy {
        mode: Mode::Testing,
        max_age: Duration::from_secs(3600),
        mx: vec!["mx.elsewhere.example".into()],
    });
    let (kept, _) = r
        .apply_sts("example.net", hosts.clone(), Some(testing))
        .await
        .unwrap();
    assert_eq!(kept, hosts);
    let (kept, none) = r
        .apply_sts("example.net", hosts.clone(), None)
        .await
        .unwrap();
    assert_eq!((kept, none), (hosts, None));
    assert_eq!(fake.calls().len(), 2);
    let m = &r.dialer.meter;
    assert_eq!(m.get(names::SMTP_OUT_STS_MODE, "enforce"), 1);
    assert_eq!(m.get(names::SMTP_OUT_STS_MODE, "testing"), 1);
}

#[tokio::test]
async fn a_policy_changed_since_is_applied_after_the_refetch() {
    let p = pki();
    let mut server = tls_server(p.ca_signed.clone()).await;
    let fake = Arc::new(Fake::new());
    let r = remote_scripted(p.roots.clone(), fake.clone());
    // The cached policy predates the domain's move to mx.test.
    fake.set(
        "example.net",
        Ok("version: STSv1\nmode: enforce\nmx: mx.old.example\nmax_age: 3600\n"),
    );
    let cached = r.sts.policy("example.net").await;
    fake.set(
        "example.net",
        Ok("version: STSv1\nmode: enforce\nmx: mx.test\nmax_age: 3600\n"),
    );
    // As deliver_mx does after the MX lookup.
    let (names, policy) = r
        .apply_sts("example.net", vec!["mx.test".into()], cached)
        .await
        .unwrap();
    assert_eq!(fake.calls().len(), 2, "refetched");
    assert_eq!(names, ["mx.test"]);
    let policy = policy.unwrap();
    assert_eq!(policy.mx, ["mx.test"], "the new policy applies");
    let dest = Dest {
        key: "mx example.net".into(),
        domain: "example.net".into(),
        policy: Some(policy),
    };
    let got = deliver_to(
        &r,
        &job(&["a@example.net"]),
        b"x\r\n",
        &dest,
        vec![host("mx.test", server.addr)],
    )
    .await;
    assert_eq!(got, (vec![Outcome::Delivered], Some(SecLevel::TlsSecure)));
    assert_eq!(server.next().await, Saw::Mail);
    assert_eq!(r.dialer.meter.get(names::SMTP_OUT_STS_SECURITY, "pass"), 1);
}
