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
    // Both deliveries: the one counted before monitord died comes back
    // with each process's baseline.
    t.wait_var("counters after the restart", |v| {
        v["chasquid/queue/deliverAttempts"]["email:local"] == 2 && v["chasquid/queue/putCount"] == 2
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

// A hostile peer on monitor.sock (what a compromised smtpd could send),
// and idle or greedy clients of both of monitord's sockets: each budget is
// exceeded while a well-behaved peer is still served.

mod budgets {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use tambo_e2e::*;
    use tambo_proto::Role;
    use tambo_proto::frame::write_frame;
    use tambo_proto::hello;
    use tambo_proto::monitor::{
        Delta, MAX_DELTAS_PER_FRAME, MAX_FLAG_VALUE, MAX_FLAGS, MAX_MONITOR_CONNECTIONS,
        MAX_MONITOR_FRAME, MAX_NAME, MAX_NEW_KEYS_PER_CONNECTION, MAX_REGISTER_FRAME,
        MonitorMessage,
    };

    /// monitord's `http::MAX_CONNECTIONS` (monitord is a binary crate).
    const HTTP_MAX_CONNECTIONS: usize = 64;

    fn registration(version: &str, flags: Vec<(String, String)>) -> MonitorMessage {
        MonitorMessage::Register {
            role: Role::Smtpd,
            pid: 4242,
            version: version.into(),
            flags,
            instance: 4242,
            config: String::new(),
        }
    }

    async fn connect(sock: &Path) -> UnixStream {
        hello::connect(sock, Role::Smtpd, Role::Monitord, &ids())
            .await
            .expect("handshake")
    }

    async fn register(sock: &Path) -> UnixStream {
        let mut s = connect(sock).await;
        write_frame(&mut s, &registration("hostile", vec![]))
            .await
            .unwrap();
        s
    }

    async fn push(s: &mut UnixStream, deltas: Vec<Delta>) {
        write_frame(s, &MonitorMessage::Deltas(deltas))
            .await
            .unwrap();
    }

    fn delta(var: &str, label: Option<&str>, value: u64) -> Delta {
        Delta {
            var: var.into(),
            label: label.map(String::from),
            value,
        }
    }

    /// True once monitord has closed the connection (it writes nothing
    /// after the hello but profile requests, which none of these tests
    /// asks for, so any read ends only then).
    async fn closed(s: &mut UnixStream) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(WAIT, s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Reads until the server closes the connection (whatever it sends
    /// first), failing after `limit`.
    fn wait_closed(s: &mut TcpStream, limit: Duration) {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("the server did not close the connection in {limit:?}: {e}"),
            }
        }
    }

    /// Reads one response with a Content-Length body; returns its status.
    fn read_response(s: &mut TcpStream) -> u16 {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "closed mid-response");
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("content-length");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        head.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A GET that may fail (the server closed the connection at once).
    fn try_get(t: &Tambo, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(t.http_addr()).ok()?;
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
        let mut first = [0u8; 12];
        s.read_exact(&mut first).ok()?;
        std::str::from_utf8(&first[9..12]).ok()?.parse().ok()
    }

    fn send_one(t: &Tambo, subject: &str) {
        let r = t.send(
            "x@remote.example",
            &["ann@example.test"],
            &message(subject, "x\r\n"),
        );
        assert_eq!(r.code, 250, "{r:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hostile_monitor_client_is_bounded() {
        let mut t = Tambo::default_setup();
        t.start_all();
        let sock = t.run_dir.join("monitor.sock");
        let mut s = register(&sock).await;

        // Bad names, a reserved one and a kind mismatch are dropped and
        // counted; the good delta of the same batch applies.
        let long = "x".repeat(MAX_NAME + 1);
        push(
            &mut s,
            vec![
                delta(&long, None, 1),
                delta("tambo/e2e/labels", Some(&long), 1),
                delta("", None, 1),
                delta("tambo/monitord/droppedKeys", None, 1000),
                delta("chasquid/queue/putCount", Some("x"), 1),
                delta("tambo/e2e/ok", None, 1),
            ],
        )
        .await;
        let v = t.wait_var("the good delta applied, the bad ones counted", |v| {
            let d = &v["tambo/monitord/droppedDeltas"];
            v["tambo/e2e/ok"] == 1
                && d["bad_name"] == 3
                && d["reserved"] == 1
                && d["kind_mismatch"] == 1
        });
        assert_eq!(v["tambo/monitord/droppedKeys"], 5, "not forged by the peer");
        assert!(v[&long].is_null());
        assert!(v["tambo/e2e/labels"].is_null());
        assert_eq!(v["chasquid/queue/putCount"], 0);

        // Key budget: `tambo/e2e/ok` was this connection's first new key.
        let labels: Vec<String> = (0..MAX_NEW_KEYS_PER_CONNECTION + 9)
            .map(|i| i.to_string())
            .collect();
        for chunk in labels.chunks(MAX_DELTAS_PER_FRAME) {
            let batch = chunk
                .iter()
                .map(|l| delta("tambo/e2e/keys", Some(l), 1))
                .collect();
            push(&mut s, batch).await;
        }
        // Increases to keys that exist still apply.
        push(
            &mut s,
            vec![
                delta("tambo/e2e/ok", None, 5),
                delta("tambo/e2e/keys", Some("0"), 1),
            ],
        )
        .await;
        let v = t.wait_var("the key budget enforced", |v| {
            v["tambo/e2e/ok"] == 6 && v["tambo/e2e/keys"]["0"] == 2
        });
        let keys = v["tambo/e2e/keys"].as_object().unwrap();
        assert_eq!(keys.len(), MAX_NEW_KEYS_PER_CONNECTION - 1);
        assert_eq!(v["tambo/monitord/droppedDeltas"]["connection_keys"], 10);

        // Other peers still add their keys: the real daemons' counters.
        send_one(&t, "budget");
        t.wait_maildir("ann", 1);
        t.wait_var("the real daemons' counters", |v| {
            v["chasquid/queue/putCount"] == 1
                && v["chasquid/smtpIn/commandCount"]["EHLO"] == 1
                && v["chasquid/queue/deliverAttempts"]["email:local"] == 1
        });

        // A frame over MAX_MONITOR_FRAME closes the connection, from its
        // length alone.
        s.write_all(&(MAX_MONITOR_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        assert!(closed(&mut s).await);

        // More deltas than MAX_DELTAS_PER_FRAME in one frame: closed, and
        // none applied.
        let mut s = register(&sock).await;
        let batch = (0..=MAX_DELTAS_PER_FRAME)
            .map(|_| delta("tambo/e2e/many", None, 1))
            .collect();
        push(&mut s, batch).await;
        assert!(closed(&mut s).await);

        // A registration over MAX_REGISTER_FRAME: closed.
        let mut s = connect(&sock).await;
        let flags = vec![("f".to_string(), "v".repeat(MAX_REGISTER_FRAME))];
        // monitord may close before the whole frame is written.
        let _ = write_frame(&mut s, &registration("big", flags)).await;
        assert!(closed(&mut s).await);

        // Deltas before the registration, and a second registration.
        let mut s = connect(&sock).await;
        push(&mut s, vec![delta("tambo/e2e/early", None, 1)]).await;
        assert!(closed(&mut s).await);
        let mut s = register(&sock).await;
        write_frame(&mut s, &registration("again", vec![]))
            .await
            .unwrap();
        assert!(closed(&mut s).await);

        // Over-long and too many registration fields are dropped, not the
        // connection.
        let mut s = connect(&sock).await;
        let mut flags: Vec<(String, String)> = (0..MAX_FLAGS + 5)
            .map(|i| (format!("flag{i}"), "v".into()))
            .collect();
        flags.insert(0, ("long".into(), "v".repeat(MAX_FLAG_VALUE + 1)));
        write_frame(&mut s, &registration(&"9".repeat(MAX_NAME + 1), flags))
            .await
            .unwrap();
        push(&mut s, vec![delta("tambo/e2e/registered", None, 1)]).await;
        let v = t.wait_var("the bounded registration", |v| {
            v["tambo/e2e/registered"] == 1
        });
        // The version, the long flag and the five past MAX_FLAGS.
        assert_eq!(v["tambo/monitord/droppedRegisterFields"], 7);
        let (_, _, flags) = t.http_get("/debug/flags");
        assert!(flags.contains("-flag0=v\n"), "{flags}");
        assert!(!flags.contains(&format!("-flag{MAX_FLAGS}=")), "{flags}");
        assert!(!flags.contains("-long="), "{flags}");

        // Each closing was counted and logged; the well-behaved daemons
        // are still served.
        let v = t.wait_var("the closings counted", |v| {
            v["tambo/ipc/errors"]["monitord"].as_u64() >= Some(5)
        });
        assert!(v["tambo/e2e/many"].is_null());
        assert!(v["tambo/e2e/early"].is_null());
        let log = t.log("monitord");
        assert!(log.contains("is over the limit for this state"), "{log}");
        assert!(log.contains("Deltas over MAX_DELTAS_PER_FRAME"), "{log}");
        assert!(log.contains("second Register"), "{log}");
        send_one(&t, "after");
        t.wait_maildir("ann", 2);
        t.wait_var("the real daemons' counters, again", |v| {
            v["chasquid/queue/putCount"] == 2 && v["chasquid/smtpIn/commandCount"]["EHLO"] == 2
        });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn monitor_sock_connection_cap() {
        let mut t = Tambo::default_setup();
        t.start("monitord");
        let sock = t.run_dir.join("monitor.sock");
        let mut hogs = Vec::new();
        for _ in 0..MAX_MONITOR_CONNECTIONS {
            hogs.push(register(&sock).await);
        }
        // The next one is closed before its hello is answered.
        assert!(
            hello::connect(&sock, Role::Smtpd, Role::Monitord, &ids())
                .await
                .is_err()
        );
        t.wait_var("the refusal counted", |v| {
            v["tambo/ipc/refused"]["monitor:max_connections"].as_u64() >= Some(1)
        });
        t.wait_log("monitord", "refusing a connection: 64 already open");
        // Once they go, real daemons connect and are counted.
        drop(hogs);
        t.start("queued");
        t.start("deliverd");
        t.start("smtpd");
        send_one(&t, "cap");
        t.wait_maildir("ann", 1);
        t.wait_var("the real daemons' counters", |v| {
            v["chasquid/queue/putCount"] == 1 && v["chasquid/smtpIn/commandCount"]["EHLO"] == 1
        });
    }

    /// Kills a test peer however the test ends.
    struct Peer(std::process::Child);

    impl Drop for Peer {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// monitor.sock is 0666 where the group `tambo` does not exist (as
    /// here): any local user can connect. A stranger (uid 1, `daemon`)
    /// saying hello over and over must not get one log line per attempt;
    /// one keeping twice the connection cap open must take none of the
    /// slots, so the daemons' counters still arrive.
    #[test]
    fn strangers_take_no_monitor_sock_slot_and_do_not_flood_the_log() {
        if !is_root() {
            eprintln!("skipped: the stranger must run as another user, which needs root");
            return;
        }
        const STRANGER: u32 = 1;
        let mut t = Tambo::default_setup();
        t.start("monitord");
        let started = Instant::now();
        let sock = t.run_dir.join("monitor.sock");
        let sock = sock.to_str().unwrap();
        let stranger = |name: &str, args: &[&str]| {
            let log = t.log_dir.join(format!("{name}.log"));
            let mut all = vec!["hold", sock];
            all.extend_from_slice(args);
            let p = Peer(spawn_peer_as(STRANGER, STRANGER, &all, &log));
            wait_for(&format!("the {name} to be refused 1000 times"), || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains("reopened"))
            });
            p
        };
        // Every refusal is counted, but logged at most once a second (each
        // kind of refusal has its own limit).
        fn refusal_lines(t: &Tambo, started: Instant) -> String {
            let log = t.log("monitord");
            let secs = started.elapsed().as_secs() + 1;
            let n = log
                .lines()
                .filter(|l| l.contains("monitor.sock: refus"))
                .count() as u64;
            assert!(n >= 1, "{log}");
            assert!(n <= 3 * (secs + 1), "{n} refusal lines in {secs} s: {log}");
            log
        }

        let _knocker = stranger("knocker", &["16", "queued"]);
        refusal_lines(&t, started);
        let silent = (2 * MAX_MONITOR_CONNECTIONS).to_string();
        let _holder = stranger("holder", &[&silent]);

        // The daemons register and push while the strangers keep at it.
        t.start("queued");
        t.start("deliverd");
        t.start("smtpd");
        send_one(&t, "strangers");
        t.wait_maildir("ann", 1);
        let v = t.wait_var("the daemons' counters", |v| {
            v["chasquid/queue/putCount"] == 1
                && v["chasquid/smtpIn/commandCount"]["EHLO"] == 1
                && v["chasquid/queue/deliverAttempts"]["email:local"] == 1
        });
        let roles: Vec<&str> = v["tambo/processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["role"].as_str())
            .collect();
        for role in ["smtpd", "queued", "deliverd"] {
            assert!(roles.contains(&role), "{role} not registered: {v}");
        }
        // Not one stranger got a slot, so the cap was never reached.
        let refused = &v["tambo/ipc/refused"];
        assert!(refused["monitor:max_connections"].is_null(), "{refused}");
        assert!(refused["monitor"].as_u64() >= Some(2000), "{refused}");

        // The next line says how many were left out.
        t.wait_log("monitord", "more since the last such line");
        let log = refusal_lines(&t, started);
        assert!(
            log.contains("monitor.sock: refused a connection at once: uid 1 "),
            "{log}"
        );
        assert!(!log.contains("is not allowed to be Queued"), "{log}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_monitor_connections_are_closed() {
        let mut t = Tambo::new("", "", "ipc_idle_timeout = \"1s\"\n");
        t.start("monitord");
        let sock = t.run_dir.join("monitor.sock");
        let mut idle = register(&sock).await;
        let mut live = register(&sock).await;
        let start = Instant::now();
        // The live peer sends a heartbeat every 200 ms meanwhile.
        let mut b = [0u8; 16];
        loop {
            tokio::select! {
                r = idle.read(&mut b) => {
                    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    push(&mut live, vec![]).await;
                    assert!(start.elapsed() < WAIT, "the idle connection stayed open");
                }
            }
        }
        assert!(
            start.elapsed() >= Duration::from_millis(500),
            "closed after {:?}, before the idle timeout",
            start.elapsed()
        );
        push(&mut live, vec![delta("tambo/e2e/alive", None, 1)]).await;
        t.wait_var("the live peer still served", |v| {
            v["tambo/e2e/alive"] == 1 && v["tambo/ipc/errors"]["monitord"].as_u64() >= Some(1)
        });
        t.wait_log("monitord", "peer idle for more than 1s; closing connection");
    }

    #[test]
    fn idle_http_connections_are_closed() {
        let mut t = Tambo::new("", "", "http_idle_timeout = \"1s\"\n");
        t.start("monitord");
        let addr = t.http_addr();
        // A connection that never sends a request.
        let mut silent = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        wait_closed(&mut silent, WAIT);
        assert!(start.elapsed() >= Duration::from_millis(500));
        // A kept-alive connection: served twice, then closed once idle.
        let mut kept = TcpStream::connect(addr).unwrap();
        kept.set_read_timeout(Some(WAIT)).unwrap();
        for path in ["/debug/vars", "/metrics"] {
            write!(kept, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut kept), 200);
        }
        let start = Instant::now();
        wait_closed(&mut kept, WAIT);
        assert!(start.elapsed() >= Duration::from_millis(500));
        // Normal requests are still served, and the closings counted.
        let v = t.wait_var("idle closings counted", |v| {
            v["tambo/monitord/httpClosed"]["idle"].as_u64() >= Some(2)
        });
        assert!(v["tambo/monitord/httpClosed"]["write_stalled"].is_null());
        assert_eq!(t.http_get("/").0, 200);
    }

    #[test]
    fn http_client_that_stops_reading_is_closed() {
        let mut t = Tambo::new("", "", "http_idle_timeout = \"1s\"\n");
        t.start("monitord");
        let (_, _, vars) = t.http_get("/debug/vars");
        // Pipelined requests whose responses add up to more than any
        // loopback socket buffers, never read.
        let requests = 64 * 1024 * 1024 / vars.len();
        let mut greedy = TcpStream::connect(t.http_addr()).unwrap();
        greedy.set_write_timeout(Some(WAIT)).unwrap();
        let request = b"GET /debug/vars HTTP/1.1\r\nHost: localhost\r\n\r\n";
        // Once monitord gives up, the rest of the writes fail.
        let _ = greedy.write_all(&request.repeat(requests));
        let v = t.wait_var("the stalled connection closed", |v| {
            v["tambo/monitord/httpClosed"]["write_stalled"].as_u64() >= Some(1)
        });
        assert!(v["tambo/monitord/httpClosed"]["idle"].is_null());
        wait_closed(&mut greedy, WAIT);
    }

    #[test]
    fn http_connection_cap() {
        let mut t = Tambo::default_setup();
        t.start("monitord");
        let addr = t.http_addr();
        let hogs: Vec<TcpStream> = (0..HTTP_MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // The next one is closed at once, long before the 30 s idle
        // timeout that would close it otherwise.
        let mut over = TcpStream::connect(addr).unwrap();
        wait_closed(&mut over, Duration::from_secs(10));
        drop(hogs);
        wait_for("a GET to be served again", || {
            (try_get(&t, "/") == Some(200)).then_some(())
        });
        t.wait_var("the refusal counted", |v| {
            v["tambo/monitord/httpClosed"]["max_connections"].as_u64() >= Some(1)
        });
    }

    /// A peer's names and registration cannot rewrite what monitord
    /// writes itself, nor forge lines: pushed variables live under
    /// `chasquid/` or `tambo/` and never take a fixed entry's name, and
    /// registered flags are escaped in /debug/flags.
    #[tokio::test(flavor = "current_thread")]
    async fn pushed_text_cannot_forge_output() {
        let mut t = Tambo::default_setup();
        t.start("monitord");
        let sock = t.run_dir.join("monitor.sock");
        let mut s = connect(&sock).await;
        let flags = vec![
            (
                "config_dir".to_string(),
                "/etc/tambo\n-forged=1\n# queued (pid 1)\r".to_string(),
            ),
            ("a\nb".to_string(), "\x1b[2J\u{2028}".to_string()),
        ];
        write_frame(&mut s, &registration("1.0\nforged", flags))
            .await
            .unwrap();
        let mut pushed: Vec<Delta> = [
            "cmdline",
            "chasquid/version",
            "chasquid/sourceDateStr",
            "chasquid/sourceDateTimestamp",
            "tambo/processes",
            "other/top",
            "tambo",
        ]
        .iter()
        .map(|n| delta(n, None, 7))
        .collect();
        pushed.push(delta("tambo/e2e/ok", None, 1));
        push(&mut s, pushed).await;
        let v = t.wait_var("the good delta applied", |v| v["tambo/e2e/ok"] == 1);
        let dropped = &v["tambo/monitord/droppedDeltas"];
        assert_eq!(dropped["reserved"], 4, "{dropped}");
        assert_eq!(dropped["bad_prefix"], 3, "{dropped}");
        assert!(
            v["cmdline"][0]
                .as_str()
                .unwrap()
                .ends_with("tambo-monitord"),
            "{v}"
        );
        assert_eq!(v["chasquid/version"], env!("CARGO_PKG_VERSION"));
        assert!(v["chasquid/sourceDateStr"].is_string(), "{v}");
        assert!(v["chasquid/sourceDateTimestamp"].as_i64() > Some(1_600_000_000));
        assert_eq!(v["tambo/processes"][0]["role"], "smtpd", "{v}");
        assert!(v["other/top"].is_null() && v["tambo"].is_null(), "{v}");

        let (_, _, flags) = t.http_get("/debug/flags");
        assert_eq!(
            flags,
            "# smtpd (pid 4242)\n\
             -config_dir=/etc/tambo\\n-forged=1\\n# queued (pid 1)\\r\n\
             -a\\nb=\\x1b[2J\\u{2028}\n\n"
        );
        let (_, _, index) = t.http_get("/");
        assert!(index.contains("<td>1.0\\nforged</td>"), "{index}");
        t.wait_log("monitord", "registered (version 1.0\\nforged)");
    }

    /// Whatever names peers push, /metrics stays valid OpenMetrics; checked
    /// with promtool, Prometheus's own parser (REFERENCE §7.3).
    #[tokio::test(flavor = "current_thread")]
    async fn metrics_stay_valid_whatever_peers_push() {
        let mut t = Tambo::default_setup();
        t.start("monitord");
        let sock = t.run_dir.join("monitor.sock");
        let mut s = register(&sock).await;
        push(
            &mut s,
            vec![
                delta("tambo/e2e/q\"uo\\te\nd", None, 1),
                delta("tambo/e2e/map", Some("a \"b\" \\c\nd"), 1),
                delta("tambo/e2e:map", Some("same name"), 1),
                delta("tambo/9/leading/digit", None, 1),
                delta("chasquid/queue:putCount", None, 1),
            ],
        )
        .await;
        t.wait_var("the pushed names", |v| v["tambo/e2e/map"].is_object());
        let (status, _, body) = t.http_get("/metrics");
        assert_eq!(status, 200);
        assert!(body.ends_with("\n# EOF\n"), "{body}");
        assert!(!body.contains("\n\n"), "{body}");
        assert!(!body.contains("# TYPE"), "{body}");
        assert!(!body.contains("non-numeric"), "{body}");
        assert!(body.contains("\nchasquid_queue_putCount 0\n"), "{body}");
        assert!(
            body.contains("tambo_e2e_map{result=\"a \\\"b\\\" \\\\c\\nd\"} 1\n"),
            "{body}"
        );
        assert!(body.contains("\ntambo_9_leading_digit 1\n"), "{body}");
        let promtool = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child =
            promtool.expect("promtool (Debian prometheus, which scripts/test.sh installs)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("promtool check metrics: {}\n{text}", out.status);
        // Its lints (exit status 3) are expected; a parse error (1) is not.
        assert!(
            matches!(out.status.code(), Some(0 | 3)) && !text.contains("error while linting"),
            "promtool: {text}"
        );
    }
}

/// Counters survive a restart of monitord alone: each process sends what it
/// pushed before as a baseline to a monitord that has not counted it.
#[test]
fn counters_survive_a_restart_of_monitord_alone() {
    let mut t = Tambo::default_setup();
    t.start_all();
    assert_eq!(
        t.send(
            "a@remote.test",
            &["ann@example.test"],
            &message("one", "x\r\n")
        )
        .code,
        250
    );
    t.wait_maildir("ann", 1);
    let attempts =
        |v: &serde_json::Value| v["chasquid/queue/deliverAttempts"]["email:local"].clone();
    let counted = |v: &serde_json::Value| {
        v["chasquid/queue/putCount"] == 1
            && attempts(v) == 1
            && v["chasquid/smtpIn/commandCount"]["EHLO"] == 1
    };
    t.wait_var("the first message counted", counted);
    t.kill9("monitord");
    t.start("monitord");
    // Every process reconnects with its baseline: the same totals (queued,
    // deliverd and smtpd alike), not zero and not twice.
    t.wait_var("the same counts after the restart", counted);
    assert_eq!(
        t.send(
            "a@remote.test",
            &["ann@example.test"],
            &message("two", "x\r\n")
        )
        .code,
        250
    );
    t.wait_var("putCount 2", |v| v["chasquid/queue/putCount"] == 2);
}

#[test]
fn debug_config_and_queue_show_what_the_processes_sent() {
    // A message that stays: its only recipient asks to be retried, an
    // hour from now.
    let (mut t, _) = Tambo::holding();
    t.start_all();
    assert_eq!(
        t.send(
            "ann@example.test",
            &["hold@example.test"],
            &message("held", "x\r\n")
        )
        .code,
        250
    );

    let queue = wait_for("the held message in /debug/queue", || {
        let (status, _, body) = t.http_get("/debug/queue");
        (status == 200 && body.contains("PENDING ")).then_some(body)
    });
    assert!(queue.starts_with("# Queue status\n\ndate: "), "{queue}");
    assert!(queue.contains("length: 1\n"), "{queue}");
    assert!(
        queue.contains("from: ann@example.test\nto: [hold@example.test]\n"),
        "{queue}"
    );
    assert!(queue.contains("exited with 75"), "{queue}");

    let (status, _, config) = t.http_get("/debug/config");
    assert_eq!(status, 200);
    for role in ["smtpd", "queued", "deliverd", "monitord"] {
        assert!(
            config.contains(&format!("# {role} (pid ")),
            "{role}: {config}"
        );
    }
    assert!(
        config.contains("\n  hostname = \"mx.example.test\"\n"),
        "{config}"
    );
    assert!(config.contains("\n  [tambo]\n"), "{config}");

    // Each process's runtime, as it says every 5 s.
    let tasks = wait_for("every process's runtime in /debug/tasks", || {
        let (_, _, body) = t.http_get("/debug/tasks");
        (body.matches("  tokio: ").count() == 4).then_some(body)
    });
    for role in ["smtpd", "queued", "deliverd", "monitord"] {
        assert!(
            tasks.contains(&format!("# {role} (pid ")),
            "{role}: {tasks}"
        );
    }
    assert!(tasks.contains("  cpu: user "), "{tasks}");

    let (_, _, index) = t.http_get("/");
    for link in [
        "/debug/vars",
        "/metrics",
        "/debug/flags",
        "/debug/config",
        "/debug/queue",
        "/debug/tasks",
    ] {
        assert!(
            index.contains(&format!("href=\"{link}\"")),
            "{link}: {index}"
        );
    }
}

/// A delivered message leaves a trace in each process it went through:
/// smtpd's session, queued's put and send loop, deliverd's delivery.
#[test]
fn a_delivered_message_is_traced_through_every_process() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let r = t.send(
        "a@remote.test",
        &["ann@example.test"],
        &message("traced", "x\r\n"),
    );
    assert_eq!(r.code, 250);
    let id = r.text().rsplit(' ').next().unwrap().to_string();
    t.wait_maildir("ann", 1);
    let families = [
        "SMTP.Conn",
        "Queue.Put",
        "Queue.SendLoop",
        "Courier.Maildir",
    ];
    let index = wait_for("the four traces", || {
        let (status, _, body) = t.http_get("/debug/traces");
        (status == 200
            && families
                .iter()
                .all(|f| body.contains(&format!("<td>{f}</td>"))))
        .then_some(body)
    });
    assert!(
        index.contains("href=\"/debug/traces?family=Queue.Put&amp;b=0\""),
        "{index}"
    );
    // Each shows this message: the session its commands (AUTH would be
    // redacted), the put and the delivery its queue ID.
    let list = |family: &str| {
        (0..8)
            .map(|b| {
                t.http_get(&format!("/debug/traces?family={family}&b={b}"))
                    .2
            })
            .collect::<String>()
    };
    let conn = list("SMTP.Conn");
    assert!(
        conn.contains("MAIL FROM:&lt;a@remote.test&gt;") && conn.contains("→ 250 2.0.0 Queued as"),
        "{conn}"
    );
    for family in ["Queue.Put", "Queue.SendLoop", "Courier.Maildir"] {
        let page = list(family);
        assert!(page.contains(&id), "{family}: {page}");
    }
    assert!(list("Courier.Maildir").contains("ann@example.test: delivered"));
    assert!(list("Queue.Put").contains("resolved to 1 recipients"));
}

/// No password reaches a trace: not AUTH PLAIN's, not AUTH LOGIN's, not
/// one a client sends after a refusal as a line of its own.
#[test]
fn traces_never_hold_credentials() {
    use tambo_e2e::tls::{TlsSmtp, Versions, b64, plain};
    let mut t = Tambo::default_setup();
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    let secret = "Very-Secret-Pw-42";
    let connect = || {
        let mut s = TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Any)
            .unwrap();
        s.expect("EHLO client.test", 250);
        s
    };
    // A wrong AUTH PLAIN, then the password out of turn, in base64 and in
    // clear (the third error ends the session).
    let mut s = connect();
    s.expect(
        &format!("AUTH PLAIN {}", plain("ann@example.test", secret)),
        535,
    );
    s.expect(&b64(secret.as_bytes()), 500);
    s.expect(secret, 421);
    drop(s);
    // AUTH LOGIN, its answers on lines of their own.
    let mut s = connect();
    s.expect("AUTH LOGIN", 334);
    s.expect(&b64(b"ann@example.test"), 334);
    s.expect(&b64(secret.as_bytes()), 535);
    s.expect("QUIT", 221);
    drop(s);
    let page = wait_for("both sessions' traces", || {
        let all: String = (0..8)
            .map(|b| {
                t.http_get(&format!("/debug/traces?family=SMTP.Conn&b={b}"))
                    .2
            })
            .collect();
        (all.matches("AUTH (arguments redacted)").count() == 2).then_some(all)
    });
    for leak in [
        secret.to_string(),
        b64(secret.as_bytes()),
        plain("ann@example.test", secret),
    ] {
        assert!(!page.contains(&leak), "{leak} in {page}");
    }
}

/// A session still open is on the traces page, under "Running now", with
/// what it has done so far; once it ends it leaves that list.
#[test]
fn an_open_session_shows_as_running() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let mut s = Smtp::connect(t.smtp_addr());
    s.expect("EHLO still-here.test", 250);
    s.expect("MAIL FROM:<slow@remote.test>", 250);
    let running = |page: &str| {
        page.split("<h2>Running now</h2>")
            .nth(1)
            .unwrap_or("")
            .to_string()
    };
    let now = wait_for("the open session among the running", || {
        let (status, _, body) = t.http_get("/debug/traces");
        let r = running(&body);
        (status == 200 && r.contains("MAIL FROM:&lt;slow@remote.test&gt;")).then_some(r)
    });
    assert!(
        now.contains("SMTP.Conn · smtpd (pid ") && now.contains("running for "),
        "{now}"
    );
    assert!(now.contains("EHLO still-here.test"), "{now}");
    s.expect("QUIT", 221);
    wait_for("the session gone from the running", || {
        let (_, _, body) = t.http_get("/debug/traces");
        (!running(&body).contains("slow@remote.test")).then_some(())
    });
}

/// The families beyond mail flow: an AUTH attempt (`Authentication`,
/// never the password), a reload on SIGHUP (`Auth.Reload`,
/// `DomainInfo.Reload`), DKIM verification of a signed message
/// (`DKIM.Verify`, deliverd).
#[test]
fn authentication_reloads_and_checks_are_traced() {
    use tambo_e2e::tls::{TlsSmtp, Versions, b64, plain};
    let mut t = Tambo::default_setup();
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    let secret = "Another-Secret-7";
    let mut s =
        TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Any).unwrap();
    s.expect("EHLO client.test", 250);
    s.expect(
        &format!("AUTH PLAIN {}", plain("ann@example.test", secret)),
        535,
    );
    s.expect("QUIT", 221);
    drop(s);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.pid("queued") as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    // A signature (a bogus one) is what sends a message to deliverd's
    // verifier.
    let mut signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from;\r\n bh=AAAA; b=AAAA\r\n".to_vec();
    signed.extend(message("v", "x\r\n"));
    let r = t.send("a@remote.test", &["ann@example.test"], &signed);
    assert_eq!(r.code, 250);
    let families = [
        "Authentication",
        "Auth.Reload",
        "DomainInfo.Reload",
        "DKIM.Verify",
    ];
    wait_for("the four families", || {
        let (_, _, body) = t.http_get("/debug/traces");
        families
            .iter()
            .all(|f| body.contains(&format!("<td>{f}</td>")))
            .then_some(())
    });
    let all = |family: &str| -> String {
        (0..8)
            .map(|b| {
                t.http_get(&format!("/debug/traces?family={family}&b={b}"))
                    .2
            })
            .chain([t
                .http_get(&format!("/debug/traces?family={family}&errors"))
                .2])
            .collect()
    };
    let auth = all("Authentication");
    assert!(
        auth.contains("ann@example.test") && auth.contains("refused"),
        "{auth}"
    );
    assert!(
        !auth.contains(secret) && !auth.contains(&b64(secret.as_bytes())),
        "{auth}"
    );
    assert!(all("Auth.Reload").contains("SIGHUP"));
    assert!(all("DKIM.Verify").contains("d=example.test: "));
}
