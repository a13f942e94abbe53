//! TLS with the keys in queued, STARTTLS and port 465, and AUTH checked by
//! queued: real handshakes (rustls clients that verify every signature),
//! relay only after AUTH, the sender bound to the login, and the attacks:
//! STARTTLS command injection, a key link asked to sign anything, password
//! guessing.

use std::path::Path;

use tambo_e2e::tls::{TlsSmtp, Versions, b64, hash, plain};
use tambo_e2e::*;
use tambo_proto::frame::{read_frame_max, write_frame};
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
    t.wait_var("TLS sessions counted", |v| {
        v["tambo/tls/signatures"].as_u64() >= Some(1)
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
fn smtpd_needs_no_private_key_at_all() {
    let mut t = setup();
    // smtpd's own config directory has no certs/ at all: its handshakes
    // can only be signed by queued.
    let bare = t.dir.path().join("smtpd-config");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(t.config_dir.join("tambo.conf"), bare.join("tambo.conf")).unwrap();
    copy_dir(&t.config_dir.join("domains"), &bare.join("domains"));
    assert!(!bare.join("certs").exists());
    t.start("monitord");
    t.start("queued");
    t.start("deliverd");
    t.start_with_config("smtpd", &bare);
    t.wait_log("smtpd", "TLS ready with 1 certificate(s)");
    let mut c = TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Tls13)
        .expect("a handshake whose key smtpd never had");
    c.expect("EHLO client.test", 250);
    // And the private key is nowhere in smtpd's memory. The search does
    // find the public half, which smtpd holds in the certificate: the
    // PKCS#8 key ends with the public point.
    let key_pem = std::fs::read_to_string(t.config_dir.join("certs/mx/privkey.pem")).unwrap();
    let key_der = pem_body(&key_pem);
    let secret = ec_private_scalar(&key_der);
    assert!(
        memory_contains(t.pid("smtpd"), &key_der[key_der.len() - 32..]),
        "the search finds what smtpd does hold"
    );
    assert!(
        !memory_contains(t.pid("smtpd"), &secret),
        "smtpd's memory holds the private key"
    );
}

/// A key link as a compromised smtpd could open one: its certificates.
async fn key_link(t: &Tambo) -> (tokio::net::UnixStream, Vec<tambo_proto::submit::CertEntry>) {
    let sock = t.run_dir.join("submit.sock");
    let mut s = hello::connect(&sock, Role::Smtpd, Role::Queued, &ids())
        .await
        .unwrap();
    match ask(&mut s, SubmitRequest::KeyLink).await {
        SubmitReply::Certificates(certs) => (s, certs),
        r => panic!("no certificates: {r:?}"),
    }
}

/// A TLS 1.3 server CertificateVerify input, the shape queued signs.
fn certificate_verify() -> Vec<u8> {
    let mut cv = vec![0x20; 64];
    cv.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    cv.extend([7; 32]);
    cv
}

#[tokio::test(flavor = "current_thread")]
async fn queued_signs_nothing_but_handshakes() {
    let mut t = setup();
    t.start("monitord");
    t.start("queued");
    // What a compromised smtpd could do: open a key link and ask.
    let (mut s, certs) = key_link(&t).await;
    assert_eq!(certs.len(), 1);
    let (cert, scheme) = (certs[0].id, certs[0].schemes[0]);
    for evil in [
        b"DKIM-Signature: v=1; a=rsa-sha256; d=victim.example; b=".to_vec(),
        vec![0x30, 0x82, 0x01, 0x0a],
        vec![0x20; 130],
    ] {
        let r = ask(
            &mut s,
            SubmitRequest::Sign {
                cert,
                scheme,
                message: evil,
            },
        )
        .await;
        assert!(matches!(r, SubmitReply::SignRefused(_)), "{r:?}");
    }
    let message = certificate_verify();
    let r = ask(
        &mut s,
        SubmitRequest::Sign {
            cert,
            scheme,
            message,
        },
    )
    .await;
    assert!(matches!(r, SubmitReply::Signature(_)), "{r:?}");
    t.wait_log(
        "queued",
        "key link: refused to sign: not a TLS handshake input",
    );
    t.wait_var("refusals counted", |v| {
        v["tambo/tls/signRefused"]["input"].as_u64() >= Some(3)
    });
}

#[tokio::test(flavor = "current_thread")]
async fn the_signature_budget_holds_over_every_key_link() {
    // 5 a second, bursts of 10: more links get no more signatures.
    let mut t = Tambo::new("", "max_tls_signatures_per_second = 5\n", "");
    t.start("monitord");
    t.start("queued");
    let mut links = Vec::new();
    for _ in 0..3 {
        links.push(key_link(&t).await);
    }
    let (mut signed, mut refused) = (0, 0);
    for i in 0..30 {
        let (s, certs) = &mut links[i % 3];
        let (cert, scheme) = (certs[0].id, certs[0].schemes[0]);
        let message = certificate_verify();
        match ask(
            s,
            SubmitRequest::Sign {
                cert,
                scheme,
                message,
            },
        )
        .await
        {
            SubmitReply::Signature(_) => signed += 1,
            SubmitReply::SignRefused(why) => {
                assert!(why.contains("max_tls_signatures_per_second"), "{why}");
                refused += 1;
            }
            r => panic!("{r:?}"),
        }
    }
    // The burst, and what the rate added while we asked (well under 1 s).
    assert!((10..=14).contains(&signed), "{signed} signed");
    assert_eq!(signed + refused, 30);
    t.wait_var("rate refusals counted", |v| {
        v["tambo/tls/signRefused"]["rate"].as_u64() >= Some(refused)
    });
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

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The 32-byte private scalar of a PKCS#8 P-256 key (the OCTET STRING
/// after ECPrivateKey's version 1), not the public point that follows it.
fn ec_private_scalar(pkcs8: &[u8]) -> Vec<u8> {
    let at = pkcs8
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an EC private key");
    pkcs8[at + 5..at + 37].to_vec()
}

/// The DER inside a PEM block.
fn pem_body(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64_decode(&b64)
}

fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Whether `needle` is anywhere in the readable memory of `pid`.
fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        if !perms.starts_with('r') {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        if b - a > 256 << 20 || mem.seek(SeekFrom::Start(a)).is_err() {
            continue;
        }
        let mut buf = vec![0; (b - a) as usize];
        if mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

#[test]
fn certificates_reload_without_a_restart() {
    // As after a certbot renewal: new files, the next handshake shows the
    // new certificate; a broken new file keeps the old one in use.
    let mut t = Tambo::new("", "", "reload_period = \"200ms\"\n");
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    let addr = t.submission_tls_addr();
    // The certificate a fresh handshake shows. Every handshake must work,
    // through the reload too: queued swaps only a pair that loads whole,
    // and the replaced key still signs until smtpd has caught up.
    let seen = || -> Option<Vec<u8>> {
        let c = TlsSmtp::connect_tls(addr, "mx.example.test", Versions::Any)
            .expect("a handshake, during a reload too");
        c.seen.lock().unwrap().clone()
    };
    let first = seen().expect("a certificate");
    let renewed = write_cert(&t.config_dir, "mx", &["mx.example.test"]);
    assert_ne!(renewed, first);
    wait_for("the renewed certificate in a handshake", || {
        (seen().as_ref() == Some(&renewed)).then_some(())
    });
    t.wait_log("queued", "certificates reloaded");
    // A renewal gone wrong: the renewed certificate stays in use.
    let refusals = |t: &Tambo| {
        t.log("queued")
            .matches("certificates not reloaded, keeping the previous ones")
            .count()
    };
    let before = refusals(&t);
    std::fs::write(t.config_dir.join("certs/mx/privkey.pem"), "not a key").unwrap();
    wait_for("the broken key refused", || {
        (refusals(&t) > before).then_some(())
    });
    assert!(t.log("queued").contains("privkey.pem"));
    assert_eq!(seen(), Some(renewed));
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

async fn ask(s: &mut tokio::net::UnixStream, req: SubmitRequest) -> SubmitReply {
    write_frame(s, &req).await.unwrap();
    read_frame_max(s, 1 << 20).await.unwrap().expect("a reply")
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
