//! `tambo run`: starts the four daemons, restarts one that dies, and stops
//! them all on SIGTERM with exit status 0.

use std::fs::OpenOptions;
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use tambo_e2e::*;

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie still counts, so also check state.
    kill(Pid::from_raw(pid), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn child_pid(log: &str, daemon: &str) -> Option<i32> {
    let marker = format!("started {daemon} (pid ");
    let line = log.lines().rev().find(|l| l.contains(&marker))?;
    line[line.find(&marker)? + marker.len()..]
        .trim_end_matches(')')
        .parse()
        .ok()
}

#[test]
fn run_supervises_and_stops_cleanly() {
    let t = Tambo::default_setup();
    let log_path = t.log_path("tambo");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let mut sup = Command::new(bin_dir().join("tambo"))
        .arg("run")
        .arg("--config_dir")
        .arg(&t.config_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // The children log into the same file: wait for all four.
    for ready in [
        "smtpd listening on",
        "queued listening on",
        "connected to queued",
        "monitord listening on",
    ] {
        t.wait_log("tambo", ready);
    }
    let smtp: std::net::SocketAddr = {
        let line = t.wait_log("tambo", "smtpd listening on ");
        let rest = &line[line.find("smtpd listening on ").unwrap() + "smtpd listening on ".len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let send = |subject: &str| {
        let mut c = Smtp::connect(smtp);
        c.expect("EHLO client.test", 250);
        c.expect("MAIL FROM:<x@remote.example>", 250);
        c.expect("RCPT TO:<ann@example.test>", 250);
        c.expect("DATA", 354);
        c.send_raw(&message(subject, "x\r\n"));
        c.send_raw(b".\r\n");
        assert_eq!(c.reply().code, 250);
    };
    send("first");
    t.wait_maildir("ann", 1);

    // kill -9 deliverd: the supervisor notices and starts a new one.
    let old = wait_for("deliverd's pid", || {
        child_pid(&t.log("tambo"), "tambo-deliverd")
    });
    kill(Pid::from_raw(old), Signal::SIGKILL).unwrap();
    t.wait_log("tambo", "tambo-deliverd exited (signal: 9");
    let new = wait_for("a new deliverd", || {
        child_pid(&t.log("tambo"), "tambo-deliverd").filter(|p| *p != old)
    });
    assert_ne!(new, old);
    send("second");
    t.wait_maildir("ann", 2);

    let pids: Vec<i32> = [
        "tambo-monitord",
        "tambo-queued",
        "tambo-deliverd",
        "tambo-smtpd",
    ]
    .iter()
    .map(|d| child_pid(&t.log("tambo"), d).unwrap())
    .collect();
    kill(Pid::from_raw(sup.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_for("tambo run to exit", || sup.try_wait().unwrap());
    assert!(status.success(), "tambo run exited with {status}");
    for pid in pids {
        wait_for("every child to be gone", || (!alive(pid)).then_some(()));
    }
    assert!(t.log("tambo").contains("all daemons stopped"));
}
