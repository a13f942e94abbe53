//! `haproxy_incoming`: every connection starts with a PROXY header (v1 or
//! v2), whose source becomes the client for Received, for queued and for
//! the per-client cap; on 465 the header comes before the TLS handshake;
//! anything else is closed without a reply, logged and counted.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tambo_e2e::tls::{TlsSmtp, Versions, hash, plain};
use tambo_e2e::*;

const HAPROXY: &str = "haproxy_incoming = true";
const PASSWORD: &str = "correct horse battery staple";

/// A v1 header from `src`:`port` to the server.
fn v1(src: &str, port: u16) -> Vec<u8> {
    let ip: IpAddr = src.parse().unwrap();
    let (proto, dst) = match ip {
        IpAddr::V4(_) => ("TCP4", "198.51.100.25"),
        IpAddr::V6(_) => ("TCP6", "2001:db8:ffff::25"),
    };
    format!("PROXY {proto} {src} {dst} {port} 25\r\n").into_bytes()
}

/// A v2 header: version and command, family, and the block after the
/// 16-byte head (its length is the block's).
fn v2_raw(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(ver_cmd);
    h.push(family);
    h.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    h.extend_from_slice(block);
    h
}

/// A v2 PROXY header from `src`:`port` over TCP, with `tlvs` after the
/// addresses.
fn v2(src: &str, port: u16, tlvs: &[u8]) -> Vec<u8> {
    let (family, mut block) = match src.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => (0x11, [&a.octets()[..], &[198, 51, 100, 25]].concat()),
        IpAddr::V6(a) => {
            let dst: Ipv6Addr = "2001:db8:ffff::25".parse().unwrap();
            (0x21, [a.octets(), dst.octets()].concat())
        }
    };
    block.extend_from_slice(&port.to_be_bytes());
    block.extend_from_slice(&25u16.to_be_bytes());
    block.extend_from_slice(tlvs);
    v2_raw(0x21, family, &block)
}

/// Connects, sends `bytes`, and checks the server closes the connection
/// without sending a single byte.
fn closed_silently(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        // Closed with some of what we sent unread: a reset.
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset) => {}
        Err(e) => panic!("{bytes:?}: not closed: {e}"),
    }
    assert!(
        got.is_empty(),
        "{:?} got a reply: {:?}",
        String::from_utf8_lossy(bytes),
        String::from_utf8_lossy(&got)
    );
}

/// Sends a message to ann through the proxy, announced by `header`; the
/// message as delivered.
fn send_via(t: &Tambo, header: &[u8], subject: &str) -> String {
    let mut c = Smtp::connect_after(t.smtp_addr(), header);
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message(subject, "x\r\n"));
    c.send_raw(b".\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{r:?}");
    c.cmd("QUIT");
    delivered(t, "ann", subject)
}

/// The message with `subject` in `user`'s Maildir, once delivered.
fn delivered(t: &Tambo, user: &str, subject: &str) -> String {
    let needle = format!("Subject: {subject}\r\n");
    wait_for(&format!("{subject:?} for {user}"), || {
        t.maildir(user)
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .find(|m| m.contains(&needle))
    })
}

#[test]
fn v1_and_v2_headers_name_the_client() {
    let mut t = Tambo::new(HAPROXY, "", "");
    t.start_all();
    // ALPN "smtp", then a NOOP: skipped.
    let tlvs = b"\x01\x00\x04smtp\x04\x00\x00";
    let cases = [
        (
            v1("192.0.2.1", 40001),
            "v1-ipv4",
            "[192.0.2.1]",
            "192.0.2.1:40001",
        ),
        (
            v1("2001:db8::1", 40002),
            "v1-ipv6",
            "[IPv6:2001:db8::1]",
            "[2001:db8::1]:40002",
        ),
        (
            v2("192.0.2.2", 40003, tlvs),
            "v2-ipv4",
            "[192.0.2.2]",
            "192.0.2.2:40003",
        ),
        (
            v2("2001:db8::2", 40004, b""),
            "v2-ipv6",
            "[IPv6:2001:db8::2]",
            "[2001:db8::2]:40004",
        ),
        // LOCAL: the proxy speaks for itself; its own address holds.
        (
            v2_raw(0x20, 0x00, b""),
            "v2-local",
            "[127.0.0.1]",
            "127.0.0.1:",
        ),
    ];
    for (header, subject, shown, logged) in cases {
        let m = send_via(&t, &header, subject);
        let from = format!("Received: from client.test ({shown})\r\n");
        assert!(m.contains(&from), "{subject}: {m}");
        if subject != "v2-local" {
            assert!(!m.contains("127.0.0.1"), "the proxy shows: {m}");
        }
        // What queued was told: the AUTH failure budget and the policy
        // see this client too.
        t.wait_log("queued", &format!("queued ip={logged}"));
    }
    // The header and the first command in one write: the command is not
    // lost to the header's reading.
    let header = v1("192.0.2.3", 40005);
    let mut c = Smtp::connect_after(
        t.smtp_addr(),
        &[&header[..], b"EHLO client.test\r\n"].concat(),
    );
    assert_eq!(c.reply().code, 250);
    c.expect("QUIT", 221);
    // A header trickling in byte by byte.
    let mut s = TcpStream::connect(t.smtp_addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    for b in v2("192.0.2.4", 40006, tlvs) {
        s.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut greeting = [0u8; 4];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 ");
}

/// A tambo behind a proxy whose users have known passwords.
fn with_passwords() -> Tambo {
    let mut t = Tambo::new(HAPROXY, "", "");
    let users = t.config_dir.join("domains").join(DOMAIN).join("users");
    std::fs::write(
        &users,
        format!("ann {}\nbob {}\n", hash(PASSWORD), hash(PASSWORD)),
    )
    .unwrap();
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    t
}

#[test]
fn implicit_tls_after_the_header_and_starttls_too() {
    let t = with_passwords();
    // 465: the header in plain text, then the handshake, as HAProxy does.
    let mut c = TlsSmtp::connect_tls_after(
        t.submission_tls_addr(),
        &v1("203.0.113.5", 41000),
        "mx.example.test",
        Versions::Any,
    )
    .expect("a handshake after the PROXY header");
    c.expect("EHLO client.test", 250);
    c.expect(
        &format!("AUTH PLAIN {}", plain("ann@example.test", PASSWORD)),
        235,
    );
    c.expect("MAIL FROM:<ann@example.test>", 250);
    c.expect("RCPT TO:<bob@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("over-465", "x\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    // Authenticated: Received hides the address, queued still has it.
    t.wait_log("queued", "queued ip=203.0.113.5:41000");
    let m = delivered(&t, "bob", "over-465");
    assert!(m.contains("(over submission+TLS, TLS-1."), "{m}");
    // v2 and IPv6 on 465 too.
    let mut c = TlsSmtp::connect_tls_after(
        t.submission_tls_addr(),
        &v2("2001:db8::465", 41001, b""),
        "mx.example.test",
        Versions::Tls12,
    )
    .expect("a handshake after a v2 header");
    c.expect("EHLO client.test", 250);
    // STARTTLS on 25 after the header: the plain reader hands over cleanly.
    let mut c = TlsSmtp::connect_after(t.smtp_addr(), &v1("198.51.100.77", 41002));
    c.expect("EHLO client.test", 250);
    c.starttls("mx.example.test");
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<bob@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("starttls-proxied", "x\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    let m = delivered(&t, "bob", "starttls-proxied");
    assert!(
        m.contains("Received: from client.test ([198.51.100.77])\r\n"),
        "{m}"
    );
    assert!(m.contains("with ESMTPS"), "{m}");
}

#[test]
fn bad_headers_are_closed_without_a_reply_and_counted() {
    let mut t = Tambo::new(HAPROXY, "", "smtp_first_deadline = \"1s\"\n");
    t.start_all();
    let addr = t.smtp_addr();
    let good_v2 = v2("192.0.2.1", 1, b"");
    let mut bad_signature = good_v2.clone();
    bad_signature[11] = b'\r';
    let mut too_long = good_v2.clone();
    too_long[14..16].copy_from_slice(&[0xff, 0xff]);
    let too_short = v2_raw(0x21, 0x11, &good_v2[16..20]);
    let unix = v2_raw(0x21, 0x31, &[0u8; 216]);
    let udp = v2_raw(0x21, 0x12, &good_v2[16..]);
    let overlong = [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat();
    let cases: [&[u8]; 11] = [
        b"PROXY UNKNOWN\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.25 40000\r\n",
        b"PROXY TCP4 192.0.2.300 198.51.100.25 40000 25\r\n",
        &overlong,
        &bad_signature,
        &too_long,
        &too_short,
        &unix,
        &udp,
        b"EHLO client.test\r\n",
        // TCP6 with IPv4 addresses.
        b"PROXY TCP6 192.0.2.1 198.51.100.25 40000 25\r\n",
    ];
    for bytes in cases {
        closed_silently(addr, bytes);
    }
    // Nothing at all: closed at the first deadline.
    let start = Instant::now();
    closed_silently(addr, b"");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    // Part of a header, then silence: the same.
    closed_silently(addr, b"PROXY TCP4 192.0.2.1 ");
    // Closed before a whole header.
    let s = TcpStream::connect(addr).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    t.wait_var("every refusal counted", |v| {
        let m = &v["tambo/smtpIn/proxyErrors"];
        [
            ("unknown", 1),
            ("malformed", 4),
            ("too_long", 2),
            ("not_proxy", 2),
            ("family", 2),
            ("timeout", 2),
            ("closed", 1),
        ]
        .iter()
        .all(|(k, n)| m[k].as_u64() >= Some(*n))
    });
    t.wait_log("smtpd", "closing without a reply: PROXY UNKNOWN");
    t.wait_log("smtpd", "closing without a reply: no PROXY header within");
    // Nothing reached queued, and a good header is still served.
    assert!(!t.log("queued").contains("queued ip="));
    let m = send_via(&t, &v1("192.0.2.9", 40009), "after-the-bad-ones");
    assert!(m.contains("([192.0.2.9])"), "{m}");
}

/// Connects through the "proxy" (all from 127.0.0.1) as `header`'s client;
/// the first line the server sends.
fn first_line(addr: SocketAddr, header: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(header).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

#[test]
fn the_per_client_cap_counts_the_header_source() {
    let mut t = Tambo::new(
        HAPROXY,
        "max_sessions = 5\nmax_sessions_per_client = 2\n",
        "",
    );
    t.start_all();
    let addr = t.smtp_addr();
    let mut held = Vec::new();
    // Two sessions from one client behind the proxy; a third is over its
    // cap, though every connection comes from the same proxy address.
    for port in [1, 2] {
        let (s, line) = first_line(addr, &v1("192.0.2.1", port));
        assert!(line.starts_with("220 "), "{line:?}");
        held.push(s);
    }
    let (_, line) = first_line(addr, &v1("192.0.2.1", 3));
    assert!(line.starts_with("421 4.7.0 "), "{line:?}");
    // Another client behind the same proxy has its own count; an IPv6
    // client counts by /64.
    for src in ["2001:db8:1:2::1", "2001:db8:1:2::2"] {
        let (s, line) = first_line(addr, &v2(src, 4, b""));
        assert!(line.starts_with("220 "), "{line:?}");
        held.push(s);
    }
    let (_, line) = first_line(addr, &v1("2001:db8:1:2::3", 5));
    assert!(line.starts_with("421 4.7.0 "), "{line:?}");
    // The global cap counts raw connections at accept: one that has not
    // sent its header yet takes the fifth slot, and the next connection is
    // refused before it says anything.
    let quiet = TcpStream::connect(addr).unwrap();
    wait_for("the quiet connection to take its slot", || {
        // Says nothing itself, so the 421 is not lost to a reset; and
        // gives up soon if it got in (it would wait for a header).
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = [0u8; 10];
        let n = s.read(&mut got).unwrap_or(0);
        got[..n].starts_with(b"421 4.7.0 ").then_some(())
    });
    drop(quiet);
    drop(held);
    wait_for("the slots to free up", || {
        let (_, line) = first_line(addr, &v1("192.0.2.1", 6));
        line.starts_with("220 ").then_some(())
    });
    t.wait_var("both refusals counted", |v| {
        let m = &v["tambo/smtpIn/sessionsRefused"];
        m["max_sessions_per_client"].as_u64() >= Some(2) && m["max_sessions"].as_u64() >= Some(1)
    });
    let log = t.log("smtpd");
    assert!(
        log.contains("peer=192.0.2.1:3") && log.contains("max_sessions_per_client reached"),
        "the refusal names the client, not the proxy: {log}"
    );
}
