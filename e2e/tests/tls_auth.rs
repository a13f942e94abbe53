//! TLS with the keys in queued, STARTTLS and port 465, and AUTH checked by
//! queued: real handshakes (rustls clients that verify every signature),
//! relay only after AUTH, the sender bound to the login, and the attacks:
//! STARTTLS command injection, password guessing, a compromised smtpd
//! skipping AUTH. The keys themselves: tls_keys.rs.

use tambo_e2e::tls::{TlsSmtp, Versions, b64, hash, plain};
use tambo_e2e::*;
use tambo_proto::submit::{AuthVerdict, Mode, RcptVerdict, SubmitReply, SubmitRequest};
use tambo_proto::{Role, hello};

const PASSWORD: &str = "correct horse battery staple";

/// A tambo whose users have known passwords: ann and bob can log in,
/// carol only receives.
fn setup() -> Tambo {
    let t = Tambo::default_setup();
    let users = t.config_dir.join("domains").join(DOMAIN).join("users");
    std::fs::write(
        &users,
        format!(
            "ann {}\nbob {}\ncarol !\n",
            hash(PASSWORD),
            hash("bob's password")
        ),
    )
    .unwrap();
    t
}

fn started() -> Tambo {
    let mut t = setup();
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    t
}

fn ehlo_has(r: &Reply, word: &str) -> bool {
    r.lines
        .iter()
        .any(|l| l.split_whitespace().next() == Some(word))
}

#[test]
fn starttls_then_auth_then_relay() {
    let t = started();
    let mut c = TlsSmtp::connect(t.smtp_addr());
    let r = c.expect("EHLO client.test", 250);
    assert!(ehlo_has(&r, "STARTTLS"), "{r:?}");
    assert!(!ehlo_has(&r, "AUTH"), "no AUTH in plain text: {r:?}");
    let r = c.expect(
        &format!("AUTH PLAIN {}", plain("ann@example.test", PASSWORD)),
        503,
    );
    assert!(r.text().starts_with("5.7.10 "), "{r:?}");
    c.starttls("mx.example.test");
    let r = c.expect("EHLO client.test", 250);
    assert!(ehlo_has(&r, "AUTH"), "{r:?}");
    assert!(r.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{r:?}");
    assert!(!ehlo_has(&r, "STARTTLS"), "{r:?}");
    // Without AUTH, no relay, even on TLS.
    c.expect("MAIL FROM:<ann@example.test>", 250);
    let r = c.expect("RCPT TO:<someone@elsewhere.example>", 503);
    assert!(r.text().starts_with("5.7.1 "), "{r:?}");
    c.expect("RSET", 250);
    // Two errors so far (the third closes a session): a fresh one.
    c.expect("QUIT", 221);
    let mut c = TlsSmtp::connect(t.smtp_addr());
    c.expect("EHLO client.test", 250);
    c.starttls("mx.example.test");
    c.expect("EHLO client.test", 250);
    let r = c.expect(
        &format!("AUTH PLAIN {}", plain("ann@example.test", "wrong")),
        535,
    );
    assert!(r.text().starts_with("5.7.8 "), "{r:?}");
    let r = c.expect(
        &format!("AUTH PLAIN {}", plain("Ann@Example.TEST", PASSWORD)),
        235,
    );
    assert!(r.text().starts_with("2.7.0 "), "{r:?}");
    c.expect(
        &format!("AUTH PLAIN {}", plain("ann@example.test", PASSWORD)),
        503,
    );
    c.expect("MAIL FROM:<ann@example.test>", 250);
    c.expect("RCPT TO:<someone@elsewhere.example>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("relayed", "over TLS\r\n"));
    c.send_raw(b".\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{r:?}");
    // The queued message says how it came in.
    let id = r.text().rsplit(' ').next().unwrap().to_string();
    let body = std::fs::read_to_string(t.data_dir.join("queue").join(format!("d:{id}"))).unwrap();
    assert!(body.contains("with ESMTPSA tls TLS13_"), "{body}");
    assert!(body.contains("(over SMTP, TLS-1.3,"), "{body}");
    assert!(
        !body.contains("127.0.0.1"),
        "an authenticated client's IP is hidden: {body}"
    );
    c.expect("QUIT", 221);
    // REFERENCE §3: the STARTTLS and AUTH commands and their replies are
    // counted like any other, and TLS sessions once each, at the close.
    t.wait_var("TLS sessions, STARTTLS and AUTH counted", |v| {
        let cmd = &v["chasquid/smtpIn/commandCount"];
        let code = &v["chasquid/smtpIn/responseCodeCount"];
        v["tambo/tls/signatures"].as_u64() >= Some(2)
            && v["chasquid/smtpIn/tlsCount"]["tls"].as_u64() >= Some(2)
            && cmd["STARTTLS"].as_u64() >= Some(2)
            && cmd["AUTH"].as_u64() >= Some(4)
            && code["235"].as_u64() >= Some(1)
            && code["535"].as_u64() >= Some(1)
            && code["503"].as_u64() >= Some(3)
    });
}

#[test]
fn tls12_handshakes_work_too() {
    let t = started();
    let mut c = TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Tls12)
        .expect("a TLS 1.2 handshake, signed by queued");
    assert_eq!(c.negotiated.unwrap().0, rustls::ProtocolVersion::TLSv1_2);
    c.expect("EHLO client.test", 250);
}

#[test]
fn implicit_tls_submission_needs_auth_and_binds_the_sender() {
    let t = started();
    let mut c = TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Any)
        .expect("handshake on the submission+TLS port");
    c.expect("EHLO client.test", 250);
    let r = c.expect("MAIL FROM:<ann@example.test>", 550);
    assert!(r.text().starts_with("5.7.9 "), "{r:?}");
    // AUTH LOGIN, the two prompts.
    let r = c.expect("AUTH LOGIN", 334);
    assert_eq!(r.text(), "VXNlcm5hbWU6");
    let r = c.expect(&b64(b"ann@example.test"), 334);
    assert_eq!(r.text(), "UGFzc3dvcmQ6");
    c.expect(&b64(PASSWORD.as_bytes()), 235);
    let r = c.expect("MAIL FROM:<bob@example.test>", 550);
    assert!(r.text().starts_with("5.7.1 "), "{r:?}");
    c.expect("MAIL FROM:<postmaster@example.test>", 250);
    c.expect("RCPT TO:<bob@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("submitted", "x\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    let msgs = t.wait_maildir("bob", 1);
    let s = String::from_utf8_lossy(&msgs[0]);
    assert!(s.contains("(over submission+TLS, TLS-1."), "{s}");
}

#[test]
fn submission_needs_tls_before_auth_and_auth_before_mail() {
    let t = started();
    let mut c = TlsSmtp::connect(t.submission_addr());
    c.expect("EHLO client.test", 250);
    let r = c.expect("MAIL FROM:<ann@example.test>", 550);
    assert!(r.text().starts_with("5.7.9 "), "{r:?}");
    c.starttls("mx.example.test");
    c.expect("EHLO client.test", 250);
    // A receive-only user never authenticates (two errors so far: the
    // third would close the session).
    c.expect(
        &format!("AUTH PLAIN {}", plain("carol@example.test", "anything")),
        535,
    );
    c.expect(
        &format!("AUTH PLAIN {}", plain("ann@example.test", PASSWORD)),
        235,
    );
    c.expect("MAIL FROM:<ann@example.test>", 250);
}

#[test]
fn an_unknown_user_is_refused_like_a_wrong_password() {
    let t = started();
    let mut c =
        TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Any).unwrap();
    c.expect("EHLO client.test", 250);
    let r = c.expect(
        &format!("AUTH PLAIN {}", plain("nobody@example.test", PASSWORD)),
        535,
    );
    assert!(r.text().starts_with("5.7.8 "), "{r:?}");
    // A bare user name (no domain) only Dovecot could know.
    c.expect(&format!("AUTH PLAIN {}", plain("ann", PASSWORD)), 535);
}

#[test]
fn bad_auth_exchanges() {
    let t = started();
    let mut c = TlsSmtp::connect(t.smtp_addr());
    c.expect("EHLO client.test", 250);
    c.starttls("mx.example.test");
    c.expect("EHLO client.test", 250);
    let r = c.expect("AUTH CRAM-MD5", 534);
    assert!(r.text().starts_with("5.7.9 "), "{r:?}");
    let r = c.expect("AUTH PLAIN !!!not-base64!!!", 501);
    assert!(r.text().starts_with("5.5.2 "), "{r:?}");
    // The third error closes the session.
    let r = c.expect("AUTH PLAIN", 334);
    assert_eq!(r.text(), "");
    let r = c.expect("*", 421);
    assert!(r.text().starts_with("4.5.0 "), "{r:?}");
    assert!(c.is_closed());
}

#[test]
fn a_command_injected_before_the_handshake_is_never_run() {
    // CVE-2011-0411: the client sends STARTTLS and, in the same packet, a
    // command meant to be read after the handshake, as if it came over TLS.
    let t = started();
    let mut c = TlsSmtp::connect(t.smtp_addr());
    c.expect("EHLO client.test", 250);
    c.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n");
    assert_eq!(c.reply().code, 220);
    c.handshake("mx.example.test", Versions::Any).unwrap();
    // Had the injected MAIL been run, an envelope would be open and a RCPT
    // accepted; instead the server starts over, and our first command over
    // TLS gets the first reply.
    let r = c.expect("EHLO client.test", 250);
    assert!(r.lines[0].starts_with("mx.example.test"), "{r:?}");
    let r = c.expect("RCPT TO:<ann@example.test>", 503);
    assert!(r.text().starts_with("5.5.1 "), "no sender given: {r:?}");
}

#[test]
fn a_failed_starttls_handshake_gets_554_and_the_close() {
    use std::io::{BufRead, BufReader, Read, Write};
    let t = started();
    let mut tcp = std::net::TcpStream::connect(t.smtp_addr()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::new(tcp.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("220 "), "{line}");
    tcp.write_all(b"EHLO client.test\r\n").unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("250 ") {
            break;
        }
    }
    tcp.write_all(b"STARTTLS\r\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("220 2.0.0"), "{line}");
    // Not a ClientHello: the handshake fails.
    tcp.write_all(b"EHLO this is not TLS\r\n").unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("554 5.5.0 TLS handshake failed\r\n"),
        "{rest:?}"
    );
    t.wait_var("the 554 counted", |v| {
        v["chasquid/smtpIn/responseCodeCount"]["554"].as_u64() >= Some(1)
    });
    // On 465 there never was a plain-text dialogue: no reply at all.
    let mut tcp = std::net::TcpStream::connect(t.submission_tls_addr()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(b"EHLO this is not TLS\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("554"), "{rest:?}");
}

#[test]
fn sni_picks_the_certificate_and_the_host_name() {
    let mut t = setup();
    let other = write_cert(
        &t.config_dir,
        "other",
        &["other.example.test", "*.wild.example.test"],
    );
    t.start_all();
    t.wait_log("smtpd", "TLS ready with 2 certificate(s)");
    for (sni, want_other, host) in [
        ("other.example.test", true, "other.example.test"),
        ("deep.wild.example.test", true, "deep.wild.example.test"),
        ("mx.example.test", false, "mx.example.test"),
        ("unknown.example", false, "mx.example.test"),
    ] {
        let mut c = TlsSmtp::connect_tls(t.submission_tls_addr(), sni, Versions::Any).unwrap();
        let got = c.seen.lock().unwrap().clone().unwrap();
        assert_eq!(got == other, want_other, "SNI {sni}");
        let r = c.expect("EHLO client.test", 250);
        assert_eq!(
            r.lines[0].split_whitespace().next(),
            Some(host),
            "SNI {sni}: {r:?}"
        );
    }
}

#[test]
fn password_guessing_is_cut_off_per_client() {
    let t = started();
    let auth = |pw: &str| -> u16 {
        let mut c = TlsSmtp::connect(t.smtp_addr());
        c.expect("EHLO client.test", 250);
        c.starttls("mx.example.test");
        c.expect("EHLO client.test", 250);
        c.cmd(&format!("AUTH PLAIN {}", plain("ann@example.test", pw)))
            .code
    };
    for i in 0..10 {
        assert_eq!(auth(&format!("guess {i}")), 535, "guess {i}");
    }
    // The right password no longer helps: not even checked.
    assert_eq!(auth(PASSWORD), 454);
    t.wait_log("queued", "AUTH refused without a check: too many failures");
}

/// A submit.sock session as a compromised smtpd could open it, claiming
/// whatever mode and TLS state it likes.
async fn raw_session(t: &Tambo, mode: Mode, tls: bool) -> tokio::net::UnixStream {
    let mut s = hello::connect(
        &t.run_dir.join("submit.sock"),
        Role::Smtpd,
        Role::Queued,
        &ids(),
    )
    .await
    .expect("handshake");
    let client = "203.0.113.7:4242".to_string();
    assert_eq!(
        ask(&mut s, SubmitRequest::Session { client, mode, tls }).await,
        SubmitReply::Ok
    );
    s
}

fn auth_req(user: &str, password: &str) -> SubmitRequest {
    SubmitRequest::Auth {
        identity: user.into(),
        password: password.as_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn only_an_authenticated_submit_session_relays() {
    // smtpd only carries the exchange: a compromised one that skips AUTH,
    // or says the session is on TLS when it is not, still cannot relay.
    let mut t = setup();
    t.start("monitord");
    t.start("queued");
    let mail = || SubmitRequest::Mail {
        from: "ann@example.test".into(),
        ehlo: "client.test".into(),
        server_name: "mx.example.test".into(),
        spf: None,
    };
    let far = || SubmitRequest::Rcpt {
        to: "someone@elsewhere.example".into(),
    };
    let denied = SubmitReply::Rcpt(RcptVerdict::RelayDenied);
    // No AUTH at all.
    let mut s = raw_session(&t, Mode::Smtp, true).await;
    assert_eq!(ask(&mut s, mail()).await, SubmitReply::Ok);
    assert_eq!(ask(&mut s, far()).await, denied);
    // The right password on a session that is not on TLS is not checked.
    let mut s = raw_session(&t, Mode::Smtp, false).await;
    let r = ask(&mut s, auth_req("ann@example.test", PASSWORD)).await;
    assert_eq!(r, SubmitReply::Auth(AuthVerdict::Invalid));
    assert_eq!(ask(&mut s, mail()).await, SubmitReply::Ok);
    assert_eq!(ask(&mut s, far()).await, denied);
    // Submission: MAIL needs AUTH first, and a failed AUTH is no AUTH.
    let mut s = raw_session(&t, Mode::Submission, true).await;
    assert_eq!(ask(&mut s, mail()).await, SubmitReply::AuthRequired);
    let r = ask(&mut s, auth_req("ann@example.test", "wrong")).await;
    assert_eq!(r, SubmitReply::Auth(AuthVerdict::Invalid));
    assert_eq!(ask(&mut s, mail()).await, SubmitReply::AuthRequired);
    assert_eq!(
        ask(&mut s, far()).await,
        SubmitReply::BadSequence("RCPT before MAIL".into())
    );
    // The control: the same requests after a good AUTH relay; a second AUTH
    // (to switch users) is refused and the first login stands.
    let mut s = raw_session(&t, Mode::SubmissionTls, true).await;
    let r = ask(&mut s, auth_req("ann@example.test", PASSWORD)).await;
    assert_eq!(r, SubmitReply::Auth(AuthVerdict::Accepted));
    let r = ask(&mut s, auth_req("bob@example.test", "bob's password")).await;
    assert_eq!(r, SubmitReply::Auth(AuthVerdict::Invalid));
    assert_eq!(ask(&mut s, mail()).await, SubmitReply::Ok);
    assert_eq!(
        ask(&mut s, far()).await,
        SubmitReply::Rcpt(RcptVerdict::Accepted)
    );
}
