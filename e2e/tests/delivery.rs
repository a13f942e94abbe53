//! Mail travels through the four real processes and lands in a Maildir.

use tambo_e2e::*;

#[test]
fn message_arrives_byte_exact_with_received_header() {
    let mut t = Tambo::default_setup();
    t.start_all();
    // Dot-stuffed line, long line, 8-bit bytes, trailing spaces: all must
    // come through unchanged.
    let mut body = message("exact", "line one\r\n");
    body.extend_from_slice(b"..leading dot\r\n");
    body.extend_from_slice(&[b'x'; 3000]);
    body.extend_from_slice(b"\r\n\xc3\xb1and\xc3\xba  \r\n\r\nlast\r\n");
    let r = t.send("someone@remote.example", &["ann@example.test"], &body);
    assert_eq!(r.code, 250, "{r:?}");
    assert!(r.text().starts_with("2.0.0 Queued as "), "{r:?}");
    let msgs = t.wait_maildir("ann", 1);
    let got = &msgs[0];
    let split = find(got, b"\r\nFrom: ann@").expect("original headers after Received") + 2;
    let (received, rest) = got.split_at(split);
    let received = String::from_utf8_lossy(received);
    // Authentication-Results, Received-SPF (remote.example has no SPF
    // record), then Received.
    assert!(
        received.starts_with("Authentication-Results: "),
        "{received}"
    );
    assert!(received.contains("\r\nReceived-SPF: none "), "{received}");
    let received = &received[received.find("\r\nReceived: ").expect("Received") + 2..];
    assert!(received.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mx.example.test (tambo) with ESMTP\r\n"), "{received}");
    assert!(
        received.contains("envelope from \"someone@remote.example\""),
        "{received}"
    );
    assert!(
        !received.contains("ann@example.test"),
        "Received must not name recipients"
    );
    let mut expected = body.clone();
    // Unstuffing: "..leading dot" arrives as ".leading dot".
    let pos = find(&expected, b"..leading").unwrap();
    expected.remove(pos);
    assert_eq!(rest, &expected[..]);
    t.wait_queue_empty();
}

#[test]
fn aliases_expand_and_postmaster_works() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let r = t.send(
        "x@remote.example",
        &["team@example.test", "Postmaster@EXAMPLE.test"],
        &message("alias", "hi\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    // team → ann, bob; postmaster → ann. ann gets one copy per RCPT.
    assert_eq!(t.wait_maildir("bob", 1).len(), 1);
    t.wait_queue_empty();
    assert_eq!(t.maildir("ann").len(), 2);
}

#[test]
fn unknown_user_is_refused_with_550() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    let r = c.expect("RCPT TO:<nobody@example.test>", 550);
    assert!(r.text().starts_with("5.1.1 "), "{r:?}");
    // A suffix and drop characters still find ann.
    c.expect("RCPT TO:<A.n.n+news@example.test>", 250);
}

#[test]
fn relaying_is_denied_without_authentication() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<ann@example.test>", 250);
    let r = c.expect("RCPT TO:<victim@elsewhere.example>", 503);
    assert!(r.text().starts_with("5.7.1 "), "{r:?}");
    c.expect("DATA", 503);
}

#[test]
fn twenty_mib_message_streams_without_smtpd_buffering_it() {
    let mut t = Tambo::default_setup();
    t.start_all();
    // Warm up: one small message so the session machinery is paged in.
    assert_eq!(
        t.send(
            "a@remote.example",
            &["bob@example.test"],
            &message("warm", "x\r\n")
        )
        .code,
        250
    );
    let pid = t.pid("smtpd");
    let before = peak_rss_kib(pid);
    let mut body = message("big", "");
    let line = [b'a'; 1022];
    while body.len() < 20 * 1024 * 1024 {
        body.extend_from_slice(&line);
        body.extend_from_slice(b"\r\n");
    }
    let r = t.send("a@remote.example", &["ann@example.test"], &body);
    assert_eq!(r.code, 250, "{r:?}");
    let after = peak_rss_kib(pid);
    let growth = after.saturating_sub(before);
    eprintln!("smtpd peak RSS: {before} KiB before, {after} KiB after a 20 MiB message");
    assert!(
        growth < 8 * 1024,
        "smtpd peak RSS grew by {growth} KiB for a 20 MiB message"
    );
    let msgs = t.wait_maildir("ann", 1);
    assert!(msgs[0].ends_with(&body), "the big message arrives intact");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn idle_client_gets_421_and_is_disconnected() {
    let mut t = Tambo::new("", "", "smtp_command_timeout = \"300ms\"\n");
    t.start_all();
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    // Say nothing: the server gives up on us.
    let r = c.reply();
    assert_eq!(r.code, 421, "{r:?}");
    assert!(r.text().starts_with("4.4.2 "), "{r:?}");
    assert!(c.is_closed());
}

#[test]
fn smtpd_without_queued_answers_421_at_mail() {
    let mut t = Tambo::default_setup();
    t.start("monitord");
    t.start("smtpd");
    // Greeting and EHLO need no queued: smtpd reaches it at the first MAIL.
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    let r = c.expect("MAIL FROM:<x@remote.example>", 421);
    assert!(r.text().starts_with("4.3.0 "), "{r:?}");
    assert!(c.is_closed());
    // Once queued is up, sessions work without restarting smtpd.
    t.start("queued");
    t.start("deliverd");
    assert_eq!(
        t.send(
            "x@remote.example",
            &["ann@example.test"],
            &message("late", "x\r\n")
        )
        .code,
        250
    );
}

#[test]
fn a_client_that_never_reads_is_disconnected() {
    use std::io::Write;
    let mut t = Tambo::new("", "", "smtp_command_timeout = \"300ms\"\n");
    t.start_all();
    let s = std::net::TcpStream::connect(t.smtp_addr()).unwrap();
    // Without the fix this would block for ever; fail clearly instead.
    s.set_write_timeout(Some(WAIT)).unwrap();
    // Pipelined NOOPs, never reading a reply: once the replies fill the
    // socket buffers, the server must give up rather than wait forever.
    let chunk = "NOOP\r\n".repeat(10_000);
    let mut w = s.try_clone().unwrap();
    let closed = wait_for("the server to drop a client that does not read", || {
        w.write_all(chunk.as_bytes()).err()
    });
    assert!(
        matches!(
            closed.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{closed}"
    );
}
