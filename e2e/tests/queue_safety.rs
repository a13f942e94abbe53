//! The queue has one owner, and a disk that misbehaves stops new mail
//! rather than losing it.

use std::process::{Command, Stdio};

use tambo_e2e::*;

#[test]
fn a_second_queued_refuses_to_start_and_loses_nothing() {
    let mut t = Tambo::default_setup();
    t.start_all();
    // A message in the middle of DATA: its body file exists (it is too
    // big to be held in memory), its item not yet. A second queued that
    // cleaned "orphans" would delete it.
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    // Several chunks more than queued holds in memory (128 KiB).
    let first_half = format!("first half\r\n{}", "x".repeat(70) + "\r\n").repeat(4000);
    c.send_raw(&message("in flight", &first_half));
    wait_for("the body file", || {
        t.queue_files()
            .iter()
            .any(|f| f.starts_with("d:"))
            .then_some(())
    });
    let out = Command::new(bin_dir().join("tambo-queued"))
        .arg("--config_dir")
        .arg(&t.config_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second queued must not run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another queued owns the queue"), "{err}");
    assert!(
        err.contains(&format!("(pid {})", t.pid("queued"))),
        "names the owner: {err}"
    );
    assert!(
        t.queue_files().iter().any(|f| f.starts_with("d:")),
        "the body in flight is still there"
    );
    c.send_raw(b"second half\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    let msgs = t.wait_maildir("ann", 1);
    let s = String::from_utf8_lossy(&msgs[0]);
    assert!(s.contains(&format!("{first_half}second half")), "{s}");
}

#[test]
fn a_failed_directory_fsync_stops_new_mail_until_restart() {
    let mut t = Tambo::new("", "", "fail_dir_sync_if_exists = \"failsync\"\n");
    t.start_all();
    // The knob is relative to the config dir.
    let trigger = t.config_dir.join("failsync");
    std::fs::write(&trigger, b"").unwrap();
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("one", "x\r\n"),
    );
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().starts_with("4.3.0 "), "{r:?}");
    // The client learns nothing of the internals.
    assert!(
        !r.text().contains("fsync") && !r.text().contains("testing"),
        "{r:?}"
    );
    t.wait_log("queued", "refusing new mail until queued restarts");
    // The disk looks fine again, but what the kernel lost is unknown: still
    // refused.
    std::fs::remove_file(&trigger).unwrap();
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    // Refused as soon as queued hears of it (its answer to DATA), given
    // once the body is read.
    c.expect("DATA", 354);
    c.send_raw(b"Subject: two\r\n\r\nx\r\n.\r\n");
    let r = c.reply();
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().starts_with("4.3.0 "), "{r:?}");
    t.wait_log("smtpd", "queue refused the message at DATA");
    drop(c);
    // A restart re-reads the queue from disk and takes mail again.
    t.stop("queued");
    t.start("queued");
    wait_for("mail to be taken again", || {
        let r = t.send(
            "x@remote.example",
            &["ann@example.test"],
            &message("three", "x\r\n"),
        );
        (r.code == 250).then_some(())
    });
    let msgs = t.wait_maildir("ann", 1);
    assert!(String::from_utf8_lossy(&msgs[0]).contains("Subject: three"));
    assert_eq!(t.maildir("ann").len(), 1, "the refused ones never arrive");
}

#[test]
fn unreadable_items_are_counted_kept_and_removable() {
    let mut t = Tambo::default_setup();
    let queue = t.data_dir.join("queue");
    std::fs::create_dir_all(&queue).unwrap();
    // Not an item (not even JSON): kept for the operator.
    std::fs::write(queue.join("m:brokenitem1"), b"{ not json").unwrap();
    std::fs::write(queue.join("d:brokenitem1"), b"Subject: x\r\n\r\nbody\r\n").unwrap();
    // The start of a new item a crash cut short (a JSON object that
    // stops): its message never got a 250, so it goes, body and all.
    std::fs::write(
        queue.join("m:cutshort123"),
        b"{\n  \"version\": 1,\n  \"id\": \"cut",
    )
    .unwrap();
    std::fs::write(queue.join("d:cutshort123"), b"Subject: y\r\n\r\nbody\r\n").unwrap();
    // A whole item beside a body shorter than it records: the two are
    // fsync'd at once, and the crash came before the body was durable.
    std::fs::write(
        queue.join("m:shortbody12"),
        br#"{"version": 1, "id": "shortbody12", "from": "", "rcpt_to": ["ann@example.test"],
            "created_ms": 1, "client": "local", "recipients": [], "body_len": 4096}"#,
    )
    .unwrap();
    std::fs::write(queue.join("d:shortbody12"), b"Subject: z\r\n\r\nbo").unwrap();
    // A body with no item at all: a crash's leftover, or a message whose
    // item a copy dropped. Set aside, never deleted.
    std::fs::write(queue.join("d:orphanbody1"), b"Subject: o\r\n\r\nbody\r\n").unwrap();
    t.start_all();
    t.wait_log("queued", "1 bodies without an item set aside");
    assert_eq!(
        std::fs::read(queue.join("orphans").join("d:orphanbody1")).unwrap(),
        b"Subject: o\r\n\r\nbody\r\n"
    );
    t.wait_log("queued", "unreadable queue item");
    t.wait_log("queued", "2 unfinished new items removed");
    t.wait_log(
        "queued",
        "m:shortbody12: an item whose body is 16 bytes of the 4096",
    );
    t.wait_var("the unreadable item counted", |v| {
        v["tambo/queue/unreadableItems"] == 1
    });
    assert_eq!(t.queue_files(), ["d:brokenitem1", "m:brokenitem1"]);
    // Mail still flows.
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("ok", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_maildir("ann", 1);
    // The operator removes it (docs/operations.md); a restart finds
    // nothing more to report.
    std::fs::remove_file(queue.join("m:brokenitem1")).unwrap();
    std::fs::remove_file(queue.join("d:brokenitem1")).unwrap();
    t.stop("queued");
    t.start("queued");
    t.wait_log("queued", "queue loaded: 0 items, 0 unreadable");
    t.wait_queue_empty();
}
