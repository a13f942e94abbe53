//! Tests of the remote-delivery test infrastructure itself, so a failing
//! delivery test can trust its tools: the DNS server (answers, errors,
//! UDP truncation and TCP, dropping queries while down), the CA and the
//! MTA-STS policy server (TLS verified against the CA, answers changed at
//! run time), and mx.py (plain and STARTTLS, fixed replies, LMTP's
//! per-recipient replies, hanging). No tambo daemon runs here.

use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tambo_e2e::ca::TestCa;
use tambo_e2e::dns::{TestDns, random_loopback};
use tambo_e2e::https::{POLICY_PATH, PolicyResponse, PolicyServer};
use tambo_e2e::pymx::{MxOpts, PyMx};
use tambo_e2e::*;

// ---- DNS ----

fn dns_query(name: &str, rtype: RecordType, edns: bool) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

fn udp_ask(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    udp_ask_with(server, &dns_query(name, rtype, true))
}

fn udp_ask_with(server: SocketAddr, q: &Message) -> Message {
    let s = UdpSocket::bind((server.ip(), 0)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.send_to(&q.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 65535];
    let (n, _) = s.recv_from(&mut buf).expect("a UDP answer");
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id);
    r
}

fn tcp_send(s: &mut TcpStream, q: &Message) {
    let bytes = q.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).unwrap();
}

fn tcp_read(s: &mut TcpStream) -> Message {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

fn tcp_ask(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let q = dns_query(name, rtype, false);
    tcp_send(&mut s, &q);
    let r = tcp_read(&mut s);
    assert_eq!(r.metadata.id, q.metadata.id);
    r
}

/// The answers' data as text (MX "10 mx.a.test.", TXT strings joined).
fn rdata(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::MX(mx) => format!("{} {}", mx.preference, mx.exchange),
            RData::TXT(t) => t
                .txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
            other => other.to_string(),
        })
        .collect()
}

#[test]
fn dns_answers_every_kind_over_udp_and_tcp() {
    let dns = TestDns::start();
    dns.add_mx("dest.test", 20, "mx2.dest.test");
    dns.add_mx("Dest.Test.", 10, "mx1.dest.test.");
    dns.null_mx("nomail.test");
    dns.add_a("mx1.dest.test", Ipv4Addr::new(127, 9, 8, 7));
    dns.add_aaaa("mx1.dest.test", Ipv6Addr::LOCALHOST);
    dns.add_txt("_mta-sts.dest.test", "v=STSv1; id=20260101");
    dns.add_cname("alias.dest.test", "mx1.dest.test");
    dns.add_a("a.b.deep.test", Ipv4Addr::new(127, 0, 0, 2));
    dns.servfail("broken.test");
    let addr = dns.addr();
    for tcp in [false, true] {
        let ask = |name: &str, t: RecordType| {
            if tcp {
                tcp_ask(addr, name, t)
            } else {
                udp_ask(addr, name, t)
            }
        };
        let how = if tcp { "TCP" } else { "UDP" };

        let r = ask("DEST.test.", RecordType::MX);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{how}");
        assert!(r.metadata.authoritative);
        let mut mx = rdata(&r);
        mx.sort();
        assert_eq!(mx, ["10 mx1.dest.test.", "20 mx2.dest.test."], "{how}");

        assert_eq!(rdata(&ask("nomail.test", RecordType::MX)), ["0 ."], "{how}");
        assert_eq!(
            rdata(&ask("mx1.dest.test", RecordType::A)),
            ["127.9.8.7"],
            "{how}"
        );
        assert_eq!(
            rdata(&ask("mx1.dest.test", RecordType::AAAA)),
            ["::1"],
            "{how}"
        );
        assert_eq!(
            rdata(&ask("_mta-sts.dest.test", RecordType::TXT)),
            ["v=STSv1; id=20260101"],
            "{how}"
        );
        // A CNAME is followed.
        let r = ask("alias.dest.test", RecordType::A);
        assert_eq!(rdata(&r), ["mx1.dest.test.", "127.9.8.7"], "{how}");

        // A name an MX only points to does not exist.
        let r = ask("mx2.dest.test", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{how}");
        // An existing name without that type: NOERROR, no answer.
        let r = ask("mx1.dest.test", RecordType::MX);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{how}");
        assert!(r.answers.is_empty(), "{how}");
        // So is a name with names under it only.
        let r = ask("b.deep.test", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{how}");
        assert!(r.answers.is_empty(), "{how}");
        // Unknown: NXDOMAIN.
        let r = ask("nowhere.test", RecordType::MX);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{how}");
        // SERVFAIL, whatever the type.
        for t in [RecordType::MX, RecordType::A, RecordType::TXT] {
            let r = ask("broken.test", t);
            assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{how}");
        }
    }

    // Edits are seen at once.
    dns.nxdomain("nomail.test");
    let r = udp_ask(addr, "nomail.test", RecordType::MX);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    // Names under it keep a name in existence.
    dns.nxdomain("dest.test");
    let r = udp_ask(addr, "dest.test", RecordType::MX);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    dns.clear_servfail("broken.test");
    let r = udp_ask(addr, "broken.test", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    dns.remove("mx1.dest.test", RecordType::A);
    let r = udp_ask(addr, "mx1.dest.test", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());

    // The log: lower case, no trailing dot, in order.
    let q = dns.queries();
    assert_eq!(q[0], ("dest.test".to_string(), RecordType::MX));
    assert_eq!(dns.query_count("DEST.TEST."), 3);
    assert_eq!(dns.query_count("nomail.test"), 3);
    assert_eq!(dns.query_count("broken.test"), 7);
}

#[test]
fn dns_long_txt_is_split_and_truncated_over_udp() {
    let dns = TestDns::start();
    // A DKIM record for a 4096-bit RSA key is ~740 bytes.
    let key: String = (0..740).map(|i| (b'A' + (i % 26) as u8) as char).collect();
    let text = format!("v=DKIM1; k=rsa; p={key}");
    dns.add_txt("sel._domainkey.dest.test", &text);
    dns.add_txt("empty.dest.test", "");

    let r = tcp_ask(dns.addr(), "sel._domainkey.dest.test", RecordType::TXT);
    let RData::TXT(t) = &r.answers[0].data else {
        panic!("{r:?}")
    };
    let lens: Vec<usize> = t.txt_data.iter().map(|s| s.len()).collect();
    assert!(lens.iter().all(|&l| l <= 255), "{lens:?}");
    assert_eq!(lens.len(), text.len().div_ceil(255));
    assert_eq!(rdata(&r), [text.as_str()]);

    // Over UDP with EDNS (1232 bytes) it fits; without, 512 bytes don't
    // hold it: TC, so a resolver retries over TCP.
    let r = udp_ask(dns.addr(), "sel._domainkey.dest.test", RecordType::TXT);
    assert!(!r.metadata.truncation);
    assert_eq!(rdata(&r), [text]);
    let r = udp_ask_with(
        dns.addr(),
        &dns_query("sel._domainkey.dest.test", RecordType::TXT, false),
    );
    assert!(r.metadata.truncation);
    assert!(r.answers.is_empty());

    assert_eq!(
        rdata(&udp_ask(dns.addr(), "empty.dest.test", RecordType::TXT)),
        [""]
    );
}

#[test]
fn dns_down_drops_queries_unanswered() {
    let dns = TestDns::start_on(IpAddr::V6(Ipv6Addr::LOCALHOST));
    dns.add_a("mx.dest.test", Ipv4Addr::new(127, 0, 0, 3));
    let addr = dns.addr();
    dns.set_down(true);

    // UDP: the first query is logged but never answered; the first answer
    // the socket gets is the one to the query sent after coming back up
    // (one server task answers in order).
    let s = UdpSocket::bind((addr.ip(), 0)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let q1 = dns_query("mx.dest.test", RecordType::A, true);
    s.send_to(&q1.to_vec().unwrap(), addr).unwrap();
    wait_for("the dropped UDP query in the log", || {
        (dns.query_count("mx.dest.test") == 1).then_some(())
    });

    // TCP likewise, on one connection.
    let mut t = TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    let t1 = dns_query("mx.dest.test", RecordType::A, false);
    tcp_send(&mut t, &t1);
    wait_for("the dropped TCP query in the log", || {
        (dns.query_count("mx.dest.test") == 2).then_some(())
    });

    dns.set_down(false);
    let q2 = dns_query("mx.dest.test", RecordType::A, true);
    s.send_to(&q2.to_vec().unwrap(), addr).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(
        r.metadata.id, q2.metadata.id,
        "the dropped query was answered"
    );
    assert_eq!(rdata(&r), ["127.0.0.3"]);

    let t2 = dns_query("mx.dest.test", RecordType::A, false);
    tcp_send(&mut t, &t2);
    let r = tcp_read(&mut t);
    assert_eq!(
        r.metadata.id, t2.metadata.id,
        "the dropped query was answered"
    );
    assert_eq!(dns.query_count("mx.dest.test"), 4);
}

// ---- CA and the MTA-STS policy server ----

fn client_config(ca: &TestCa) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.root_der())).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A verified HTTPS GET: (status, head, body), or the TLS error.
fn https_get(
    addr: SocketAddr,
    ca: &TestCa,
    host: &str,
    path: &str,
) -> Result<(u16, String, String), String> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let conn = ClientConnection::new(
        client_config(ca),
        ServerName::try_from(host.to_string()).unwrap(),
    )
    .unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    tls.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Ok((status, head.to_string(), body.to_string()))
}

#[test]
fn policy_server_serves_over_tls_verified_against_the_ca() {
    let ca = TestCa::new();
    let ip = IpAddr::V4(random_loopback());
    let host = "mta-sts.dest.test";
    let sts = PolicyServer::start(ip, &ca, host);
    assert_eq!(sts.addr().ip(), ip);

    let (status, _, _) = https_get(sts.addr(), &ca, host, POLICY_PATH).unwrap();
    assert_eq!(status, 404, "no policy set yet");

    sts.set(PolicyResponse::policy(
        "enforce",
        &["mx1.dest.test", "*.dest.test"],
        86400,
    ));
    let (status, head, body) = https_get(sts.addr(), &ca, host, POLICY_PATH).unwrap();
    assert_eq!(status, 200);
    assert!(
        head.lines().any(|l| l == "Content-Type: text/plain"),
        "{head}"
    );
    assert_eq!(
        body,
        "version: STSv1\r\nmode: enforce\r\nmx: mx1.dest.test\r\nmx: *.dest.test\r\nmax_age: 86400\r\n"
    );

    sts.set(PolicyResponse {
        status: 200,
        content_type: Some("application/json".into()),
        headers: vec![("X-Test".into(), "yes".into())],
        body: b"{}".to_vec(),
    });
    let (_, head, body) = https_get(sts.addr(), &ca, host, POLICY_PATH).unwrap();
    assert!(
        head.lines().any(|l| l == "Content-Type: application/json"),
        "{head}"
    );
    assert!(head.lines().any(|l| l == "X-Test: yes"), "{head}");
    assert_eq!(body, "{}");

    let (status, _, _) = https_get(sts.addr(), &ca, host, "/other").unwrap();
    assert_eq!(status, 404);
    assert_eq!(sts.hits(), 3, "only the policy path counts");
    assert_eq!(
        sts.requests().last().unwrap(),
        "GET /other HTTP/1.1 host=mta-sts.dest.test"
    );

    // Verification is real: another name, another CA, an expired leaf.
    let err = https_get(sts.addr(), &ca, "mta-sts.other.test", POLICY_PATH).unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    let err = https_get(sts.addr(), &TestCa::new(), host, POLICY_PATH).unwrap_err();
    assert!(err.to_lowercase().contains("unknownissuer"), "{err}");
    let (cert, key) = ca.expired_leaf(&[host]);
    let old = PolicyServer::start_with_cert(SocketAddr::new(ip, 0), &cert, &key);
    let err = https_get(old.addr(), &ca, host, POLICY_PATH).unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");

    // A second server on the first one's port, on another address.
    let ip2 = IpAddr::V4(random_loopback());
    let sts2 = PolicyServer::start_at(SocketAddr::new(ip2, sts.port()), &ca, &["mta-sts.two.test"]);
    assert_eq!(sts2.port(), sts.port());
    sts2.set(PolicyResponse::ok("two"));
    let (_, _, body) = https_get(sts2.addr(), &ca, "mta-sts.two.test", POLICY_PATH).unwrap();
    assert_eq!(body, "two");

    // Roots on disk, as deliverd reads them.
    let dir = tempfile::tempdir().unwrap();
    ca.write_roots(&dir.path().join("roots.pem"));
    let pem = std::fs::read_to_string(dir.path().join("roots.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert_eq!(pem, ca.roots_pem());
}

#[test]
fn policy_server_can_hang() {
    let ca = TestCa::new();
    let host = "mta-sts.slow.test";
    let sts = PolicyServer::start(IpAddr::V4(random_loopback()), &ca, host);
    sts.set(PolicyResponse::ok("late"));
    sts.set_hang(true);
    let addr = sts.addr();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let conn =
        ClientConnection::new(client_config(&ca), ServerName::try_from(host).unwrap()).unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    write!(tls, "GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    wait_for("the request to arrive", || (sts.hits() == 1).then_some(()));
    // Counted, and no answer comes (the read times out, not EOF).
    let mut b = [0u8; 1];
    let e = tls.read(&mut b).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    sts.set_hang(false);
    let (_, _, body) = https_get(addr, &ca, host, POLICY_PATH).unwrap();
    assert_eq!(body, "late");
}

// ---- mx.py ----

fn swaks(mx: &PyMx, to: &str, tls: bool) -> String {
    let mut c = Command::new(tool("swaks"));
    c.args(["--server", &mx.addr().to_string()])
        .args(["--from", "ann@example.test", "--to", to])
        .args(["--ehlo", "client.example.test"])
        .args(["--header", "Subject: via swaks"]);
    if tls {
        c.arg("--tls");
    }
    let out = c.output().unwrap();
    let talk = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "swaks failed:\n{talk}\n{}", mx.log());
    talk
}

#[test]
fn mx_accepts_with_and_without_starttls() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.write_leaf(dir.path(), "mx", &["mx1.dest.test"]);
    let mx = PyMx::start(
        MxOpts::at(IpAddr::V4(random_loopback()))
            .hostname("mx1.dest.test")
            .tls(&cert, &key),
    );

    let talk = swaks(&mx, "bob@dest.test", false);
    assert!(talk.contains("250-STARTTLS"), "{talk}");
    assert!(!talk.contains("AUTH"), "a plain MX offers no AUTH: {talk}");
    let got = mx.wait_messages(1);
    assert_eq!(got[0].mail_from, "ann@example.test");
    assert_eq!(got[0].rcpt_tos, ["bob@dest.test"]);
    assert!(!got[0].tls);
    assert_eq!(got[0].helo.as_deref(), Some("client.example.test"));
    assert!(got[0].data_str().contains("Subject: via swaks\r\n"));

    swaks(&mx, "carol@dest.test", true);
    let got = mx.wait_messages(2);
    assert_eq!(got[1].rcpt_tos, ["carol@dest.test"]);
    assert!(got[1].tls);
    assert!(got[1].tls_version.as_deref().unwrap().starts_with("TLSv1."));

    // The certificate verifies against the CA, as deliverd will check it.
    let mut tcp = TcpStream::connect(mx.addr()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::new(tcp.try_clone().unwrap());
    assert_eq!(read_reply(&mut r).unwrap().code, 220);
    tcp.write_all(b"EHLO client.test\r\n").unwrap();
    assert_eq!(read_reply(&mut r).unwrap().code, 250);
    tcp.write_all(b"STARTTLS\r\n").unwrap();
    assert_eq!(read_reply(&mut r).unwrap().code, 220);
    assert!(r.buffer().is_empty());
    let conn = ClientConnection::new(
        client_config(&ca),
        ServerName::try_from("mx1.dest.test").unwrap(),
    )
    .unwrap();
    let mut tls = BufReader::new(StreamOwned::new(conn, tcp));
    tls.get_mut().write_all(b"EHLO client.test\r\n").unwrap();
    let ehlo = read_reply(&mut tls).unwrap();
    assert_eq!(ehlo.code, 250);
    assert!(!ehlo.text().contains("STARTTLS"), "{ehlo:?}");
    tls.get_mut().write_all(b"QUIT\r\n").unwrap();
    assert_eq!(read_reply(&mut tls).unwrap().code, 221);
}

fn send_through(c: &mut Smtp, rcpts: &[(&str, u16)], body: &str) {
    c.expect("MAIL FROM:<ann@example.test>", 250);
    for (r, code) in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), *code);
    }
    c.expect("DATA", 354);
    c.send_raw(body.as_bytes());
    c.send_raw(b".\r\n");
}

#[test]
fn mx_gives_fixed_rcpt_and_data_replies() {
    let mx = PyMx::start(
        MxOpts::default()
            .rcpt_reply("Later@dest.test", "451 4.7.1 try later")
            .rcpt_reply("gone@dest.test", "550 5.1.1 no such user"),
    );
    let mut c = Smtp::connect(mx.addr());
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<ann@example.test>", 250);
    let r = c.expect("RCPT TO:<later@DEST.test>", 451);
    assert_eq!(r.text(), "4.7.1 try later");
    let r = c.expect("RCPT TO:<gone@dest.test>", 550);
    assert_eq!(r.text(), "5.1.1 no such user");
    c.expect("RCPT TO:<bob@dest.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: one\r\n\r\n..dotted\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    let got = mx.wait_messages(1);
    assert_eq!(got[0].rcpt_tos, ["bob@dest.test"]);
    assert_eq!(got[0].data, b"Subject: one\r\n\r\n.dotted\r\n");
    c.expect("QUIT", 221);

    // A refused message is not stored.
    let mx = PyMx::start(MxOpts::default().data_reply("554 5.7.1 not today"));
    let mut c = Smtp::connect(mx.addr());
    c.expect("EHLO client.test", 250);
    send_through(
        &mut c,
        &[("bob@dest.test", 250)],
        "Subject: two\r\n\r\nx\r\n",
    );
    let r = c.reply();
    assert_eq!((r.code, r.text().as_str()), (554, "5.7.1 not today"));
    c.expect("QUIT", 221);
    assert!(mx.messages().is_empty());
}

#[test]
fn mx_lmtp_replies_per_recipient() {
    let mx = PyMx::start(
        MxOpts::at(IpAddr::V4(random_loopback()))
            .lmtp()
            .rcpt_reply("nobody@dest.test", "550 5.1.1 unknown")
            .rcpt_data_reply("full@dest.test", "452 4.2.2 mailbox full"),
    );
    let mut c = Smtp::connect(mx.addr());
    c.expect("EHLO client.test", 500);
    c.expect("LHLO client.test", 250);
    send_through(
        &mut c,
        &[
            ("ann@dest.test", 250),
            ("nobody@dest.test", 550),
            ("full@dest.test", 250),
            ("bob@dest.test", 250),
        ],
        "Subject: lmtp\r\n\r\nhi\r\n",
    );
    // One reply per accepted recipient, in order.
    let replies: Vec<(u16, String)> = (0..3)
        .map(|_| {
            let r = c.reply();
            (r.code, r.text())
        })
        .collect();
    assert_eq!(replies[0].0, 250);
    assert_eq!(replies[1], (452, "4.2.2 mailbox full".to_string()));
    assert_eq!(replies[2].0, 250);
    c.expect("QUIT", 221);
    let got = mx.wait_messages(1);
    assert_eq!(got[0].rcpt_tos, ["ann@dest.test", "bob@dest.test"]);
    assert_eq!(got[0].data, b"Subject: lmtp\r\n\r\nhi\r\n");
}

#[test]
fn mx_can_hang_after_ehlo() {
    let first = PyMx::start(MxOpts::at(IpAddr::V4(random_loopback())));
    // Another MX on the first one's port, at another address.
    let mx = PyMx::start(
        MxOpts::listen(SocketAddr::new(IpAddr::V4(random_loopback()), first.port()))
            .hang_after_ehlo(),
    );
    assert_eq!(mx.port(), first.port());
    let mut tcp = TcpStream::connect(mx.addr()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::new(tcp.try_clone().unwrap());
    assert_eq!(read_reply(&mut r).unwrap().code, 220);
    tcp.write_all(b"EHLO client.test\r\n").unwrap();
    assert_eq!(read_reply(&mut r).unwrap().code, 250);
    tcp.write_all(b"MAIL FROM:<ann@example.test>\r\n").unwrap();
    wait_for("mx.py to hang", || {
        mx.log().contains("hanging after EHLO").then_some(())
    });
    // Silence: the read times out, the connection stays open.
    tcp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let e = r.read(&mut b).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    // Killed on drop.
    let pid = mx.pid() as i32;
    drop(mx);
    assert!(is_dead(pid));
}
