//! /debug/vars, /metrics and the index, against real traffic.

use tambo_e2e::*;

#[test]
fn debug_vars_match_what_the_test_did() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("RCPT TO:<nobody@example.test>", 550);
    c.expect("DATA", 354);
    c.send_raw(&message("counted", "x\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    c.expect("NOOP", 250);
    c.expect("QUIT", 221);
    assert!(c.is_closed());
    t.wait_maildir("ann", 1);
    t.wait_queue_empty();
    let want = serde_json::json!({
        "chasquid/smtpIn/commandCount": {"EHLO": 1, "MAIL": 1, "RCPT": 2, "DATA": 1, "NOOP": 1, "QUIT": 1},
        // 220 greeting; 250 EHLO, MAIL, RCPT, end of DATA, NOOP; 354; 550; 221.
        "chasquid/smtpIn/responseCodeCount": {"220": 1, "250": 5, "354": 1, "550": 1, "221": 1},
        "chasquid/smtpIn/tlsCount": {"plain": 1},
        "chasquid/queue/putCount": 1,
        // Written at put; not rewritten after the last delivery, since it is
        // deleted right away.
        "chasquid/queue/itemsWritten": 1,
        "chasquid/queue/deliverAttempts": {"email:local": 1},
        "chasquid/queue/dsnQueued": 0,
    });
    let v = t.wait_var("counters to match", |v| {
        want.as_object().unwrap().iter().all(|(k, w)| &v[k] == w)
    });
    assert_eq!(v["chasquid/version"], env!("CARGO_PKG_VERSION"));
    assert!(v["chasquid/sourceDateTimestamp"].as_i64().unwrap() > 1_600_000_000);
    let date = v["chasquid/sourceDateStr"].as_str().unwrap();
    assert_eq!(date.len(), "2026-11-24 01:00:00 +0000".len(), "{date}");
    assert!(
        v["cmdline"].as_array().unwrap()[0]
            .as_str()
            .unwrap()
            .ends_with("tambo-monitord")
    );
    // Every variable of monitoring.md exists from the start.
    for name in [
        "chasquid/aliases/hookResults",
        "chasquid/smtpIn/hookResults",
        "chasquid/smtpIn/loopsDetected",
        "chasquid/smtpIn/securityLevelChecks",
        "chasquid/smtpIn/spfResultCount",
        "chasquid/smtpOut/securityLevelChecks",
        "chasquid/smtpOut/sts/mode",
        "chasquid/smtpOut/sts/security",
        "chasquid/smtpOut/tlsCount",
        "chasquid/sts/cache/expired",
        "chasquid/sts/cache/failedFetch",
        "chasquid/sts/cache/fetches",
        "chasquid/sts/cache/hits",
        "chasquid/sts/cache/invalid",
        "chasquid/sts/cache/ioErrors",
        "chasquid/sts/cache/marshalErrors",
        "chasquid/sts/cache/refreshCycles",
        "chasquid/sts/cache/refreshErrors",
        "chasquid/sts/cache/refreshes",
        "chasquid/sts/cache/unmarshalErrors",
        "chasquid/smtpIn/wrongProtoCount",
        "chasquid/smtpIn/dkimSigned",
    ] {
        assert!(!v[name].is_null(), "{name} is missing from /debug/vars");
    }
}

#[test]
fn counters_wait_for_a_late_monitord_and_mail_does_not() {
    let mut t = Tambo::default_setup();
    // monitord is down: mail must flow anyway.
    t.start("queued");
    t.start("deliverd");
    t.start("smtpd");
    assert_eq!(
        t.send(
            "x@remote.example",
            &["ann@example.test"],
            &message("early", "x\r\n")
        )
        .code,
        250
    );
    t.wait_maildir("ann", 1);
    t.wait_queue_empty();
    t.start("monitord");
    t.wait_var("buffered counters to arrive", |v| {
        v["chasquid/queue/putCount"] == 1
            && v["chasquid/queue/deliverAttempts"]["email:local"] == 1
            && v["chasquid/smtpIn/commandCount"]["EHLO"] == 1
    });
    // monitord dies; mail still flows, and counters catch up once it is back.
    t.kill9("monitord");
    assert_eq!(
        t.send(
            "x@remote.example",
            &["bob@example.test"],
            &message("during", "x\r\n")
        )
        .code,
        250
    );
    t.wait_maildir("bob", 1);
    t.start("monitord");
    t.wait_var("counters after the restart", |v| {
        v["chasquid/queue/deliverAttempts"]["email:local"] == 1
    });
}

#[test]
fn index_metrics_and_not_found() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let (status, head, body) = t.http_get("/");
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{head}"
    );
    for link in ["/debug/vars", "/metrics", "/debug/flags"] {
        assert!(
            body.contains(&format!("href=\"{link}\"")),
            "index links {link}"
        );
    }
    assert!(body.contains("mx.example.test"));
    let (status, head, body) = t.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(body.contains("# HELP chasquid_queue_putCount "), "{body}");
    assert!(body.ends_with("# EOF\n"));
    assert_eq!(t.http_get("/nope").0, 404);
    assert_eq!(
        t.http_get("/exit").0,
        404,
        "there is no way to stop tambo over HTTP"
    );
    let (_, _, flags) = t.http_get("/debug/flags");
    t.wait_log("monitord", "smtpd registered");
    assert!(flags.contains("-config_dir="), "{flags}");
}
