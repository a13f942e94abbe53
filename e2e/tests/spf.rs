//! SPF at MAIL FROM (REFERENCE §2.6) against the real processes: each
//! sender domain's SPF record is served by the installation's test DNS,
//! the client is 127.0.0.1 (or whom a PROXY header names). Only `fail`
//! refuses; every other result, errors included, is accepted and said in a
//! Received-SPF header directly above Received; `<>` and authenticated
//! sessions are not checked; each result is counted.

use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use tambo_e2e::tls::{TlsSmtp, hash, plain};
use tambo_e2e::*;

const PASSWORD: &str = "correct horse battery staple";

/// Sends a message from `from` to ann; the MAIL reply, and if MAIL was
/// accepted, the final reply.
fn send(c: &mut Smtp, from: &str, subject: &str) -> (Reply, Option<Reply>) {
    let mail = c.cmd(&format!("MAIL FROM:<{from}>"));
    if mail.code != 250 {
        return (mail, None);
    }
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message(subject, "x\r\n"));
    c.send_raw(b".\r\n");
    let end = c.reply();
    (mail, Some(end))
}

/// A new session from 127.0.0.1 that says EHLO client.test.
fn session(t: &Tambo) -> Smtp {
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c
}

/// Sends from `from` in a session of its own and expects it queued.
fn accepted(t: &Tambo, from: &str, subject: &str) {
    let mut c = session(t);
    let (mail, end) = send(&mut c, from, subject);
    assert_eq!(mail.code, 250, "{from}: {mail:?}");
    let end = end.unwrap();
    assert_eq!(end.code, 250, "{from}: {end:?}");
    c.cmd("QUIT");
}

/// ann's message with `subject`, once delivered.
fn delivered(t: &Tambo, subject: &str) -> String {
    let needle = format!("Subject: {subject}\r\n");
    wait_for(&format!("{subject:?} in ann's Maildir"), || {
        t.maildir("ann")
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .find(|m| m.contains(&needle))
    })
}

/// The message's Received-SPF header, whole (continuation lines and
/// CRLF included), after checking that the Received header follows it
/// directly (REFERENCE §2.8 step 4). None if it has none.
fn received_spf(m: &str) -> Option<String> {
    let start = if m.starts_with("Received-SPF: ") {
        0
    } else {
        m.find("\r\nReceived-SPF: ")? + 2
    };
    let rest = &m[start..];
    let mut end = 0;
    for line in rest.split_inclusive("\r\n") {
        if end > 0 && !line.starts_with('\t') && !line.starts_with(' ') {
            break;
        }
        end += line.len();
    }
    let (header, after) = rest.split_at(end);
    assert!(
        after.starts_with("Received: from client.test ("),
        "Received-SPF is not directly above Received: {m}"
    );
    Some(header.to_string())
}

fn spf_count(v: &serde_json::Value, result: &str) -> u64 {
    v["chasquid/smtpIn/spfResultCount"][result]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn accepted_results_are_said_above_received_and_counted() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let dns = t.dns();
    dns.add_txt("pass.test", "v=spf1 ip4:127.0.0.0/8 -all");
    // Other TXT records are not SPF records.
    dns.add_txt("pass.test", "site-verification=1234");
    dns.add_txt("soft.test", "v=spf1 ~all");
    dns.add_txt("neutral.test", "v=spf1 ?all");
    dns.add_txt("nospf.test", "just some text");
    for (from, subject) in [
        ("a@pass.test", "pass"),
        ("b@soft.test", "softfail"),
        ("c@neutral.test", "neutral"),
        ("d@nospf.test", "none"),
        ("e@nxdomain.test", "nxdomain"),
    ] {
        accepted(&t, from, subject);
    }
    let h = received_spf(&delivered(&t, "pass")).expect("Received-SPF");
    assert_eq!(
        h,
        "Received-SPF: pass (domain of pass.test designates 127.0.0.1 as permitted sender)\r\n\
         \tclient-ip=127.0.0.1; envelope-from=\"a@pass.test\"; helo=client.test;\r\n\
         \treceiver=mx.example.test; identity=mailfrom\r\n"
    );
    let h = received_spf(&delivered(&t, "softfail")).expect("Received-SPF");
    assert!(
        h.starts_with("Received-SPF: softfail (transitioning domain of soft.test does not designate 127.0.0.1 "),
        "{h}"
    );
    let h = received_spf(&delivered(&t, "neutral")).expect("Received-SPF");
    assert!(h.starts_with("Received-SPF: neutral ("), "{h}");
    for subject in ["none", "nxdomain"] {
        let h = received_spf(&delivered(&t, subject)).expect("Received-SPF");
        assert!(h.starts_with("Received-SPF: none ("), "{h}");
        assert!(h.contains(" has no SPF record)\r\n"), "{h}");
    }
    t.wait_var("each result counted", |v| {
        spf_count(v, "pass") == 1
            && spf_count(v, "softfail") == 1
            && spf_count(v, "neutral") == 1
            && spf_count(v, "none") == 2
    });
}

#[test]
fn fail_is_refused_at_mail_and_the_session_goes_on() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let dns = t.dns();
    dns.add_txt("fail.test", "v=spf1 ip4:192.0.2.0/24 -all");
    dns.add_txt("explained.test", "v=spf1 -all exp=why.explained.test");
    dns.add_txt("why.explained.test", "%{i} may not send mail for %{d}");
    dns.add_txt("ok.test", "v=spf1 +all");

    let mut c = session(&t);
    let (mail, _) = send(&mut c, "spammer@fail.test", "refused");
    assert_eq!(mail.code, 550, "{mail:?}");
    assert_eq!(mail.text(), "5.7.23 SPF check failed");
    // The envelope is gone: there is no sender.
    c.expect("RCPT TO:<ann@example.test>", 503);
    // The same session goes on with a sender that passes.
    let (mail, end) = send(&mut c, "friend@ok.test", "after-fail");
    assert_eq!(mail.code, 250, "{mail:?}");
    assert_eq!(end.unwrap().code, 250);
    c.cmd("QUIT");

    // The domain's explanation, its macros expanded, ends the reply.
    let mut c = session(&t);
    let (mail, _) = send(&mut c, "x@explained.test", "refused");
    assert_eq!(mail.code, 550, "{mail:?}");
    assert_eq!(
        mail.text(),
        "5.7.23 SPF check failed: 127.0.0.1 may not send mail for explained.test"
    );
    c.expect("NOOP", 250);
    c.cmd("QUIT");

    let m = delivered(&t, "after-fail");
    assert!(
        received_spf(&m).unwrap().starts_with("Received-SPF: pass "),
        "{m}"
    );
    t.wait_queue_empty();
    assert_eq!(t.maildir("ann").len(), 1, "a refused sender's mail arrived");
    t.wait_var("fail counted", |v| {
        spf_count(v, "fail") == 2 && spf_count(v, "pass") == 1
    });
}

#[test]
fn dns_errors_and_broken_records_never_refuse() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let dns = t.dns();
    dns.servfail("servfail.test");
    // RFC 7208 §4.5: two SPF records are the domain's error.
    dns.add_txt("two.test", "v=spf1 +all");
    dns.add_txt("two.test", "v=spf1 -all");
    dns.add_txt("bad.test", "v=spf1 ip4:300.1.2.3 -all");
    // A typo: an unknown mechanism, not a "-all" to apply.
    dns.add_txt("typo.test", "v=spf1 include_spf.example -all");
    dns.add_txt("twice.test", "v=spf1 redirect=a.test redirect=b.test");
    dns.add_txt("include.test", "v=spf1 include:missing.test -all");
    accepted(&t, "a@servfail.test", "servfail");
    accepted(&t, "b@two.test", "two");
    accepted(&t, "c@bad.test", "bad");
    accepted(&t, "c@typo.test", "typo");
    accepted(&t, "c@twice.test", "twice");
    accepted(&t, "d@include.test", "include");
    let h = received_spf(&delivered(&t, "servfail")).unwrap();
    assert!(h.starts_with("Received-SPF: temperror (DNS error "), "{h}");
    let h = received_spf(&delivered(&t, "two")).unwrap();
    assert!(
        h.starts_with("Received-SPF: permerror (two.test has more than one SPF record)\r\n"),
        "{h}"
    );
    for (subject, why) in [
        ("bad", "bad.test does not parse: a bad ip4 or ip6 address"),
        ("typo", "typo.test does not parse: an unknown mechanism"),
        ("twice", "twice.test does not parse"),
    ] {
        let h = received_spf(&delivered(&t, subject)).unwrap();
        let want = format!("Received-SPF: permerror (the SPF record of {why})\r\n");
        assert!(h.starts_with(&want), "{h}");
    }
    let h = received_spf(&delivered(&t, "include")).unwrap();
    assert!(h.starts_with("Received-SPF: permerror ("), "{h}");

    // A DNS server that answers nothing at all: the check is given up
    // within its time bound (10 s), as temperror, and the mail accepted.
    dns.add_txt("down.test", "v=spf1 -all");
    dns.set_down(true);
    let mut c = session(&t);
    let start = Instant::now();
    let (mail, end) = send(&mut c, "e@down.test", "down");
    let took = start.elapsed();
    assert_eq!(mail.code, 250, "{mail:?}");
    assert!(took < Duration::from_secs(15), "MAIL took {took:?}");
    assert_eq!(end.unwrap().code, 250);
    c.cmd("QUIT");
    dns.set_down(false);
    let h = received_spf(&delivered(&t, "down")).unwrap();
    assert!(h.starts_with("Received-SPF: temperror ("), "{h}");
    t.wait_var("errors counted", |v| {
        spf_count(v, "temperror") == 2 && spf_count(v, "permerror") == 5
    });
}

#[test]
fn null_sender_and_authenticated_sessions_are_not_checked() {
    let mut t = Tambo::default_setup();
    std::fs::write(
        t.config_dir.join("domains").join(DOMAIN).join("users"),
        format!("ann {}\nbob {}\n", hash(PASSWORD), hash(PASSWORD)),
    )
    .unwrap();
    t.start_all();
    // If either were checked, it would fail.
    t.dns().add_txt(DOMAIN, "v=spf1 -all");

    let mut c = session(&t);
    let (mail, end) = send(&mut c, "", "null-sender");
    assert_eq!(mail.code, 250, "{mail:?}");
    assert_eq!(end.unwrap().code, 250);
    c.cmd("QUIT");

    // Authenticated, on submission and on port 25 alike.
    for (addr, subject) in [
        (t.submission_addr(), "submitted"),
        (t.smtp_addr(), "relayed-on-25"),
    ] {
        let mut c = TlsSmtp::connect(addr);
        c.expect("EHLO client.test", 250);
        c.starttls("mx.example.test");
        c.expect("EHLO client.test", 250);
        c.expect(
            &format!("AUTH PLAIN {}", plain("bob@example.test", PASSWORD)),
            235,
        );
        c.expect("MAIL FROM:<bob@example.test>", 250);
        c.expect("RCPT TO:<ann@example.test>", 250);
        c.expect("DATA", 354);
        c.send_raw(&message(subject, "x\r\n"));
        c.send_raw(b".\r\n");
        assert_eq!(c.reply().code, 250);
    }
    for subject in ["null-sender", "submitted", "relayed-on-25"] {
        let m = delivered(&t, subject);
        assert!(!m.contains("Received-SPF"), "{m}");
    }
    // Nothing was even asked.
    let asked: Vec<_> = t
        .dns()
        .queries()
        .into_iter()
        .filter(|(_, ty)| *ty == RecordType::TXT)
        .collect();
    assert!(asked.is_empty(), "{asked:?}");
}

#[test]
fn behind_a_proxy_the_proxied_client_is_checked() {
    let mut t = Tambo::new("haproxy_incoming = true", "", "");
    t.start_all();
    t.dns().add_txt("proxied.test", "v=spf1 ip4:192.0.2.1 -all");
    let header = |src: &str| format!("PROXY TCP4 {src} 198.51.100.25 40000 25\r\n");

    let mut c = Smtp::connect_after(t.smtp_addr(), header("192.0.2.1").as_bytes());
    c.expect("EHLO client.test", 250);
    let (mail, end) = send(&mut c, "a@proxied.test", "proxied");
    assert_eq!(mail.code, 250, "{mail:?}");
    assert_eq!(end.unwrap().code, 250);
    c.cmd("QUIT");
    let h = received_spf(&delivered(&t, "proxied")).unwrap();
    assert!(
        h.starts_with("Received-SPF: pass (domain of proxied.test designates 192.0.2.1 "),
        "{h}"
    );
    assert!(h.contains("\tclient-ip=192.0.2.1;"), "{h}");

    let mut c = Smtp::connect_after(t.smtp_addr(), header("192.0.2.99").as_bytes());
    c.expect("EHLO client.test", 250);
    let (mail, _) = send(&mut c, "a@proxied.test", "refused");
    assert_eq!(mail.code, 550, "{mail:?}");
    assert!(mail.text().starts_with("5.7.23 "), "{mail:?}");
}
