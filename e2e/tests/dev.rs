//! `tambo dev`, as a newcomer runs it: it writes its config, binds the
//! ports it prints, and a message sent to the printed address lands in the
//! printed Maildir. It uses the fixed dev ports (127.0.0.1:2525, :1099),
//! as the README's command does.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use tambo_e2e::*;

#[test]
fn tambo_dev_runs_and_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut dev = Command::new(bin_dir().join("tambo"))
        .arg("dev")
        .arg("--state_dir")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    c.expect("MAIL FROM:<you@example.net>", 250);
    c.expect("RCPT TO:<user@tambo.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("dev", "hello from the README\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    let new = state.join("mail/tambo.test/user/new");
    wait_for("the message in the dev Maildir", || {
        std::fs::read_dir(&new).ok()?.next().map(|_| ())
    });
    kill(Pid::from_raw(dev.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_for("tambo dev to stop", || dev.try_wait().unwrap());
    assert!(status.success(), "{status}");
}
