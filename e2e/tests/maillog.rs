//! The mail log (REFERENCE §8): one file for the whole system, written by
//! queued with smtpd's events; each line's format; fail2ban's own tool
//! (`fail2ban-regex`, Debian `fail2ban`) with the filter tambo ships,
//! counting exactly the lines an abuser causes; reopened on SIGHUP after a
//! rotation.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tambo_e2e::tls::{TlsSmtp, Versions, plain};
use tambo_e2e::*;

/// The shipped filter, installed as the package installs it: in a
/// `filter.d` beside fail2ban's own `common.conf`, which it includes.
fn filter(dir: &Path) -> PathBuf {
    let d = dir.join("filter.d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fail2ban/filter.d/tambo.conf"),
        d.join("tambo.conf"),
    )
    .unwrap();
    std::fs::copy("/etc/fail2ban/filter.d/common.conf", d.join("common.conf"))
        .expect("fail2ban's common.conf (Debian fail2ban, which scripts/test.sh installs)");
    d.join("tambo.conf")
}

/// fail2ban-regex -v on `log` with the shipped filter: its report.
fn fail2ban_regex(log: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("fail2ban-regex")
        .arg("-v")
        .arg(log)
        .arg(filter(dir.path()))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// The addresses fail2ban-regex found, one per matched line.
fn hits(report: &str) -> Vec<String> {
    report
        .lines()
        .filter_map(|l| {
            let w = l.trim_start_matches('|').trim_start();
            let first = w.split_whitespace().next()?;
            (first.parse::<std::net::IpAddr>().is_ok() && w.len() > first.len())
                .then(|| first.to_string())
        })
        .collect()
}

#[test]
fn the_filter_reads_syslog_and_journal_lines_and_skips_deferrals() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("syslog");
    std::fs::write(
        &log,
        "Dec  1 22:41:01 mx tambo[123]: [2001:db8::1]:25 error GET 502 This is an SMTP server, not an HTTP server\n\
         Dec  1 22:41:02 mx tambo: 192.0.2.9:2525 rejected from=a@b.example to=[c@d.example] - Relaying not allowed\n\
         Dec  1 22:41:03 mx tambo[123]: 192.0.2.10:2525 auth failed for ann@example.org\n\
         Dec  1 22:41:04 mx tambo[123]: 192.0.2.11:2525 deferred from=a@b.example to=[c@d.example] - Temporary error checking address\n\
         Dec  1 22:41:05 mx tambo[123]: abc from=a@b.example queued ip=192.0.2.12:1 to=[c@d.example]\n",
    )
    .unwrap();
    let report = fail2ban_regex(&log);
    assert!(
        report.contains("Lines: 5 lines, 0 ignored, 3 matched, 2 missed"),
        "{report}"
    );
    assert_eq!(
        hits(&report),
        ["2001:db8::1", "192.0.2.9", "192.0.2.10"],
        "{report}"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `path` has a line containing every one of `needles`.
fn wait_line(path: &Path, needles: &[&str]) -> String {
    wait_for(
        &format!("a line with {needles:?} in {}", path.display()),
        || {
            read(path)
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
        },
    )
}

/// The line without its time stamp, which must be local time with
/// microseconds: `YYYY-MM-DD HH:MM:SS.ffffff `.
fn body(line: &str) -> &str {
    let (date, rest) = line.split_at(27);
    let b = date.as_bytes();
    let digits = [
        0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22, 23, 24, 25,
    ];
    assert!(
        digits.iter().all(|&i| b[i].is_ascii_digit())
            && (b[4], b[7], b[10], b[13], b[16], b[19], b[26])
                == (b'-', b'-', b' ', b':', b':', b'.', b' '),
        "{line}"
    );
    rest
}

#[test]
fn one_log_for_the_whole_system_that_fail2ban_reads() {
    let mut t = Tambo::new("mail_log_path = \"maillog/mail.log\"\n", "", "");
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    let log = t.config_dir.join("maillog/mail.log");

    let l = wait_line(&log, &["smtpd listening for SMTP on 127.0.0.1:"]);
    assert!(body(&l).starts_with("smtpd listening for SMTP on "), "{l}");

    // A message in, and out: queued, sent, all done.
    assert_eq!(
        t.send(
            "Someone@remote.test",
            &["ann@example.test"],
            &message("m1", "hi\r\n")
        )
        .code,
        250
    );
    t.wait_maildir("ann", 1);
    let queued = wait_line(&log, &[" queued ip=127.0.0.1:"]);
    let id = body(&queued).split(' ').next().unwrap().to_string();
    assert!(
        body(&queued).starts_with(&format!(
            "{id} from=Someone@remote.test queued ip=127.0.0.1:"
        )) && queued.ends_with(" to=[ann@example.test]"),
        "{queued}"
    );
    let sent = wait_line(&log, &[&id, " sent"]);
    assert_eq!(
        body(&sent),
        format!("{id} from=Someone@remote.test to=ann@example.test sent")
    );
    let done = wait_line(&log, &[&id, " all done"]);
    assert_eq!(
        body(&done),
        format!("{id} from=Someone@remote.test all done")
    );

    // What an abuser causes: relaying, an unknown user, then a third
    // error (too many), HTTP on the SMTP port, a wrong password.
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<spam@remote.test>", 250);
    c.expect("RCPT TO:<victim@elsewhere.test>", 503);
    c.expect("RCPT TO:<nobody@example.test>", 550);
    c.expect("FOO", 421);
    let mut h = t.smtp();
    h.send_raw(b"GET / HTTP/1.1\r\n");
    assert_eq!(h.reply().code, 502);
    let mut a =
        TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Any).unwrap();
    a.expect("EHLO client.test", 250);
    a.expect(
        &format!("AUTH PLAIN {}", plain("ann@example.test", "wrong")),
        535,
    );

    let relay = wait_line(&log, &[" rejected ", "victim@"]);
    assert!(
        body(&relay).starts_with("127.0.0.1:")
            && relay.ends_with(
                " rejected from=spam@remote.test to=[victim@elsewhere.test] - Relaying not allowed"
            ),
        "{relay}"
    );
    let unknown = wait_line(&log, &[" rejected ", "nobody@"]);
    assert!(
        unknown.contains(" rejected from=spam@remote.test to=[nobody@example.test] - "),
        "{unknown}"
    );
    let many = wait_line(&log, &[" error unknown 421 "]);
    assert!(
        many.ends_with(" error unknown 421 Too many errors, closing"),
        "{many}"
    );
    let http = wait_line(&log, &[" error GET 502 "]);
    assert!(body(&http).starts_with("127.0.0.1:"), "{http}");
    let auth = wait_line(&log, &[" auth failed for ann@example.test"]);
    assert!(body(&auth).starts_with("127.0.0.1:"), "{auth}");

    // Every line is one whole line, in one stream.
    let text = read(&log);
    for line in text.lines() {
        body(line);
    }
    let abusive = text
        .lines()
        .filter(|l| {
            [" auth failed ", " rejected ", " error "]
                .iter()
                .any(|w| body(l).contains(w))
        })
        .count();
    assert_eq!(abusive, 5, "{text}");

    // fail2ban's own reader, with the shipped filter: exactly those lines,
    // each for the client's address; none of the others.
    let report = fail2ban_regex(&log);
    let total = text.lines().count();
    assert!(
        report.contains(&format!(
            "Lines: {total} lines, 0 ignored, {abusive} matched, {} missed",
            total - abusive
        )),
        "{report}\n{text}"
    );
    let found = hits(&report);
    assert_eq!(found.len(), abusive, "{report}");
    assert!(found.iter().all(|a| a == "127.0.0.1"), "{report}");

    // A rotation: the file moves away, SIGHUP, and the next line is in a
    // new file at the configured path.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    kill(Pid::from_raw(t.pid("queued") as i32), Signal::SIGHUP).unwrap();
    t.wait_log("queued", "SIGHUP: users and aliases reloaded");
    assert_eq!(
        t.send(
            "after@remote.test",
            &["ann@example.test"],
            &message("m2", "hi\r\n")
        )
        .code,
        250
    );
    wait_line(&log, &["from=after@remote.test queued"]);
    assert!(!read(&rotated).contains("after@remote.test"));
}

#[test]
fn a_mail_log_that_cannot_be_opened_stops_startup_with_one_line() {
    let t = Tambo::new(
        "mail_log_path = \"users-file-is-no-dir/mail.log\"\n",
        "",
        "",
    );
    std::fs::write(t.config_dir.join("users-file-is-no-dir"), "a file").unwrap();
    let out = Command::new(bin_dir().join("tambo-queued"))
        .arg("--config_dir")
        .arg(&t.config_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("mail_log_path: cannot open ")
            && err.contains("users-file-is-no-dir/mail.log"),
        "{err}"
    );
}

/// A log link as a compromised smtpd could use it: forged line breaks are
/// escaped, a flood is cut to its budget and counted, and anything but an
/// event closes the link; another role may not open one.
#[tokio::test(flavor = "current_thread")]
async fn a_hostile_log_link_writes_no_forged_line_and_no_flood() {
    use tambo_proto::frame::write_frame;
    use tambo_proto::submit::{MailLogEvent, SubmitRequest};
    use tambo_proto::{Role, hello};
    let mut t = Tambo::new("mail_log_path = \"maillog/mail.log\"\n", "", "");
    t.start("monitord");
    t.start("queued");
    let log = t.config_dir.join("maillog/mail.log");
    let socket = t.run_dir.join("submit.sock");

    let mut s = hello::connect(&socket, Role::Smtpd, Role::Queued, &ids())
        .await
        .unwrap();
    write_frame(&mut s, &SubmitRequest::LogLink).await.unwrap();
    let forged = MailLogEvent::Auth {
        client: "198.51.100.1:1".into(),
        user: "x\n2026-01-01 00:00:00.000000 192.0.2.99:1 auth failed for y".into(),
        ok: false,
    };
    write_frame(&mut s, &SubmitRequest::Log(forged))
        .await
        .unwrap();
    // Long lines: the budget is in bytes, 4 MiB at once, shared by every
    // log link.
    let noise = |i: usize| MailLogEvent::Error {
        client: "198.51.100.2:2".into(),
        verb: "unknown".into(),
        code: 500,
        reason: format!("flood {i} {}", "x".repeat(240)),
    };
    const SENT: usize = 30_000;
    for i in 0..SENT {
        write_frame(&mut s, &SubmitRequest::Log(noise(i)))
            .await
            .unwrap();
    }
    // Not an event: the link is closed.
    write_frame(&mut s, &SubmitRequest::Rset).await.unwrap();
    assert!(closed_by_peer(&mut s).await);

    wait_line(&log, &["198.51.100.1:1 auth failed for x\\n2026-01-01"]);
    // Every line is either written or counted as dropped: wait until the
    // writer has caught up with all of them.
    let flood = || read(&log).lines().filter(|l| l.contains(" flood ")).count();
    let (written, dropped) = wait_for("every flood line written or dropped", || {
        let dropped = t.vars()["tambo/maillog/dropped"].as_u64().unwrap_or(0) as usize;
        let written = flood();
        (written + dropped == SENT).then_some((written, dropped))
    });
    assert!(
        dropped > 0 && written > 10_000,
        "{written} written, {dropped} dropped"
    );
    let text = read(&log);
    assert!(
        !text.contains("\n2026-01-01 00:00:00.000000 192.0.2.99"),
        "{text}"
    );

    // Only smtpd speaks on a log link (a local client, the other role
    // submit.sock takes, may not write the mail log).
    let mut d = hello::connect(&socket, Role::Ctl, Role::Queued, &ids())
        .await
        .unwrap();
    write_frame(&mut d, &SubmitRequest::LogLink).await.unwrap();
    let _ = write_frame(&mut d, &SubmitRequest::Log(noise(99_999))).await;
    assert!(closed_by_peer(&mut d).await);
    assert!(!read(&log).contains("flood 99999"));
}
