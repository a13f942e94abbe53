//! Floods: 10,000 connections from one address, and slowloris clients
//! that send a byte now and then. Each is refused or cut by the limits and
//! timeouts, with smtpd's memory bounded, while another client is served.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tambo_e2e::*;

/// One reply's code and text, multi-line replies joined.
fn reply(r: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return (0, text);
        }
        text.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return (line[..3].parse().unwrap_or(0), text);
        }
    }
}

/// A whole transaction from `src`; the reply to the data.
fn send_from(src: &str, addr: SocketAddr, subject: &str) -> (u16, String) {
    let s = connect_from(src, addr);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let (code, text) = reply(&mut r);
    assert_eq!(code, 220, "{text}");
    for (cmd, want) in [
        ("EHLO other.example\r\n", 250),
        ("MAIL FROM:<x@remote.example>\r\n", 250),
        ("RCPT TO:<ann@example.test>\r\n", 250),
        ("DATA\r\n", 354),
    ] {
        w.write_all(cmd.as_bytes()).unwrap();
        let (code, text) = reply(&mut r);
        assert_eq!(code, want, "{cmd}: {text}");
    }
    w.write_all(&message(subject, "x\r\n")).unwrap();
    w.write_all(b".\r\n").unwrap();
    let got = reply(&mut r);
    let _ = w.write_all(b"QUIT\r\n");
    got
}

/// Closes with a reset (SO_LINGER 0): no TIME_WAIT on either side.
fn reset(s: TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let off = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&s, Linger, &off).expect("SO_LINGER");
}

#[test]
fn ten_thousand_connections_from_one_address_leave_another_served() {
    raise_nofile_limit();
    // The default limits: 1000 sessions, 50 per client address.
    let mut t = Tambo::default_setup();
    t.start_all();
    let addr = t.smtp_addr();
    let smtpd = t.pid("smtpd");
    let before = rss_kib(smtpd);

    // The flood: 10,000 connections from 127.0.0.1, reading nothing. The
    // first 100 are held open (50 get a session and keep it); the others
    // are reset once connected, as an attacker would: a plain close would
    // leave smtpd's side in TIME_WAIT, and a later connection from the
    // same port would stall a second on it, which is the kernel's limit
    // on loopback, not smtpd's.
    let started = Instant::now();
    let mut flood = Vec::new();
    for n in 0..10_000 {
        let s = TcpStream::connect(addr).expect("connect");
        if n < 100 {
            flood.push(s);
        } else {
            reset(s);
        }
    }
    let took = started.elapsed();
    eprintln!("10,000 connections opened in {took:?}");
    // smtpd keeps up: with the standard library's 128-deep accept queue,
    // connections waited a second each for SYN retries (54 s here, 0.4 s
    // with the system's maximum).
    assert!(took < Duration::from_secs(20), "{took:?}");
    let v = t.wait_var("the flood refused", |v| {
        v["tambo/smtpIn/sessionsRefused"]["max_sessions_per_client"].as_u64() >= Some(9_950)
    });
    let refused = v["tambo/smtpIn/sessionsRefused"]["max_sessions_per_client"].clone();

    // Another address is served, while the 50 the flood got hold on.
    let (code, text) = send_from("127.0.0.2", addr, "beside the flood");
    assert_eq!(code, 250, "{text}");
    t.wait_maildir("ann", 1);

    // What the refused ones read: a 421 4.7.0, then the end.
    let mut over = flood.last().unwrap().try_clone().unwrap();
    over.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = String::new();
    let _ = over.read_to_string(&mut got);
    assert!(got.starts_with("421 4.7.0 "), "{got:?}");

    let after = rss_kib(smtpd);
    eprintln!("smtpd RSS {before} KiB before, {after} KiB after; refused {refused}");
    assert!(
        after < before + 16 * 1024,
        "smtpd grew from {before} to {after} KiB"
    );
    drop(flood);
}

#[test]
fn slowloris_clients_are_cut_by_the_command_timeout() {
    raise_nofile_limit();
    let mut t = Tambo::new(
        "",
        "max_sessions_per_client = 500\n",
        "smtp_command_timeout = \"2s\"\n",
    );
    t.start_all();
    let addr = t.smtp_addr();
    let smtpd = t.pid("smtpd");
    let before = rss_kib(smtpd);
    // 300 clients that each start a command and then send one byte a
    // second: never silent for the whole timeout, never a whole line.
    let mut slow: Vec<TcpStream> = (0..300)
        .map(|_| {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut line = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert!(line.starts_with("220 "), "{line:?}");
            s
        })
        .collect();
    let started = Instant::now();
    let peak = std::thread::scope(|scope| {
        let drip = scope.spawn(|| {
            let mut peak = 0;
            // The pacing is the attack under test, not a wait for a result.
            for _ in 0..8 {
                for s in slow.iter_mut() {
                    let _ = s.write_all(b"E");
                }
                peak = peak.max(rss_kib(smtpd));
                std::thread::sleep(Duration::from_secs(1));
            }
            peak
        });
        // Meanwhile an honest client is served.
        let (code, text) = send_from("127.0.0.2", addr, "beside the slowloris");
        assert_eq!(code, 250, "{text}");
        drip.join().unwrap()
    });
    // Every slow client was told and closed within the timeout (plus the
    // drip's own second).
    for s in &mut slow {
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        assert!(got.starts_with("421 4.4.2 "), "{got:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    eprintln!("smtpd RSS {before} KiB before, at most {peak} KiB with 300 slow clients");
    assert!(
        peak < before + 16 * 1024,
        "smtpd grew from {before} to {peak} KiB"
    );
    t.wait_maildir("ann", 1);
}
