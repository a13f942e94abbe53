//! Real, independent clients against tambo: swaks (AUTH PLAIN and LOGIN
//! after STARTTLS on the submission port), msmtp (implicit TLS), and
//! openssl s_client (the handshake, after STARTTLS and on the TLS port).
//! scripts/test.sh installs them (Debian packages swaks, msmtp, openssl).

use std::io::Write;
use std::process::{Command, Stdio};

use tambo_e2e::tls::hash;
use tambo_e2e::*;

const PASSWORD: &str = "swordfish-and-chips";

fn started() -> Tambo {
    let mut t = Tambo::default_setup();
    let users = t.config_dir.join("domains").join(DOMAIN).join("users");
    std::fs::write(&users, format!("ann {}\nbob !\n", hash(PASSWORD))).unwrap();
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    t
}

#[test]
fn swaks_submits_with_auth_plain_and_login() {
    let t = started();
    let addr = t.submission_addr();
    for (i, mech) in ["PLAIN", "LOGIN"].iter().enumerate() {
        let out = Command::new(tool("swaks"))
            .args(["--server", &addr.to_string(), "--tls", "--auth", mech])
            .args([
                "--auth-user",
                "ann@example.test",
                "--auth-password",
                PASSWORD,
            ])
            .args(["--from", "ann@example.test", "--to", "bob@example.test"])
            .args(["--header", &format!("Subject: swaks {mech}")])
            .output()
            .unwrap();
        let talk = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "swaks --auth {mech} failed:\n{talk}");
        assert!(talk.contains("<~  235 2.7.0"), "{talk}");
        let msgs = t.wait_maildir("bob", i + 1);
        let last = String::from_utf8_lossy(msgs.last().unwrap()).into_owned();
        assert!(
            msgs.iter()
                .any(|m| String::from_utf8_lossy(m).contains(&format!("Subject: swaks {mech}"))),
            "{last}"
        );
    }
    // Without AUTH, swaks is refused on the submission port.
    let out = Command::new(tool("swaks"))
        .args(["--server", &addr.to_string(), "--tls"])
        .args(["--from", "ann@example.test", "--to", "bob@example.test"])
        .output()
        .unwrap();
    let talk = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(talk.contains(" 550 5.7.9 "), "{talk}");
}

#[test]
fn msmtp_delivers_over_implicit_tls() {
    let t = started();
    let addr = t.submission_tls_addr();
    let mut msmtp = Command::new(tool("msmtp"))
        .arg(format!("--host={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .args(["--tls=on", "--tls-starttls=off", "--tls-certcheck=off"])
        .args(["--auth=plain", "--user=ann@example.test"])
        .arg(format!("--passwordeval=echo {PASSWORD}"))
        .args(["--from=ann@example.test", "bob@example.test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    msmtp
        .stdin
        .take()
        .unwrap()
        .write_all(b"From: ann@example.test\nTo: bob@example.test\nSubject: via msmtp\n\nhello\n")
        .unwrap();
    let out = msmtp.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "msmtp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msgs = t.wait_maildir("bob", 1);
    assert!(String::from_utf8_lossy(&msgs[0]).contains("Subject: via msmtp"));
}

/// Runs `openssl s_client` with `args`, sends `input`, returns its output.
fn s_client(args: &[&str], input: &str) -> String {
    let mut child = Command::new(tool("openssl"))
        .arg("s_client")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn openssl_handshakes_after_starttls_and_on_the_tls_port() {
    let t = started();
    for (addr, starttls) in [
        (t.smtp_addr(), true),
        (t.submission_addr(), true),
        (t.submission_tls_addr(), false),
    ] {
        for version in ["-tls1_3", "-tls1_2"] {
            let a = addr.to_string();
            // -ign_eof: wait for the server to close after QUIT, rather
            // than hang up as soon as the commands are sent.
            let mut args = vec![
                "-connect",
                &a,
                "-servername",
                "mx.example.test",
                "-crlf",
                "-ign_eof",
                version,
            ];
            if starttls {
                args.extend(["-starttls", "smtp"]);
            }
            let out = s_client(&args, "EHLO openssl.test\nQUIT\n");
            assert!(out.contains("CONNECTED"), "{out}");
            assert!(out.contains("Server certificate"), "{version} {a}: {out}");
            assert!(out.contains("subject=CN"), "{out}");
            assert!(out.contains("250-AUTH PLAIN LOGIN"), "{version} {a}: {out}");
            assert!(out.contains("221 2.0.0"), "{out}");
        }
    }
}
