//! Remote delivery end to end: deliverd finds MX hosts through a DNS
//! server the test runs, talks SMTP to independent servers (Python's
//! aiosmtpd, and a second tambo), signs with DKIM keys checked by an
//! independent verifier (dkimpy), keeps security levels, follows MTA-STS
//! policies served over HTTPS, forwards with `via`, and delivers over
//! LMTP. Loopback only; every name resolves through the test's DNS.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use tambo_e2e::ca::TestCa;
use tambo_e2e::dns::{TestDns, random_loopback};
use tambo_e2e::https::{PolicyResponse, PolicyServer};
use tambo_e2e::pymx::{MxOpts, PyMx};
use tambo_e2e::tls::{hash, submit_as};
use tambo_e2e::*;

const PASSWORD: &str = "correct horse battery staple";

/// What every test here shares: the DNS server, a CA whose roots deliverd
/// trusts, and a directory for certificates.
struct World {
    dns: TestDns,
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        let w = World {
            dns: TestDns::start(),
            ca: TestCa::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        w.ca.write_roots(&w.roots());
        w
    }

    fn roots(&self) -> PathBuf {
        self.dir.path().join("roots.pem")
    }

    /// A certificate from the trusted CA for `names`: (cert, key) paths.
    fn leaf(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.ca.write_leaf(self.dir.path(), stem, names)
    }

    /// An MX record for `domain` pointing at `ip`, through `mx.<domain>`.
    fn mx(&self, domain: &str, ip: Ipv4Addr) {
        let host = format!("mx.{domain}");
        self.dns.add_mx(domain, 10, &host);
        self.dns.add_a(&host, ip);
    }

    /// The sending tambo: users ann and bob (with [`PASSWORD`]), outgoing
    /// SMTP to `smtp_port`, every lookup to the test's DNS, the test CA as
    /// the only roots. `extra`/`tambo_extra`/`testing_extra` as in
    /// [`Tambo::new`].
    fn sender(&self, smtp_port: u16, extra: &str, tambo_extra: &str, testing_extra: &str) -> Tambo {
        let timeout = if testing_extra.contains("smtp_out_timeout") {
            ""
        } else {
            "smtp_out_timeout = \"20s\"\n"
        };
        let testing = format!(
            "dns_server = \"{}\"\nsmtp_port = {smtp_port}\ntls_roots = \"{}\"\n{timeout}{testing_extra}",
            self.dns.addr(),
            self.roots().display()
        );
        let t = Tambo::new(extra, tambo_extra, &testing);
        std::fs::write(
            t.config_dir.join("domains").join(DOMAIN).join("users"),
            format!("ann {}\nbob {}\n", hash(PASSWORD), hash(PASSWORD)),
        )
        .unwrap();
        t
    }
}

/// Sends a message as the authenticated ann@example.test (submission,
/// STARTTLS, AUTH PLAIN); returns the final reply's code.
fn submit(t: &Tambo, to: &[&str], body: &[u8]) -> u16 {
    submit_as(t.submission_addr(), "ann@example.test", PASSWORD, to, body)
}

fn text(m: &[u8]) -> String {
    String::from_utf8_lossy(m).into_owned()
}

/// The queue items' JSON (m: files).
fn items(t: &Tambo) -> Vec<serde_json::Value> {
    t.queue_items()
}

/// Waits until some pending recipient's last failure contains `needle`.
fn wait_failure(t: &Tambo, needle: &str) -> String {
    wait_for(&format!("a queued failure mentioning {needle:?}"), || {
        items(t).iter().find_map(|i| {
            i["recipients"].as_array()?.iter().find_map(|r| {
                let f = r["last_failure"].as_str()?;
                f.contains(needle).then(|| f.to_string())
            })
        })
    })
}

fn domaininfo(t: &Tambo, domain: &str) -> String {
    std::fs::read_to_string(t.data_dir.join("domaininfo").join(format!("s:{domain}")))
        .unwrap_or_default()
}

fn count(v: &serde_json::Value, name: &str, label: &str) -> u64 {
    if label.is_empty() {
        v[name].as_u64().unwrap_or(0)
    } else {
        v[name][label].as_u64().unwrap_or(0)
    }
}

/// Waits until a counter (or a label of a map) reaches at least `min`
/// (processes push their counts every half second), and returns it.
fn var(t: &Tambo, name: &str, label: &str, min: u64) -> u64 {
    let v = t.wait_var(&format!("{name}{{{label}}} >= {min}"), |v| {
        count(v, name, label) >= min
    });
    count(&v, name, label)
}

#[test]
fn authenticated_mail_reaches_another_tambo_signed_with_dkim() {
    let w = World::new();
    // B: the destination, another tambo with its own domain.
    let mut b = Tambo::default_setup();
    b.set_hostname("mx.dest.test");
    b.add_domain("dest.test", &["carol"]);
    b.start_all();
    let b_port = b.smtp_addr().port();
    w.mx("dest.test", Ipv4Addr::LOCALHOST);
    // A signs with a key made and published by the CLI.
    let mut a = w.sender(b_port, "", "", "");
    let (txt_name, txt_value) = dkim_key(&a, DOMAIN, "sel1");
    assert_eq!(txt_name, "sel1._domainkey.example.test");
    w.dns.add_txt(&txt_name, &txt_value);
    a.start_all();
    let body = b"From: ann@example.test\r\nTo: carol@dest.test\r\nSubject: across\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <across@example.test>\r\n\r\nHello B.\r\n..a dot-stuffed line\r\n";
    assert_eq!(submit(&a, &["carol@dest.test"], body), 250);
    let got = b.wait_maildir_in("dest.test", "carol", 1);
    let msg = text(&got[0]);
    assert!(msg.contains("DKIM-Signature:"), "{msg}");
    assert!(msg.contains("\r\n.a dot-stuffed line\r\n"), "{msg}");
    assert!(msg.contains("with ESMTPS"), "A used STARTTLS: {msg}");
    assert!(
        dkimpy_verifies(&got[0], &[(txt_name.clone(), txt_value.clone())]),
        "dkimpy accepts the signature:\n{msg}"
    );
    // A tampered body fails: the verifier is not a rubber stamp.
    let tampered = msg.replace("Hello B.", "Hello C.");
    assert!(!dkimpy_verifies(
        tampered.as_bytes(),
        &[(txt_name, txt_value)]
    ));
    a.wait_queue_empty();
    assert_eq!(var(&a, "chasquid/smtpIn/dkimSigned", "", 1), 1);
    assert_eq!(var(&a, "chasquid/smtpOut/tlsCount", "tls:insecure", 1), 1);
    assert_eq!(
        var(&a, "chasquid/queue/deliverAttempts", "email:remote", 1),
        1
    );
    // B's certificate is self-signed: recorded as TLS_INSECURE by queued.
    assert!(
        domaininfo(&a, "dest.test").contains("outgoing_sec_level: TLS_INSECURE"),
        "{}",
        domaininfo(&a, "dest.test")
    );
}

#[test]
fn an_independent_mx_over_starttls_then_plain_text_is_refused() {
    let w = World::new();
    let ip = random_loopback();
    let (cert, key) = w.leaf("mx", &["mx.far.test"]);
    let mx = PyMx::start(MxOpts::at(ip.into()).tls(&cert, &key));
    let port = mx.port();
    w.mx("far.test", ip);
    let mut a = w.sender(port, "give_up_send_after = \"4s\"", "", "");
    a.start_all();
    assert_eq!(
        submit(&a, &["x@far.test"], &message("secure", "first\r\n")),
        250
    );
    let got = mx.wait_messages(1);
    assert!(got[0].tls, "STARTTLS was used");
    assert_eq!(got[0].mail_from, "ann@example.test");
    assert_eq!(got[0].rcpt_tos, ["x@far.test"]);
    assert!(got[0].mail_options.iter().any(|o| o == "BODY=8BITMIME"));
    wait_for("domaininfo records TLS_SECURE", || {
        domaininfo(&a, "far.test")
            .contains("outgoing_sec_level: TLS_SECURE")
            .then_some(())
    });
    a.wait_queue_empty();
    assert_eq!(var(&a, "chasquid/smtpOut/tlsCount", "tls:secure", 1), 1);
    // The same MX without STARTTLS: a downgrade, never used.
    drop(mx);
    let plain_mx = PyMx::start(MxOpts::listen((IpAddr::from(ip), port).into()));
    assert_eq!(
        submit(&a, &["x@far.test"], &message("downgrade", "second\r\n")),
        250
    );
    wait_failure(&a, "security level");
    // Temporary, so it ends in a DSN when the item gives up.
    let dsn = text(&a.wait_maildir("ann", 1)[0]);
    assert!(dsn.contains("X-Failed-Recipients: x@far.test"), "{dsn}");
    assert!(dsn.contains("security level"), "{dsn}");
    assert!(
        plain_mx.messages().is_empty(),
        "nothing went out in plain text"
    );
    var(&a, "chasquid/smtpOut/securityLevelChecks", "fail", 1);
}

#[test]
fn remote_replies_are_retried_or_bounced_with_the_servers_text() {
    let w = World::new();
    let ip = random_loopback();
    let mx = PyMx::start(
        MxOpts::at(ip.into())
            .rcpt_reply("busy@far.test", "451 4.7.1 greylisted, try later")
            .rcpt_reply("gone@far.test", "550 5.1.1 no such mailbox here"),
    );
    let port = mx.port();
    w.mx("far.test", ip);
    let mut a = w.sender(port, "", "", "");
    a.start_all();
    let to = ["ok@far.test", "busy@far.test", "gone@far.test"];
    assert_eq!(submit(&a, &to, &message("mixed", "three\r\n")), 250);
    // One transaction for the three; only ok was accepted.
    let got = mx.wait_messages(1);
    assert_eq!(got[0].rcpt_tos, ["ok@far.test"]);
    // busy is retried (the 200 ms test schedule): a second attempt.
    wait_for("busy@far.test to be tried again", || {
        (mx.log().matches("busy@far.test").count() >= 4).then_some(())
    });
    let failure = wait_failure(&a, "451 4.7.1 greylisted");
    assert!(failure.contains("RCPT"), "names the stage: {failure}");
    // Now the server takes it.
    drop(mx);
    let mx = PyMx::start(MxOpts::listen((IpAddr::from(ip), port).into()));
    let got = mx.wait_messages(1);
    assert_eq!(got[0].rcpt_tos, ["busy@far.test"]);
    a.wait_queue_empty();
    // gone bounced at once, with the server's reply in the DSN.
    let dsns = a.wait_maildir("ann", 1);
    assert_eq!(dsns.len(), 1);
    let dsn = text(&dsns[0]);
    assert!(dsn.contains("X-Failed-Recipients: gone@far.test"), "{dsn}");
    assert!(dsn.contains("550 5.1.1 no such mailbox here"), "{dsn}");
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(!dsn.contains("busy@far.test\r\nAction"), "{dsn}");
}

#[test]
fn nxdomain_and_null_mx_bounce_at_once_and_servfail_waits() {
    let w = World::new();
    w.dns.nxdomain("nowhere.test");
    w.dns.null_mx("nomail.test");
    w.dns.servfail("flaky.test");
    // The default give-up time (20 h): the bounces must not wait for it.
    let mut a = w.sender(25, "", "", "");
    a.start_all();
    let to = ["x@nowhere.test", "y@nomail.test"];
    assert_eq!(submit(&a, &to, &message("undeliverable", "no\r\n")), 250);
    let dsn = text(&a.wait_maildir("ann", 1)[0]);
    assert!(dsn.contains("Subject:"), "{dsn}");
    assert!(
        dsn.contains("X-Failed-Recipients: x@nowhere.test,\r\n\ty@nomail.test"),
        "{dsn}"
    );
    assert!(
        dsn.contains("the domain nowhere.test does not exist (NXDOMAIN)"),
        "{dsn}"
    );
    assert!(dsn.contains("(null MX, RFC 7505)"), "{dsn}");
    assert!(dsn.contains("Status: 5.1.10"), "null MX: {dsn}");
    a.wait_queue_empty();
    // A temporary DNS error waits in the queue, saying why.
    assert_eq!(
        submit(&a, &["z@flaky.test"], &message("later", "wait\r\n")),
        250
    );
    let failure = wait_failure(&a, "flaky.test");
    assert!(failure.to_lowercase().contains("dns"), "{failure}");
    assert_eq!(a.maildir("ann").len(), 1, "no DSN for a temporary error");
}

#[test]
fn a_server_that_stops_answering_times_out() {
    let w = World::new();
    let ip = random_loopback();
    let mx = PyMx::start(MxOpts::at(ip.into()).hang_after_ehlo());
    w.mx("slow.test", ip);
    let mut a = w.sender(mx.port(), "", "", "smtp_out_timeout = \"2s\"\n");
    a.start_all();
    assert_eq!(
        submit(&a, &["x@slow.test"], &message("slow", "hang\r\n")),
        250
    );
    let failure = wait_failure(&a, "timed out");
    assert!(failure.contains("slow.test"), "{failure}");
    assert!(a.maildir("ann").is_empty(), "temporary: no DSN yet");
}

#[test]
fn mta_sts_policies_filter_mx_hosts_and_demand_verified_certificates() {
    let w = World::new();
    // One MX with a certificate of the trusted CA, one with a stranger's.
    let good_ip = random_loopback();
    let (cert, key) = w.leaf("good", &["mx.match.test", "mx.testing.test"]);
    let good = PyMx::start(MxOpts::at(good_ip.into()).tls(&cert, &key));
    let port = good.port();
    let stranger = TestCa::new();
    let bad_ip = random_loopback();
    let dir = tempfile::tempdir().unwrap();
    let (bcert, bkey) = stranger.write_leaf(dir.path(), "bad", &["mx.unverified.test"]);
    let bad = PyMx::start(MxOpts::listen((IpAddr::from(bad_ip), port).into()).tls(&bcert, &bkey));
    // Four domains, four policies, one HTTPS port.
    let serve = |domain: &str, ip: Ipv4Addr, at: Option<u16>, policy: PolicyResponse| {
        let host = format!("mta-sts.{domain}");
        let s = match at {
            None => PolicyServer::start(ip.into(), &w.ca, &host),
            Some(p) => PolicyServer::start_at((IpAddr::from(ip), p).into(), &w.ca, &[&host]),
        };
        s.set(policy);
        w.dns.add_a(&host, ip);
        w.dns
            .add_txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=20261201;");
        s
    };
    let match_sts = serve(
        "match.test",
        random_loopback(),
        None,
        PolicyResponse::policy("enforce", &["*.match.test"], 86400),
    );
    let sts_port = match_sts.port();
    let _nomatch_sts = serve(
        "nomatch.test",
        random_loopback(),
        Some(sts_port),
        PolicyResponse::policy("enforce", &["mx.elsewhere.test"], 86400),
    );
    let _unverified_sts = serve(
        "unverified.test",
        random_loopback(),
        Some(sts_port),
        PolicyResponse::policy("enforce", &["mx.unverified.test"], 86400),
    );
    let _testing_sts = serve(
        "testing.test",
        random_loopback(),
        Some(sts_port),
        PolicyResponse::policy("testing", &["mx.other.test"], 86400),
    );
    w.mx("match.test", good_ip);
    w.mx("nomatch.test", good_ip);
    w.mx("unverified.test", bad_ip);
    w.mx("testing.test", good_ip);
    let testing = format!("sts_https_port = {sts_port}\n");
    let mut a = w.sender(port, "", "", &testing);
    a.start_all();
    for d in ["match", "nomatch", "unverified", "testing"] {
        let to = format!("x@{d}.test");
        assert_eq!(submit(&a, &[&to], &message(d, "sts\r\n")), 250);
    }
    // enforce + matching MX + verified certificate: delivered.
    // testing: only counted, delivered although the MX does not match.
    let got = good.wait_messages(2);
    let mut rcpts: Vec<_> = got.iter().map(|m| m.rcpt_tos[0].clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["x@match.test", "x@testing.test"]);
    // enforce + no matching MX: never tried.
    wait_failure(&a, "MTA-STS");
    // enforce + a certificate that does not verify: refused after TLS.
    wait_for("the unverified MX to be refused", || {
        items(&a)
            .iter()
            .flat_map(|i| i["recipients"].as_array().cloned().unwrap_or_default())
            .any(|r| {
                r["address"] == "x@unverified.test"
                    && r["last_failure"].as_str().is_some_and(|f| !f.is_empty())
            })
            .then_some(())
    });
    assert!(bad.messages().is_empty());
    var(&a, "chasquid/smtpOut/sts/mode", "enforce", 2);
    var(&a, "chasquid/smtpOut/sts/mode", "testing", 1);
    var(&a, "chasquid/smtpOut/sts/security", "pass", 1);
    var(&a, "chasquid/smtpOut/sts/security", "fail", 1);
    // The cache survives a restart of deliverd: no new fetch for match.test.
    let fetched = match_sts.hits();
    assert_eq!(fetched, 1);
    assert!(
        a.data_dir.join("sts-cache/pol:match.test").exists(),
        "cached on disk"
    );
    a.stop("deliverd");
    a.start("deliverd");
    assert_eq!(
        submit(&a, &["y@match.test"], &message("again", "cached\r\n")),
        250
    );
    good.wait_messages(3);
    assert_eq!(match_sts.hits(), fetched, "served from the cache");
    var(&a, "chasquid/sts/cache/hits", "", 1);
}

#[test]
fn forwarding_via_servers_rewrites_the_sender_of_outside_mail() {
    let w = World::new();
    let ip = random_loopback();
    let mx = PyMx::start(MxOpts::at(ip.into()));
    // Outgoing connections from a chosen local address (chasquid #22).
    let source = random_loopback();
    let tambo_extra = format!("outgoing_source_address = [\"{source}\"]\n");
    let mut a = w.sender(mx.port(), "", &tambo_extra, "");
    std::fs::write(
        a.config_dir.join("domains").join(DOMAIN).join("aliases"),
        format!("list: dave@via.test via {ip}\nout: erin@far.test\n"),
    )
    .unwrap();
    w.mx("far.test", ip);
    a.start_all();
    // Mail from another domain, to two aliases that send it on.
    let r = a.send(
        "carol@elsewhere.test",
        &["list@example.test", "out@example.test"],
        &message("fwd", "on\r\n"),
    );
    assert_eq!(r.code, 250);
    let got = mx.wait_messages(2);
    for m in &got {
        let alias = if m.rcpt_tos == ["dave@via.test"] {
            "list"
        } else {
            assert_eq!(m.rcpt_tos, ["erin@far.test"]);
            "out"
        };
        assert_eq!(
            m.mail_from,
            format!("{alias}+fwd_from=carol=elsewhere.test@example.test"),
            "send-only SRS"
        );
        let peer = m.peer.clone().unwrap_or_default();
        assert!(
            peer.contains(&source.to_string()),
            "from {peer}, not {source}"
        );
    }
    assert_eq!(var(&a, "chasquid/queue/deliverAttempts", "forward", 1), 1);
    // `via` needs no MX and no MTA-STS: via.test was never looked up.
    let queries = w.dns.queries();
    assert!(queries.iter().any(|(n, _)| n == "far.test"), "{queries:?}");
    assert!(
        queries.iter().all(|(n, _)| !n.contains("via.test")),
        "{queries:?}"
    );
}

#[test]
fn lmtp_gives_each_recipient_its_own_reply() {
    let lmtp = PyMx::start(
        MxOpts::at(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .lmtp()
            .rcpt_data_reply("bob@example.test", "550 5.2.1 mailbox disabled"),
    );
    let tambo_extra = format!(
        "lmtp_address = \"127.0.0.1:{}\"\nmaildir = \"\"\n",
        lmtp.port()
    );
    let mut a = Tambo::new("", &tambo_extra, "");
    a.start_all();
    let r = a.send(
        "ann@example.test",
        &["ann@example.test", "bob@example.test"],
        &message("lmtp", "both\r\n"),
    );
    assert_eq!(r.code, 250);
    // One transaction for both (the server keeps the message for ann
    // only); then the DSN for bob, to ann, by LMTP too.
    let got = lmtp.wait_messages(2);
    assert_eq!(got[0].rcpt_tos, ["ann@example.test"]);
    assert_eq!(got[1].rcpt_tos, ["ann@example.test"]);
    let log = lmtp.log();
    let first_data = log.find("DATA").unwrap();
    assert!(
        log[..first_data].contains("RCPT TO:<ann@example.test>")
            && log[..first_data].contains("RCPT TO:<bob@example.test>"),
        "{log}"
    );
    let dsn = got[1].data_str();
    assert!(dsn.contains("550 5.2.1 mailbox disabled"), "{dsn}");
    assert!(
        dsn.contains("X-Failed-Recipients: bob@example.test"),
        "{dsn}"
    );
    a.wait_queue_empty();
    assert!(
        lmtp.log().contains("LHLO mx.example.test"),
        "{}",
        lmtp.log()
    );
}

#[test]
fn a_big_destination_is_split_into_transactions_and_long_replies_survive() {
    let w = World::new();
    let ip = random_loopback();
    // Every recipient refused with a long reply, except the first.
    let long = format!(
        "550 5.1.1 {}",
        "no such mailbox, look it up again ".repeat(12)
    );
    let mx = PyMx::start(
        MxOpts::at(ip.into())
            .rcpt_reply("u0@far.test", "250 2.1.5 ok")
            .rcpt_reply("*", &long),
    );
    w.mx("far.test", ip);
    let mut a = w.sender(mx.port(), "", "", "");
    a.start_all();
    let to: Vec<String> = (0..60).map(|i| format!("u{i}@far.test")).collect();
    let refs: Vec<&str> = to.iter().map(String::as_str).collect();
    assert_eq!(submit(&a, &refs, &message("many", "sixty\r\n")), 250);
    let got = mx.wait_messages(1);
    assert_eq!(got[0].rcpt_tos, ["u0@far.test"]);
    // One DSN naming the 59 others with the server's text, nothing lost to
    // a frame limit, and the link to deliverd never reset.
    let dsn = text(&a.wait_maildir("ann", 1)[0]);
    for i in 1..60 {
        assert!(dsn.contains(&format!("u{i}@far.test")), "u{i}: {dsn}");
    }
    assert!(dsn.contains("look it up again"), "{dsn}");
    a.wait_queue_empty();
    // 50 recipients per transaction at most: two transactions.
    assert_eq!(mx.log().matches("MAIL FROM:").count(), 2, "{}", mx.log());
    assert!(!a.log("queued").contains("deliverd went away"));
}

#[test]
fn an_mx_with_only_an_ipv6_address_is_reached() {
    let w = World::new();
    let mx = PyMx::start(MxOpts::at(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)));
    w.dns.add_mx("six.test", 10, "mx.six.test");
    w.dns.add_aaaa("mx.six.test", std::net::Ipv6Addr::LOCALHOST);
    let mut a = w.sender(mx.port(), "", "", "");
    a.start_all();
    assert_eq!(submit(&a, &["x@six.test"], &message("six", "v6\r\n")), 250);
    let got = mx.wait_messages(1);
    assert_eq!(got[0].rcpt_tos, ["x@six.test"]);
    let peer = got[0].peer.clone().unwrap_or_default();
    assert!(peer.contains("::1"), "{peer}");
    a.wait_queue_empty();
}
