//! The header section check of DATA (REFERENCE §2.8 step 2): a message
//! whose header section does not parse is refused with 554 5.6.0 after the
//! whole of it was read, nothing of it is kept, and the session goes on
//! with its envelope cleared. 8-bit values, a message of headers only and
//! an empty message are fine.

use tambo_e2e::*;

/// Sends `body` (CRLF ended, not dot-stuffed) to ann in a transaction on
/// `c`; the final reply.
fn transaction(c: &mut Smtp, body: &[u8]) -> Reply {
    c.expect("MAIL FROM:<a@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(body);
    c.send_raw(b".\r\n");
    c.reply()
}

fn session(t: &Tambo) -> Smtp {
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c
}

#[test]
fn a_body_without_headers_is_refused_and_the_session_goes_on() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let mut c = session(&t);
    // A body without a header section, long enough to span many reads:
    // all of it is read before the reply.
    let mut body = b"hello, no headers here\r\n".to_vec();
    for _ in 0..20_000 {
        body.extend_from_slice(b"more body text, and MAIL FROM:<x@y> too\r\n");
    }
    let r = transaction(&mut c, &body);
    assert_eq!(r.code, 554, "{r:?}");
    assert_eq!(
        r.text(),
        "5.6.0 Unparseable message: header line 1 has no colon"
    );
    // The envelope went with it.
    c.expect("RCPT TO:<ann@example.test>", 503);
    // The next message is fine.
    let r = transaction(&mut c, &message("good", "after a bad one\r\n"));
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221);
    let msgs = t.wait_maildir("ann", 1);
    t.wait_queue_empty();
    let all = t.maildir("ann");
    assert_eq!(all.len(), 1, "the refused message was kept");
    assert!(
        String::from_utf8_lossy(&msgs[0]).contains("Subject: good\r\n"),
        "{:?}",
        String::from_utf8_lossy(&msgs[0])
    );
}

#[test]
fn header_syntax_errors_name_the_line() {
    let mut t = Tambo::default_setup();
    t.start_all();
    for (body, detail) in [
        (
            &b" Subject: folded first\r\n\r\nbody\r\n"[..],
            "header line 1 is a continuation line",
        ),
        (
            b"Subject : space before the colon\r\n\r\nbody\r\n",
            "header line 1 has white space in its field name",
        ),
        (
            b"From: a@remote.example\r\nSubject: x\r\n folded\r\nthe body, too early\r\n",
            "header line 4 has no colon",
        ),
        (
            b"Subject: x\r\n: no name\r\n\r\n",
            "header line 2 has an empty field name",
        ),
        (
            "Sübject: 8-bit name\r\n\r\n".as_bytes(),
            "header line 1 has an invalid character in its field name",
        ),
    ] {
        // A session each: two refusals and a third error would close it.
        let mut c = session(&t);
        let r = transaction(&mut c, body);
        assert_eq!(r.code, 554, "{detail}: {r:?}");
        assert_eq!(r.text(), format!("5.6.0 Unparseable message: {detail}"));
        c.expect("NOOP", 250);
        c.expect("QUIT", 221);
    }
    assert!(t.queue_items().is_empty(), "{:?}", t.queue_files());
    assert!(t.maildir("ann").is_empty());
}

#[test]
fn eight_bit_values_header_only_and_empty_messages_are_accepted() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let cases: [&[u8]; 3] = [
        // UTF-8 (SMTPUTF8), and bytes that are not even that.
        b"Subject: caf\xc3\xa9 \xe2\x98\x95\r\nX-Raw: \xff\xfe\x01\r\n\tcontinued\r\n\r\nbody\r\n",
        b"Subject: headers only\r\n",
        b"",
    ];
    let mut c = session(&t);
    for body in cases {
        let r = transaction(&mut c, body);
        assert_eq!(r.code, 250, "{:?}: {r:?}", String::from_utf8_lossy(body));
    }
    c.expect("QUIT", 221);
    let msgs = t.wait_maildir("ann", 3);
    // Each arrives as sent, below the headers smtpd added.
    for body in &cases[..2] {
        assert!(
            msgs.iter().any(|m| m.ends_with(body)),
            "{:?} not delivered intact",
            String::from_utf8_lossy(body)
        );
    }
    // The empty message is only the added headers.
    let empty = msgs
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .find(|m| !m.contains("Subject: "))
        .expect("the empty message");
    assert!(empty.starts_with("Authentication-Results: "), "{empty}");
    assert!(empty.contains("\r\nReceived-SPF: none "), "{empty}");
    assert!(empty.contains("\r\nReceived: from client.test "), "{empty}");
}

#[test]
fn loops_are_still_detected() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let hops = |n: usize| {
        let mut body = Vec::new();
        for i in 0..n {
            body.extend_from_slice(format!("Received: from hop{i}.example\r\n").as_bytes());
        }
        body.extend_from_slice(format!("Subject: {n} hops\r\n\r\nbody\r\n").as_bytes());
        body
    };
    let mut c = session(&t);
    let r = transaction(&mut c, &hops(51));
    assert_eq!(r.code, 554, "{r:?}");
    assert!(r.text().starts_with("5.4.6 "), "{r:?}");
    // Fifty is fine.
    let r = transaction(&mut c, &hops(50));
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221);
    let msgs = t.wait_maildir("ann", 1);
    assert!(String::from_utf8_lossy(&msgs[0]).contains("Subject: 50 hops\r\n"));
    t.wait_var("the loop counted", |v| {
        v["chasquid/smtpIn/loopsDetected"] == 1
    });
}
