//! `tambo dev`, as a newcomer runs it: it writes its config, binds the
//! ports it prints, and a message sent to the printed address lands in the
//! printed Maildir; the swaks line it prints for submission works as
//! printed, and without AUTH the same submission is refused. It uses the
//! fixed dev ports (127.0.0.1:2525, 2587, 2465, :1099), as the README's
//! command does.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use tambo_e2e::*;

/// Stops `tambo dev` (and so its daemons) if the test fails half-way, so
/// the fixed ports are free for the next run.
struct Stop(u32);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGINT);
    }
}

#[test]
fn tambo_dev_runs_and_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The senders' SPF is looked up: here, never in the real DNS.
    let dns = tambo_e2e::dns::TestDns::start();
    // The submitted message's remote domain stays unreachable for now (not
    // NXDOMAIN, which would bounce it before the test sees it queued).
    dns.servfail("example.com");
    let mut dev = Command::new(bin_dir().join("tambo"))
        .arg("dev")
        .arg("--state_dir")
        .arg(&state)
        .arg("--config_overrides")
        .arg(format!("[testing]\ndns_server = \"{}\"", dns.addr()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _stop = Stop(dev.id());
    let mut out = BufReader::new(dev.stdout.take().unwrap());
    let mut printed = String::new();
    let smtp: std::net::SocketAddr = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "tambo dev said: {printed}"
        );
        printed.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("SMTP:") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    assert_eq!(smtp.to_string(), "127.0.0.1:2525");
    let swaks_line = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "tambo dev said: {printed}"
        );
        printed.push_str(&line);
        if line.contains("--auth PLAIN") {
            break line.trim().to_string();
        }
    };
    assert!(
        printed.contains("submission:  127.0.0.1:2587 (STARTTLS), 127.0.0.1:2465 (TLS)"),
        "{printed}"
    );
    let conf = std::fs::read_to_string(state.join("config/tambo.conf")).unwrap();
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    assert!(conf.contains(&format!("smtpd_user = \"{me}\"")), "{conf}");
    // The port is bound before it is printed, so the connection waits in
    // the backlog until smtpd is up and greets.
    let mut c = Smtp::connect(smtp);
    c.expect("EHLO dev.example", 250);
    c.expect("MAIL FROM:<you@example.test>", 250);
    assert!(
        dns.query_count("example.test") > 0,
        "SPF asked the test's DNS"
    );
    c.expect("RCPT TO:<user@tambo.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("dev", "hello from the README\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    let new = state.join("mail/tambo.test/user/new");
    wait_for("the message in the dev Maildir", || {
        std::fs::read_dir(&new).ok()?.next().map(|_| ())
    });
    // The printed submission line, as a newcomer pastes it: accepted and
    // queued for the remote address (remote delivery comes later).
    let args: Vec<&str> = swaks_line.split_whitespace().collect();
    assert_eq!(args[0], "swaks", "{swaks_line}");
    let run = |args: &[&str]| {
        let out = Command::new(tool("swaks"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, said) = run(&args[1..]);
    assert!(ok, "{said}");
    assert!(said.contains("<~  235 2.7.0"), "{said}");
    let queue = state.join("data/queue");
    wait_for("the submitted message in the queue", || {
        std::fs::read_dir(&queue)
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("m:"))
            .find(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|s| s.contains("someone@example.com"))
            })
            .map(|_| ())
    });
    // The same without AUTH: refused at MAIL.
    let mut no_auth = Vec::new();
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match *a {
            "--auth" | "--auth-user" | "--auth-password" => {
                rest.next();
            }
            a => no_auth.push(a),
        }
    }
    assert!(no_auth.contains(&"--tls"), "{no_auth:?}");
    let (ok, said) = run(&no_auth);
    assert!(!ok, "{said}");
    assert!(said.contains("550 5.7.9 Authentication required"), "{said}");
    kill(Pid::from_raw(dev.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_for("tambo dev to stop", || dev.try_wait().unwrap());
    assert!(status.success(), "{status}");
}
