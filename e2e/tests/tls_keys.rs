//! The TLS keys stay in queued: smtpd completes handshakes without ever
//! holding a private key, queued signs nothing but handshakes and no more
//! than its budget, certificates reload without a restart, and a queued
//! that stalls costs the handshakes of the moment, not the ones after.

use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use tambo_e2e::tls::{TlsSmtp, Versions};
use tambo_e2e::*;
use tambo_proto::submit::{SubmitReply, SubmitRequest};
use tambo_proto::{Role, hello};

#[test]
fn smtpd_needs_no_private_key_at_all() {
    let mut t = Tambo::default_setup();
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
    let mut t = Tambo::default_setup();
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
    let start = std::time::Instant::now();
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
    // The burst, and what the rate added while we asked (however slow the
    // machine).
    let refill = (5.0 * start.elapsed().as_secs_f64()).ceil() as u64;
    assert!(
        signed >= 10 && signed <= 10 + refill,
        "{signed} signed in {:?}",
        start.elapsed()
    );
    assert!(refused > 0, "the budget refused none");
    assert_eq!(signed + refused, 30);
    t.wait_var("rate refusals counted", |v| {
        v["tambo/tls/signRefused"]["rate"].as_u64() >= Some(refused)
    });
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

#[test]
fn sighup_reloads_the_certificates() {
    // No periodic check within the test: only the SIGHUP can do it. Both
    // daemons get it at once, as `tambo run` passes it on.
    let mut t = Tambo::new("", "", "reload_period = \"1h\"\n");
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    let addr = t.submission_tls_addr();
    let seen = || {
        let c = TlsSmtp::connect_tls(addr, "mx.example.test", Versions::Any).expect("a handshake");
        c.seen.lock().unwrap().clone().expect("a certificate")
    };
    let first = seen();
    let renewed = write_cert(&t.config_dir, "mx", &["mx.example.test"]);
    assert_eq!(seen(), first, "nothing reloads by itself within the hour");
    for d in ["queued", "smtpd"] {
        kill(Pid::from_raw(t.pid(d) as i32), Signal::SIGHUP).unwrap();
    }
    t.wait_log("queued", "certificates reloaded");
    wait_for("the renewed certificate after SIGHUP", || {
        (seen() == renewed).then_some(())
    });
}

#[test]
fn a_stalled_queued_costs_only_the_handshakes_of_the_moment() {
    // A handshake that gives up waiting for queued's signature must leave
    // no unread reply on its key link for the next handshake to take.
    let mut t = Tambo::default_setup();
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    let addr = t.submission_tls_addr();
    TlsSmtp::connect_tls(addr, "mx.example.test", Versions::Tls13).expect("a first handshake");
    t.freeze("queued");
    let stalled = TlsSmtp::connect_tls(addr, "mx.example.test", Versions::Tls13);
    t.thaw("queued");
    assert!(stalled.is_err(), "no signature while queued is stopped");
    t.wait_log("smtpd", "queued did not sign within 5s");
    // queued answers the old request now, to a link smtpd dropped; every
    // handshake from here works, whichever link it takes.
    for i in 0..6 {
        let mut c = TlsSmtp::connect_tls(addr, "mx.example.test", Versions::Tls13)
            .unwrap_or_else(|e| panic!("handshake {i} after the stall: {e}"));
        c.expect("EHLO client.test", 250);
    }
}

#[test]
fn certbot_layout_symlinks_are_followed_and_renewals_seen() {
    // /etc/letsencrypt as certbot lays it out: live/<name>/*.pem are
    // symlinks into archive/<name>/*N.pem, and certs/<name> is a symlink to
    // live/<name>. A renewal writes *2.pem and repoints the links.
    let mut t = Tambo::new("", "", "reload_period = \"200ms\"\n");
    let le = t.dir.path().join("letsencrypt");
    let (archive, live) = (le.join("archive/mx"), le.join("live/mx"));
    std::fs::create_dir_all(&archive).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    let issue = |n: u32| -> Vec<u8> {
        let (chain, key, der) = cert_pair(&["mx.example.test"]);
        std::fs::write(archive.join(format!("fullchain{n}.pem")), chain).unwrap();
        std::fs::write(archive.join(format!("privkey{n}.pem")), key).unwrap();
        // One link after the other, as certbot does: in between, queued
        // sees a pair that does not match and keeps the one it has.
        for f in ["privkey", "fullchain"] {
            let tmp = live.join(format!(".{f}.tmp"));
            std::os::unix::fs::symlink(format!("../../archive/mx/{f}{n}.pem"), &tmp).unwrap();
            std::fs::rename(&tmp, live.join(format!("{f}.pem"))).unwrap();
        }
        der
    };
    let first = issue(1);
    let certs = t.config_dir.join("certs");
    std::fs::remove_dir_all(&certs).unwrap();
    std::fs::create_dir_all(&certs).unwrap();
    std::os::unix::fs::symlink(&live, certs.join("mx")).unwrap();
    t.start_all();
    t.wait_log("smtpd", "TLS ready with 1 certificate(s)");
    let addr = t.submission_tls_addr();
    let seen = || {
        let c = TlsSmtp::connect_tls(addr, "mx.example.test", Versions::Any).expect("a handshake");
        c.seen.lock().unwrap().clone().expect("a certificate")
    };
    assert_eq!(seen(), first);
    let renewed = issue(2);
    wait_for("the renewed certificate through the symlinks", || {
        (seen() == renewed).then_some(())
    });
}
