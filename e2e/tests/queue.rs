//! Durability, retries and DSNs, with the real processes.

use std::os::unix::fs::PermissionsExt;

use tambo_e2e::*;

#[test]
fn queued_message_survives_kill_9_and_is_delivered_once() {
    let mut t = Tambo::default_setup();
    t.start("monitord");
    t.start("queued");
    t.start("smtpd");
    // No deliverd: the message must wait on disk.
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("durable", "keep me\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let id = r.text().rsplit(' ').next().unwrap().to_string();
    // One file, its item on it (and an m: once a failed attempt rewrote
    // it).
    assert!(t.queue_files().contains(&format!("d:{id}")));
    assert_eq!(t.queue_items().len(), 1);
    assert_eq!(t.queue_items()[0]["id"], id.as_str());
    // Counters of a killed process are lost if not yet pushed (at most
    // half a second's worth); wait for this one before killing.
    t.wait_var("the put counted", |v| v["chasquid/queue/putCount"] == 1);
    t.kill9("queued");
    assert_eq!(
        t.queue_items().len(),
        1,
        "the item is still on disk after kill -9"
    );
    t.start("queued");
    t.wait_log("queued", "queue loaded: 1 items");
    t.start("deliverd");
    let msgs = t.wait_maildir("ann", 1);
    assert!(String::from_utf8_lossy(&msgs[0]).contains("keep me"));
    t.wait_queue_empty();
    // The item is gone, so nothing can deliver it again.
    assert_eq!(t.maildir("ann").len(), 1);
    let v = t.wait_var("one local attempt", |v| {
        v["chasquid/queue/deliverAttempts"]["email:local"] == 1
    });
    assert_eq!(v["chasquid/queue/putCount"], 1);
}

#[test]
fn the_item_on_a_body_never_reaches_the_maildir() {
    // A new message's item (every recipient, the client) is an
    // attribute of its queue file: what the Maildir writer delivers is
    // the message alone, and carries no attribute of the queue's. (An
    // MDA gets the queue file itself on its stdin; under privilege
    // separation it cannot read the attribute, which is queued's:
    // docs/design-notes.md, "Queue layout".)
    let mut t = Tambo::default_setup();
    t.start_all();
    let r = t.send(
        "x@remote.example",
        &["ann@example.test", "bob@example.test"],
        &message("bcc", "hello\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    for user in ["ann", "bob"] {
        let msgs = t.wait_maildir(user, 1);
        let text = String::from_utf8_lossy(&msgs[0]);
        assert!(text.contains("hello"), "{text}");
        assert!(
            !text.contains("rcpt_to") && !text.contains("body_len"),
            "{text}"
        );
        let new = t.mail_dir.join(DOMAIN).join(user).join("new");
        for f in std::fs::read_dir(new).unwrap() {
            let mut buf = [0u8; 4096];
            let attr = rustix::fs::getxattr(f.unwrap().path(), "user.tambo.item", &mut buf[..]);
            assert_eq!(attr, Err(rustix::io::Errno::NODATA), "{user}");
        }
    }
}

/// Writes an MDA script into the config dir.
fn mda(t: &Tambo, script: &str) -> String {
    let path = t.config_dir.join("mda.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{script}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn mda_setup(script_for: impl Fn(&Tambo) -> String) -> Tambo {
    // The MDA is configured instead of tambo's Maildir writer.
    let probe = Tambo::new("", "maildir = \"\"", "");
    let script = script_for(&probe);
    let conf = probe.config_dir.join("tambo.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let text = text.replacen(
        "[tambo]",
        &format!("mail_delivery_agent_bin = \"{script}\"\nmail_delivery_agent_args = [\"%from%\", \"%to_user%\"]\n[tambo]"),
        1,
    );
    std::fs::write(&conf, text).unwrap();
    probe
}

#[test]
fn temporary_mda_failure_is_retried() {
    let mut t = mda_setup(|t| {
        let root = t.mail_dir.display().to_string();
        mda(
            t,
            &format!(
                "mkdir -p {root}
# Fail the first attempt with EX_TEMPFAIL, deliver the second.
if [ ! -e {root}/tried ]; then touch {root}/tried; echo try later; exit 75; fi
# Write, then rename: the test may look at any moment.
cat > {root}/.$2.tmp && mv {root}/.$2.tmp {root}/$2.delivered\n"
            ),
        )
    });
    t.start_all();
    assert_eq!(
        t.send(
            "x@remote.example",
            &["ann@example.test"],
            &message("retry", "again\r\n")
        )
        .code,
        250
    );
    let delivered = t.mail_dir.join("ann.delivered");
    wait_for("the retried delivery", || delivered.exists().then_some(()));
    t.wait_queue_empty();
    let v = t.wait_var("two attempts", |v| {
        v["chasquid/queue/deliverAttempts"]["email:local"] == 2
    });
    assert_eq!(v["chasquid/queue/dsnQueued"], 0);
    assert!(t.log("queued").contains("failed (temporary)"));
    // CRLF line ends on the MDA's stdin (REFERENCE §4.2).
    assert!(
        String::from_utf8_lossy(&std::fs::read(delivered).unwrap()).contains("Subject: retry\r\n")
    );
}

#[test]
fn permanent_mda_failure_sends_a_dsn_to_the_sender() {
    let mut t = mda_setup(|t| {
        let root = t.mail_dir.display().to_string();
        mda(
            t,
            &format!(
                "mkdir -p {root}/$2/new
if [ \"$2\" = bob ]; then echo 'mailbox disabled by policy' >&2; exit 1; fi
cat > {root}/$2/.$$.tmp && mv {root}/$2/.$$.tmp {root}/$2/new/$$.msg\n"
            ),
        )
    });
    t.start_all();
    let r = t.send(
        "ann@example.test",
        &["bob@example.test"],
        &message("bounce", "will bounce\r\n"),
    );
    assert_eq!(r.code, 250);
    let dsn = wait_for("the DSN in ann's mailbox", || {
        let dir = t.mail_dir.join("ann/new");
        let f = std::fs::read_dir(&dir).ok()?.next()?.ok()?;
        Some(std::fs::read_to_string(f.path()).unwrap())
    });
    assert!(
        dsn.contains("Content-Type: multipart/report; report-type=delivery-status"),
        "{dsn}"
    );
    assert!(
        dsn.contains("X-Failed-Recipients: bob@example.test"),
        "{dsn}"
    );
    assert!(
        dsn.contains("mailbox disabled by policy"),
        "the MDA's output is in the DSN: {dsn}"
    );
    assert!(dsn.contains("In-Reply-To: <bounce@client.test>"), "{dsn}");
    assert!(dsn.contains("Subject: bounce"), "the original is attached");
    t.wait_queue_empty();
    // Two puts: the message and its DSN.
    t.wait_var("one DSN", |v| {
        v["chasquid/queue/dsnQueued"] == 1 && v["chasquid/queue/putCount"] == 2
    });
}

#[test]
fn undeliverable_dsn_to_null_sender_is_not_bounced() {
    let mut t = mda_setup(|t| mda(t, "echo nope; exit 1\n"));
    t.start_all();
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<>", 250);
    c.expect("RCPT TO:<bob@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("nullsender", "x\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    t.wait_log("queued", "all done");
    t.wait_queue_empty();
    let v = t.vars();
    assert_eq!(v["chasquid/queue/dsnQueued"], 0);
}

#[test]
fn gives_up_after_the_deadline_with_a_dsn() {
    let mut t = Tambo::new("give_up_send_after = \"1s\"", "", "");
    // A pipe alias that always fails temporarily keeps the item pending
    // until the deadline.
    let script = t.config_dir.join("fail.sh");
    std::fs::write(&script, "#!/bin/sh\ncat >/dev/null; echo busy; exit 75\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        t.config_dir.join("domains/example.test/aliases"),
        format!("slow: | {}\n", script.display()),
    )
    .unwrap();
    t.start_all();
    let r = t.send(
        "ann@example.test",
        &["slow@example.test"],
        &message("timeout", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let dsn = t.wait_maildir("ann", 1);
    let dsn = String::from_utf8_lossy(&dsn[0]);
    assert!(dsn.contains("timed out"), "{dsn}");
    assert!(dsn.contains("Status: 4.0.0"), "{dsn}");
    assert!(
        dsn.contains("Original-Recipient: rfc822; slow@example.test"),
        "{dsn}"
    );
    assert!(
        !dsn.contains(&script.display().to_string()),
        "the pipe command is not shown to the sender"
    );
    t.wait_queue_empty();
    t.wait_var("pipe attempts and the DSN", |v| {
        v["chasquid/queue/deliverAttempts"]["pipe"].as_u64() >= Some(2)
            && v["chasquid/queue/dsnQueued"] == 1
    });
}

#[test]
fn full_queue_answers_451() {
    let mut t = Tambo::new("max_queue_items = 1", "", "");
    t.start("monitord");
    t.start("queued");
    t.start("smtpd");
    assert_eq!(
        t.send(
            "x@remote.example",
            &["ann@example.test"],
            &message("one", "x\r\n")
        )
        .code,
        250
    );
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    // The refusal comes after the body, as chasquid's does: smtpd does
    // not wait for queued's answer to DATA before its 354.
    c.expect("DATA", 354);
    c.send_raw(b"Subject: two\r\n\r\nx\r\n.\r\n");
    let r = c.reply();
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().starts_with("4.3.0 "), "{r:?}");
    assert_eq!(t.queue_items().len(), 1, "only the first message is queued");
    // The final reply to the message cleared the envelope; the session
    // goes on.
    c.expect("DATA", 503);
    c.expect("NOOP", 250);
}

#[test]
fn disk_write_failure_answers_451_never_250() {
    let mut t = Tambo::new("", "", "fail_queue_writes = true\n");
    t.start_all();
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: x\r\n\r\nx\r\n.\r\n");
    let r = c.reply();
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().starts_with("4.3.0 "), "{r:?}");
    assert!(t.queue_files().is_empty(), "nothing half-written is left");
    // The session goes on.
    c.expect("NOOP", 250);
}

#[test]
fn clients_stalled_in_data_do_not_fill_the_queue() {
    let mut t = Tambo::new("max_queue_items = 1", "", "");
    t.start("monitord");
    t.start("queued");
    t.start("smtpd");
    // A client stops in the middle of DATA, holding a reservation.
    let mut stalled = t.smtp();
    stalled.expect("EHLO client.test", 250);
    stalled.expect("MAIL FROM:<x@remote.example>", 250);
    stalled.expect("RCPT TO:<ann@example.test>", 250);
    stalled.expect("DATA", 354);
    stalled.send_raw(b"Subject: slow\r\n");
    // Others still get in: reservations do not count toward the limit.
    assert_eq!(
        t.send(
            "y@remote.example",
            &["bob@example.test"],
            &message("fast", "x\r\n")
        )
        .code,
        250
    );
    // The queue is now full (deliverd is not running): the stalled message
    // is refused when it completes, and leaves nothing behind.
    stalled.send_raw(b"\r\nbody\r\n.\r\n");
    let r = stalled.reply();
    assert_eq!(r.code, 451, "{r:?}");
    assert_eq!(
        t.queue_items().len(),
        1,
        "only the fast message is queued: {:?}",
        t.queue_files()
    );
    assert_eq!(t.queue_items()[0]["rcpt_to"][0], "bob@example.test");
}

#[test]
fn a_dead_supervisor_takes_its_daemons_with_it() {
    use std::process::{Command, Stdio};
    let t = Tambo::default_setup();
    let log = std::fs::File::create(t.log_path("tambo")).unwrap();
    let mut sup = Command::new(bin_dir().join("tambo"))
        .args(["run", "--config_dir"])
        .arg(&t.config_dir)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    t.wait_log("tambo", "smtpd listening on");
    let pid_of = |d: &str| -> i32 {
        let log = t.log("tambo");
        let m = format!("started {d} (pid ");
        let l = log.lines().find(|l| l.contains(&m)).unwrap();
        l[l.find(&m).unwrap() + m.len()..]
            .trim_end_matches(')')
            .parse()
            .unwrap()
    };
    let queued = pid_of("tambo-queued");
    sup.kill().unwrap();
    sup.wait().unwrap();
    wait_for("queued to stop with its supervisor", || {
        let stat = std::fs::read_to_string(format!("/proc/{queued}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    });
}
