use super::*;

fn report(result: SpfResult, reason: &str) -> SpfReport {
    SpfReport {
        result,
        domain: "example.org".into(),
        reason: reason.into(),
    }
}

fn info<'a>(sender: &'a str, helo: Option<&'a str>) -> HeaderInfo<'a> {
    HeaderInfo {
        client: "192.0.2.1".parse().unwrap(),
        sender,
        helo,
        receiver: "mx.example.net",
    }
}

#[test]
fn header_shape() {
    let h = received_spf(
        &report(
            SpfResult::Pass,
            "domain of example.org designates 192.0.2.1 as permitted sender",
        ),
        &info("ann@example.org", Some("client.example.org")),
    );
    assert_eq!(
        h,
        "Received-SPF: pass (domain of example.org designates 192.0.2.1 as permitted sender)\r\n\
         \tclient-ip=192.0.2.1; envelope-from=\"ann@example.org\"; helo=client.example.org;\r\n\
         \treceiver=mx.example.net; identity=mailfrom\r\n"
    );
}

#[test]
fn no_reason_no_comment() {
    let h = received_spf(&report(SpfResult::None, ""), &info("a@b.example", None));
    assert_eq!(
        h,
        "Received-SPF: none\r\n\tclient-ip=192.0.2.1; envelope-from=\"a@b.example\";\r\n\
         \treceiver=mx.example.net; identity=mailfrom\r\n"
    );
}

#[test]
fn every_result_is_named_as_rfc_7208_spells_it() {
    for r in SpfResult::EVERY {
        let h = received_spf(&report(r, "why"), &info("a@b.example", None));
        assert!(
            h.starts_with(&format!("Received-SPF: {} (why)\r\n", r.name())),
            "{h}"
        );
    }
}

/// Every line ends with CRLF, every line after the first starts with a
/// tab, and nothing else breaks a line.
fn assert_one_header(h: &str) {
    assert!(h.ends_with("\r\n"), "{h:?}");
    let body = &h[..h.len() - 2];
    for (i, line) in body.split("\r\n").enumerate() {
        assert!(!line.contains('\r') && !line.contains('\n'), "{h:?}");
        if i > 0 {
            assert!(line.starts_with('\t'), "{h:?}");
        }
    }
    assert!(h.starts_with("Received-SPF: "), "{h:?}");
}

#[test]
fn hostile_text_cannot_inject_headers() {
    let h = received_spf(
        &report(SpfResult::Fail, "x)\r\nX-Injected: 1\r\n(y\\ \u{7f}\u{e9}"),
        &info(
            "\"a\\\"\r\nX-Evil: 1\"@b.example",
            Some("evil\r\nX-Helo: 1 (x) \"q\""),
        ),
    );
    assert_one_header(&h);
    assert!(!h.contains("\r\nX-"), "{h:?}");
    // The comment stays one comment: every parenthesis is escaped.
    let first = h.lines().next().unwrap();
    assert_eq!(
        first,
        "Received-SPF: fail (x\\)??X-Injected: 1??\\(y\\\\ ??)"
    );
    assert!(
        h.contains("envelope-from=\"\\\"a\\\\\\\"X-Evil: 1\\\"@b.example\";"),
        "{h:?}"
    );
    assert!(h.contains("helo=\"evilX-Helo: 1 (x) \\\"q\\\"\";"), "{h:?}");
}

#[test]
fn address_literals_and_odd_helos_are_quoted() {
    let h = received_spf(
        &report(SpfResult::Neutral, ""),
        &info("a@b.example", Some("[192.0.2.1]")),
    );
    assert!(h.contains("helo=\"[192.0.2.1]\";"), "{h}");
    let long = "a".repeat(2000);
    let h = received_spf(
        &report(SpfResult::Neutral, ""),
        &info("a@b.example", Some(&long)),
    );
    assert_one_header(&h);
    assert!(h.lines().all(|l| l.len() < 998), "{h}");
}

#[test]
fn v4_mapped_clients_show_as_v4() {
    let mut i = info("a@b.example", None);
    i.client = "::ffff:192.0.2.7".parse().unwrap();
    let h = received_spf(&report(SpfResult::Pass, ""), &i);
    assert!(h.contains("client-ip=192.0.2.7;"), "{h}");
    i.client = "2001:db8::1".parse().unwrap();
    let h = received_spf(&report(SpfResult::Pass, ""), &i);
    // Not a dot-atom: quoted (RFC 7208 §9.1).
    assert!(h.contains("client-ip=\"2001:db8::1\";"), "{h}");
}

#[test]
fn fail_replies_carry_the_explanation_made_safe() {
    let mut c = Checked {
        report: report(SpfResult::Fail, "r"),
        explanation: None,
    };
    assert_eq!(fail_text(&c), "SPF check failed");
    c.explanation = Some(printable("Go away\r\n250 ok \u{e9}", MAX_EXPLANATION));
    assert_eq!(fail_text(&c), "SPF check failed: Go away??250 ok ?");
    c.explanation = Some(printable(&"x".repeat(1000), MAX_EXPLANATION));
    assert_eq!(
        fail_text(&c).len(),
        "SPF check failed: ".len() + MAX_EXPLANATION
    );
    c.explanation = Some(String::new());
    assert_eq!(fail_text(&c), "SPF check failed");
}

#[test]
fn results_map_one_to_one() {
    use mail_auth::SpfResult as M;
    let all = [
        (M::Pass, SpfResult::Pass),
        (M::Fail, SpfResult::Fail),
        (M::SoftFail, SpfResult::SoftFail),
        (M::Neutral, SpfResult::Neutral),
        (M::TempError, SpfResult::TempError),
        (M::PermError, SpfResult::PermError),
        (M::None, SpfResult::None),
    ];
    for (m, ours) in all {
        assert_eq!(from_mail_auth(m), ours);
        // Every result has a reason, and it names the domain.
        let why = reason(ours, "example.org", "192.0.2.1".parse().unwrap());
        assert!(why.contains("example.org"), "{why}");
    }
    assert_eq!(all.len(), SpfResult::EVERY.len());
}

#[test]
fn spf_records_are_recognised_as_rfc_7208_says() {
    assert!(is_spf_record(b"v=spf1"));
    assert!(is_spf_record(b"v=spf1 -all"));
    assert!(is_spf_record(b"V=SPF1 ~all"));
    assert!(!is_spf_record(b"v=spf10 -all"));
    assert!(!is_spf_record(b"v=spf1-all"));
    assert!(!is_spf_record(b"google-site-verification=x"));
    assert!(!is_spf_record(b""));
}

#[test]
fn sender_domains_go_to_ascii() {
    assert_eq!(dns_domain("example.org").as_deref(), Some("example.org"));
    assert_eq!(dns_domain("Example.ORG.").as_deref(), Some("example.org"));
    assert_eq!(
        dns_domain("bücher.example").as_deref(),
        Some("xn--bcher-kva.example")
    );
    assert_eq!(dns_domain("localhost"), None);
    assert_eq!(dns_domain("[192.0.2.1]"), None);
    assert_eq!(dns_domain(""), None);
    assert_eq!(dns_domain(&format!("{}.example", "a".repeat(64))), None);
}

#[tokio::test]
async fn a_dead_dns_server_gives_temperror_in_time() {
    // A UDP socket that never answers, and no TCP listener on its port.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dir = std::env::temp_dir();
    let mut cfg = tambo_common::config::Config::defaults(&dir);
    cfg.testing.dns_server = Some(silent.local_addr().unwrap());
    let resolver = tambo_common::dns::resolver(&cfg).unwrap();
    let checker = SpfChecker::new(resolver).with_timeout(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let c = checker
        .check("192.0.2.1".parse().unwrap(), "ann@example.org", "mx.test")
        .await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // Timed out, or the resolver gave up first: temperror either way.
    assert_eq!(c.report.result, SpfResult::TempError, "{c:?}");
    assert_eq!(c.report.domain, "example.org");
    assert!(!c.report.reason.is_empty());
    assert_eq!(c.explanation, None);
}

#[tokio::test]
async fn a_bad_domain_is_none() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = tambo_common::config::Config::defaults(&std::env::temp_dir());
    cfg.testing.dns_server = Some(silent.local_addr().unwrap());
    let checker = SpfChecker::new(tambo_common::dns::resolver(&cfg).unwrap());
    let c = checker
        .check("192.0.2.1".parse().unwrap(), "ann@localhost", "mx.test")
        .await;
    assert_eq!(c.report.result, SpfResult::None);
    assert_eq!(c.report.domain, "localhost");
}

#[test]
fn what_mail_auth_lets_through_is_still_a_permerror() {
    for good in [
        "v=spf1",
        "v=spf1 -all",
        "v=spf1 +a mx/24 ?ptr ~include:_spf.example.org exists:%{i}.x.example -all",
        "v=spf1 ip4:192.0.2.0/24 ip4:192.0.2.1 ip6:2001:db8::/32 ip6:::1 -ALL",
        "v=spf1 a:mail.example.org/24//64 redirect=other.example",
        // Unknown modifiers are ignored (RFC 7208 §6).
        "v=spf1 foo=bar -all",
    ] {
        assert_eq!(strict_problem(good.as_bytes()), None, "{good}");
    }
    for bad in [
        "v=spf1 include_spf.example.org -all",
        "v=spf1 foo:bar -all",
        "v=spf1 -spf2.0 ~all",
    ] {
        assert_eq!(
            strict_problem(bad.as_bytes()),
            Some(": an unknown mechanism"),
            "{bad}"
        );
    }
    for bad in [
        "v=spf1 ip4:300.1.2.3 -all",
        "v=spf1 ip4:192.0.2.0/33 -all",
        "v=spf1 ip4 -all",
        "v=spf1 ip4:2001:db8::1 -all",
        "v=spf1 ip6:192.0.2.1 -all",
        "v=spf1 ip6:2001:db8::/129 -all",
        "v=spf1 ip6:2001:db8::/x -all",
    ] {
        assert_eq!(
            strict_problem(bad.as_bytes()),
            Some(": a bad ip4 or ip6 address"),
            "{bad}"
        );
    }
}
