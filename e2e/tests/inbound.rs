//! Inbound policy beyond SPF itself: DKIM verification of signatures an
//! independent signer made (python3-dkim's `dkimsign`), the incoming
//! security level, relay by client network, and the final order of the
//! headers tambo adds (REFERENCE §2.6, §2.8, §4.6, §4.9).

use std::io::Write;
use std::process::{Command, Stdio};

use tambo_e2e::dns::TestDns;
use tambo_e2e::tls::{TlsSmtp, hash, submit_as};
use tambo_e2e::{DOMAIN, Tambo, message};

const PASSWORD: &str = "correct horse battery staple";

/// A tambo whose every lookup goes to `dns`, where `sender.example`
/// passes SPF from loopback.
fn setup(dns: &TestDns, tambo_extra: &str) -> Tambo {
    dns.add_txt("sender.example", "v=spf1 ip4:127.0.0.0/8 -all");
    let mut t = Tambo::new(
        "",
        tambo_extra,
        &format!("dns_server = \"{}\"\n", dns.addr()),
    );
    std::fs::write(
        t.config_dir.join("domains").join(DOMAIN).join("users"),
        format!("ann {}\n", hash(PASSWORD)),
    )
    .unwrap();
    t.start_all();
    t
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The names of the header fields of `m`, in order.
fn field_names(m: &str) -> Vec<String> {
    m.split("\r\n")
        .take_while(|l| !l.is_empty())
        .filter(|l| !l.starts_with([' ', '\t']))
        .filter_map(|l| l.split(':').next())
        .map(str::to_string)
        .collect()
}

/// The value of the first `name:` field, unfolded.
fn field(m: &str, name: &str) -> String {
    let head = m.split("\r\n\r\n").next().unwrap_or("");
    let unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ");
    unfolded
        .split("\r\n")
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

/// Sends `body` from sender@sender.example to ann over plain SMTP.
fn send_plain(t: &Tambo, body: &[u8]) -> u16 {
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<sender@sender.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(body);
    c.send_raw(b".\r\n");
    c.reply().code
}

/// `msg` signed by dkimpy for `domain` with the key at `key`.
fn dkimsign(selector: &str, domain: &str, key: &std::path::Path, msg: &[u8]) -> Vec<u8> {
    let mut child = Command::new("dkimsign")
        .args([selector, domain])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("dkimsign (python3-dkim) is installed");
    child.stdin.take().unwrap().write_all(msg).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// An RSA key pair: the PEM private key's path and the DKIM TXT record.
fn dkim_key(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let key = dir.join("dkim.pem");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg("2048")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let der = Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(der.status.success());
    let p = tambo_e2e::tls::b64(&der.stdout);
    (key, format!("v=DKIM1; k=rsa; p={p}"))
}

#[test]
fn dkim_signatures_of_an_independent_signer_are_verified() {
    let dns = TestDns::start();
    let t = setup(&dns, "");
    let (key, record) = dkim_key(t.dir.path());
    dns.add_txt("sel._domainkey.sender.example", &record);
    let original = message("signed", "a signed body\r\n");
    let signed = dkimsign("sel", "sender.example", &key, &original);
    assert_eq!(send_plain(&t, &signed), 250);
    // The same signature over a body changed on the way.
    let tampered = text(&signed).replace("a signed body", "a forged body");
    assert_eq!(send_plain(&t, tampered.as_bytes()), 250);
    // And a message with no signature at all.
    assert_eq!(send_plain(&t, &message("unsigned", "x\r\n")), 250);
    let got = t.wait_maildir_in(DOMAIN, "ann", 3);
    let by = |s: &str| {
        got.iter()
            .map(|m| text(m))
            .find(|m| m.contains(s))
            .unwrap_or_else(|| panic!("no message with {s}"))
    };
    let pass = field(&by("a signed body"), "Authentication-Results");
    assert!(pass.starts_with("mx.example.test"), "{pass}");
    assert!(pass.contains("spf=pass"), "{pass}");
    assert!(pass.contains("dkim=pass"), "{pass}");
    assert!(pass.contains("header.d=sender.example"), "{pass}");
    let fail = field(&by("a forged body"), "Authentication-Results");
    assert!(fail.contains("dkim=fail"), "{fail}");
    let none = field(&by("Subject: unsigned"), "Authentication-Results");
    assert!(none.contains("dkim=none"), "{none}");
    t.wait_var("dkimVerifyValid = 1", |v| {
        v["chasquid/smtpIn/dkimVerifyValid"].as_u64() == Some(1)
            && v["chasquid/smtpIn/dkimVerifyFound"].as_u64() == Some(2)
            && v["chasquid/smtpIn/dkimVerifyNotFound"].as_u64() == Some(1)
    });
}

#[test]
fn a_domain_seen_over_tls_is_refused_in_plain_text_afterwards() {
    let dns = TestDns::start();
    let t = setup(&dns, "");
    // First over STARTTLS: recorded as TLS_CLIENT.
    let mut c = TlsSmtp::connect(t.smtp_addr());
    c.expect("EHLO client.test", 250);
    c.starttls("mx.example.test");
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<sender@sender.example>", 250);
    c.expect("QUIT", 221);
    let record = std::fs::read_to_string(t.data_dir.join("domaininfo/s:sender.example"))
        .expect("a domaininfo record");
    assert!(record.contains("TLS_CLIENT"), "{record}");
    // Then in plain text, with SPF passing: refused.
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    let r = c.cmd("MAIL FROM:<sender@sender.example>");
    assert_eq!(r.code, 550, "{r:?}");
    assert!(r.text().starts_with("5.7.3"), "{r:?}");
    // A domain whose SPF does not pass is not checked (and not recorded):
    // anyone could raise its level otherwise.
    dns.add_txt("neutral.example", "v=spf1 ?all");
    c.expect("MAIL FROM:<x@neutral.example>", 250);
    assert!(!t.data_dir.join("domaininfo/s:neutral.example").exists());
    t.wait_var("securityLevelChecks", |v| {
        let m = &v["chasquid/smtpIn/securityLevelChecks"];
        m["pass"].as_u64() == Some(1)
            && m["fail"].as_u64() == Some(1)
            && m["skip"].as_u64() >= Some(1)
    });
}

#[test]
fn relay_networks_may_relay_without_auth() {
    let dns = TestDns::start();
    let t = setup(&dns, "relay_networks = [\"127.0.0.0/8\"]");
    // Their senders are not SPF-checked: our own domain's record, which
    // does not list the printer, would refuse it.
    dns.add_txt("example.test", "v=spf1 -all");
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<printer@example.test>", 250);
    c.expect("RCPT TO:<someone@elsewhere.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("from-the-printer", "scan attached\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    assert_eq!(dns.query_count("example.test"), 0, "no SPF query");
    let m = text(&t.wait_maildir_in(DOMAIN, "ann", 1)[0]);
    assert!(!m.contains("Received-SPF:"), "{m}");
    let dns2 = TestDns::start();
    let t2 = setup(&dns2, "relay_networks = [\"192.0.2.0/24\"]");
    let mut c = t2.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<sender@sender.example>", 250);
    let r = c.cmd("RCPT TO:<someone@elsewhere.example>");
    assert_eq!(r.code, 503, "{r:?}");
}

#[test]
fn the_added_headers_come_in_reference_order() {
    let dns = TestDns::start();
    let t = setup(&dns, "");
    // Authenticated, from a domain with a DKIM key: Received, then the
    // signature, and no Authentication-Results or Received-SPF.
    let key = t
        .config_dir
        .join("domains")
        .join(DOMAIN)
        .join("dkim:s1.pem");
    let out = Command::new(tambo_e2e::bin_dir().join("tambo"))
        .arg("dkim-keygen")
        .arg(format!("--config_dir={}", t.config_dir.display()))
        .args([DOMAIN, "s1"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut t = t;
    let ups = t.log("queued").matches("hook connection is up").count();
    t.stop("queued");
    t.start("queued");
    // deliverd reconnects with a backoff: wait for its hook connection.
    tambo_e2e::wait_for("deliverd's hook connection", || {
        (t.log("queued").matches("hook connection is up").count() > ups).then_some(())
    });
    let hooks = t.config_dir.join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::write(hooks.join("post-data"), "#!/bin/sh\necho 'X-Hook: yes'\n").unwrap();
    std::fs::set_permissions(
        hooks.join("post-data"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let body = message("authenticated", "hi\r\n");
    let code = submit_as(
        t.submission_addr(),
        "ann@example.test",
        PASSWORD,
        &["ann@example.test"],
        &body,
    );
    assert_eq!(code, 250);
    let m = text(&t.wait_maildir_in(DOMAIN, "ann", 1)[0]);
    assert_eq!(
        &field_names(&m)[..4],
        ["X-Hook", "Received", "DKIM-Signature", "From"],
        "{m}"
    );
    // Unauthenticated: hook, Authentication-Results, Received-SPF,
    // Received, the message.
    assert_eq!(send_plain(&t, &message("plain", "hi\r\n")), 250);
    let got = t.wait_maildir_in(DOMAIN, "ann", 2);
    let m = got
        .iter()
        .map(|m| text(m))
        .find(|m| m.contains("Subject: plain"))
        .unwrap();
    assert_eq!(
        &field_names(&m)[..5],
        [
            "X-Hook",
            "Authentication-Results",
            "Received-SPF",
            "Received",
            "From"
        ],
        "{m}"
    );
}
