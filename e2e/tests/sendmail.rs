//! Local submission: `tambo sendmail` (and run as `sendmail`) from a shell
//! pipeline, as root and as another local user, over queued's local.sock;
//! queued names the user from the connection's credentials and binds the
//! sender to them; failures exit with sysexits codes, 75 with queued down.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use tambo_e2e::*;

/// Runs `program args` as `uid` with `stdin`: exit code, stderr.
fn run_as(program: &Path, args: &[&str], stdin: &str, uid: u32) -> (i32, String) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().unwrap();
    // A usage error exits before it reads: a broken pipe here is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn setup() -> Tambo {
    let mut t = Tambo::default_setup();
    let aliases = t.config_dir.join("domains").join(DOMAIN).join("aliases");
    let text = std::fs::read_to_string(&aliases).unwrap();
    std::fs::write(&aliases, format!("{text}root: ann\n")).unwrap();
    t.start_all();
    t
}

#[test]
fn sendmail_from_a_pipeline_delivers_as_the_local_user() {
    let t = setup();
    let tambo = bin_dir().join("tambo");
    let c = format!("--config_dir={}", t.config_dir.display());

    // cron's way: a bare local name, -i, -F, no From: of its own.
    let (code, err) = run_as(
        &tambo,
        &["sendmail", &c, "-FCronDaemon", "-i", "-oem", "root"],
        "Subject: cron output\n\nline one\n.\nline after a dot\n",
        0,
    );
    assert_eq!(code, 0, "{err}");
    let got = t.wait_maildir("ann", 1);
    let m = String::from_utf8_lossy(&got[0]).into_owned();
    assert!(
        m.starts_with(
            "Received: from local user root (uid 0)\r\n\tby mx.example.test (tambo) with local id "
        ),
        "{m}"
    );
    assert!(
        m.contains("From: \"CronDaemon\" <root@example.test>\r\n"),
        "{m}"
    );
    assert!(
        m.contains("\r\nDate: ") && m.contains("\r\nMessage-ID: <"),
        "{m}"
    );
    assert!(m.contains("line one\r\n.\r\nline after a dot\r\n"), "{m}");

    // Another user: -t, and the login is theirs (nobody@example.test).
    let (code, err) = run_as(
        &tambo,
        &["sendmail", &c, "-t"],
        "To: Bob <bob@example.test>\nBcc: ann@example.test\nSubject: from nobody\n\nhi\n",
        65534,
    );
    assert_eq!(code, 0, "{err}");
    let bob = t.wait_maildir("bob", 1);
    let m = String::from_utf8_lossy(&bob[0]).into_owned();
    assert!(
        m.contains("Received: from local user nobody (uid 65534)"),
        "{m}"
    );
    assert!(m.contains("From: nobody@example.test\r\n"), "{m}");
    assert!(!m.contains("Bcc:"), "{m}");
    // The Bcc recipient got it too.
    t.wait_maildir("ann", 2);

    // A user may not send as someone else: EX_NOPERM, nothing sent.
    let (code, err) = run_as(
        &tambo,
        &["sendmail", &c, "-f", "ann@example.test", "bob@example.test"],
        "Subject: forged\n\nx\n",
        65534,
    );
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains("nobody@example.test may not send as <ann@example.test>"),
        "{err}"
    );
    // An unknown local recipient: EX_NOUSER; a bad option: EX_USAGE; no
    // recipient at all: EX_USAGE.
    let (code, err) = run_as(
        &tambo,
        &["sendmail", &c, "nobody-here@example.test"],
        "x\n",
        0,
    );
    assert_eq!(code, 67, "{err}");
    let (code, _) = run_as(&tambo, &["sendmail", &c, "-q", "root"], "x\n", 0);
    assert_eq!(code, 64);
    let (code, _) = run_as(&tambo, &["sendmail", &c], "x\n", 0);
    assert_eq!(code, 64);

    // Run by the name the package installs it as.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("sendmail");
    std::os::unix::fs::symlink(&tambo, &link).unwrap();
    let (code, err) = run_as(
        &link,
        &[&c, "--", "bob@example.test"],
        "Subject: by name\n\nx\n",
        0,
    );
    assert_eq!(code, 0, "{err}");
    t.wait_maildir("bob", 2);
    assert_eq!(t.maildir("ann").len(), 2, "nothing else arrived");

    // mailq: root's; another user is told no.
    let mailq = dir.path().join("mailq");
    std::os::unix::fs::symlink(&tambo, &mailq).unwrap();
    for out in [
        Command::new(&tambo).args(["mailq", &c]).output().unwrap(),
        Command::new(&mailq).arg(&c).output().unwrap(),
    ] {
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("# Queue status"));
    }
    let (code, _) = run_as(&tambo, &["mailq", &c], "", 65534);
    assert_eq!(code, 77);
}

#[test]
fn with_queued_down_sendmail_exits_75_and_the_caller_keeps_the_message() {
    let mut t = setup();
    t.stop("queued");
    let c = format!("--config_dir={}", t.config_dir.display());
    let (code, err) = run_as(
        &bin_dir().join("tambo"),
        &["sendmail", &c, "ann@example.test"],
        "Subject: later\n\nx\n",
        0,
    );
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("nothing was sent, try again later"), "{err}");
}

/// local.sock as a hostile local user might use it: no admin or session
/// request gets through, and the user named in the Received header is
/// the one the kernel vouches for.
#[tokio::test(flavor = "current_thread")]
async fn local_sock_takes_nothing_but_mail_from_its_user() {
    use tambo_proto::frame::{read_frame_max, write_frame};
    use tambo_proto::submit::{AdminRequest, Mode, SubmitReply, SubmitRequest};
    let t = setup();
    let sock = t.run_dir.join("local.sock");
    for req in [
        SubmitRequest::Admin(AdminRequest::QueueList),
        SubmitRequest::Session {
            client: "203.0.113.1:25".into(),
            mode: Mode::Smtp,
            tls: false,
        },
        SubmitRequest::LogLink,
        SubmitRequest::KeyLink,
        SubmitRequest::Auth {
            identity: "ann@example.test".into(),
            password: b"x".to_vec(),
        },
        // A keep-alive would let one user hold a slot for ever.
        SubmitRequest::Ping,
    ] {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let hello: Option<SubmitReply> = read_frame_max(&mut s, 1 << 16).await.unwrap();
        assert_eq!(
            hello,
            Some(SubmitReply::LocalLogin("root@example.test".into()))
        );
        write_frame(&mut s, &req).await.unwrap();
        assert!(closed_by_peer(&mut s).await, "{req:?}");
    }
    // One user holds at most 8 sessions: the ninth is closed unanswered.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let hello: Option<SubmitReply> = read_frame_max(&mut s, 1 << 16).await.unwrap();
        assert!(matches!(hello, Some(SubmitReply::LocalLogin(_))));
        held.push(s);
    }
    let mut ninth = tokio::net::UnixStream::connect(&sock).await.unwrap();
    assert!(closed_by_peer(&mut ninth).await);
    drop(held);
    // Their slots come back once queued sees them closed.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        if let Ok(Some(SubmitReply::LocalLogin(_))) = read_frame_max(&mut s, 1 << 16).await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot came back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
