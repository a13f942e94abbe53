//! Budgets at smtpd's and queued's boundaries: each, when exceeded, gives
//! its documented reply (or closes the offending connection) while a
//! well-behaved client is still served.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use tambo_e2e::*;
use tambo_proto::deliver::{FromDeliverd, ToDeliverd};
use tambo_proto::frame::{MAX_SMALL_FRAME, read_frame, write_frame};
use tambo_proto::submit::{Mode, SubmitReply, SubmitRequest};
use tambo_proto::{Role, hello};

/// The first line the server sends.
fn first_line(s: &TcpStream) -> String {
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn session_caps_refuse_with_421_and_others_are_served() {
    let mut t = Tambo::new("", "max_sessions = 5\nmax_sessions_per_client = 3\n", "");
    t.start_all();
    let addr = t.smtp_addr();
    let from_one: Vec<TcpStream> = (0..3).map(|_| connect_from("127.0.0.1", addr)).collect();
    for s in &from_one {
        assert!(first_line(s).starts_with("220 "));
    }
    // A fourth session from the same client: over its own cap.
    let mut over = connect_from("127.0.0.1", addr);
    let line = first_line(&over);
    assert!(line.starts_with("421 4.7.0 "), "{line:?}");
    assert!(closed(&mut over));
    // Another client still gets in, up to the global cap of 5...
    let from_two: Vec<TcpStream> = (0..2).map(|_| connect_from("127.0.0.2", addr)).collect();
    for s in &from_two {
        assert!(first_line(s).starts_with("220 "));
    }
    // ...and a third is over it.
    let mut third = connect_from("127.0.0.3", addr);
    let line = first_line(&third);
    assert!(line.starts_with("421 4.7.0 "), "{line:?}");
    assert!(closed(&mut third));
    // Sessions that got in are served normally; once one ends, its slot is
    // free again.
    drop(from_one);
    wait_for("a slot to free up", || {
        let s = connect_from("127.0.0.1", addr);
        first_line(&s).starts_with("220 ").then_some(())
    });
    drop(from_two);
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("capped", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_var("both refusals counted", |v| {
        let m = &v["tambo/smtpIn/sessionsRefused"];
        m["max_sessions_per_client"].as_u64() >= Some(1) && m["max_sessions"].as_u64() >= Some(1)
    });
}

/// Descriptors a process holds.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Soft and hard "Max open files" of a process.
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut f = line.split_whitespace().skip(3);
    (f.next().unwrap().into(), f.next().unwrap().into())
}

#[test]
fn idle_sessions_cost_queued_nothing() {
    let mut t = Tambo::new(
        "",
        "max_sessions = 2000\nmax_sessions_per_client = 2000\n",
        "",
    );
    t.start_all();
    for d in ["smtpd", "queued", "deliverd", "monitord"] {
        let (soft, hard) = nofile(t.pid(d));
        assert_eq!(soft, hard, "{d} raised its open-files limit");
    }
    let queued = t.pid("queued");
    let before = fd_count(queued);
    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut c = t.smtp();
        c.expect("EHLO idle.example", 250);
        idle.push(c);
    }
    let after = fd_count(queued);
    assert!(
        after < before + 5,
        "300 idle sessions cost queued {} descriptors",
        after - before
    );
    // A real client is served meanwhile.
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("busy", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_maildir("ann", 1);
}

#[test]
fn a_client_silent_inside_data_is_dropped() {
    let mut t = Tambo::new("", "", "smtp_command_timeout = \"300ms\"\n");
    t.start_all();
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: half a message\r\n");
    // ...and nothing more.
    let r = c.reply();
    assert_eq!(r.code, 421, "{r:?}");
    assert!(r.text().starts_with("4.4.2 "), "{r:?}");
    assert!(c.is_closed());
    // Its body file is gone, nothing queued.
    t.wait_queue_empty();
}

/// A body of about `size` bytes in 1000-byte lines.
fn body_of(subject: &str, size: usize) -> Vec<u8> {
    let mut b = message(subject, "");
    while b.len() < size {
        b.extend_from_slice(&[b'x'; 998]);
        b.extend_from_slice(b"\r\n");
    }
    b
}

#[test]
fn bytes_in_flight_over_the_budget_get_452() {
    let mut t = Tambo::new("max_data_size_mb = 1", "max_data_in_flight_mb = 1\n", "");
    t.start_all();
    // A is in the middle of a 600 KiB message.
    let mut a = t.smtp();
    a.expect("EHLO a.example", 250);
    a.expect("MAIL FROM:<a@remote.example>", 250);
    a.expect("RCPT TO:<ann@example.test>", 250);
    a.expect("DATA", 354);
    let body_a = body_of("a", 600 * 1024);
    a.send_raw(&body_a);
    let queue = t.data_dir.join("queue");
    wait_for("A's body to reach the queue", || {
        std::fs::read_dir(&queue).ok()?.flatten().find(|e| {
            e.file_name().to_string_lossy().starts_with("d:")
                && e.metadata().is_ok_and(|m| m.len() >= 400 * 1024)
        })
    });
    // B's 900 KiB would take the total past 1 MiB: 452 4.3.1.
    let r = t.send(
        "b@remote.example",
        &["bob@example.test"],
        &body_of("b", 900 * 1024),
    );
    assert_eq!(r.code, 452, "{r:?}");
    assert!(r.text().starts_with("4.3.1 "), "{r:?}");
    // A is unaffected, and once it is in, the budget is free again.
    a.send_raw(b".\r\n");
    assert_eq!(a.reply().code, 250);
    let r = t.send(
        "c@remote.example",
        &["bob@example.test"],
        &body_of("c", 900 * 1024),
    );
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_maildir("ann", 1);
    t.wait_maildir("bob", 1);
    // A message of exactly the largest size fits the budget, even with
    // the header smtpd adds.
    let mut exact = message("exact", "");
    let mut rem = 1024 * 1024 - exact.len();
    while rem > 0 {
        let mut line = rem.min(1000);
        // Never leave a single byte, which no line can be.
        if rem - line == 1 {
            line -= 1;
        }
        exact.extend(std::iter::repeat_n(b'y', line - 2));
        exact.extend_from_slice(b"\r\n");
        rem -= line;
    }
    assert_eq!(exact.len(), 1024 * 1024);
    let r = t.send("d@remote.example", &["ann@example.test"], &exact);
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_maildir("ann", 2);
}

#[tokio::test(flavor = "current_thread")]
async fn submit_sock_session_cap() {
    let mut t = Tambo::default_setup();
    t.start("monitord");
    t.start("queued");
    t.start("smtpd");
    // A message waits for deliverd.
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("waiting", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let (soft, _) = nofile(t.pid("queued"));
    let cap = 2048.min(soft.parse::<usize>().unwrap() / 4);
    // This test holds that many sockets itself.
    raise_nofile_limit();
    let sock = t.run_dir.join("submit.sock");
    // smtpd's key link and its mail-log link are two of the sessions.
    t.wait_log("smtpd", "TLS ready with");
    t.wait_log("queued", "smtpd's log link is up");
    // A hostile (or runaway) smtpd holds every session queued allows.
    let mut held = Vec::new();
    for _ in 0..cap - 2 {
        held.push(
            hello::connect(&sock, Role::Smtpd, Role::Queued, &ids())
                .await
                .expect("under the cap"),
        );
    }
    let mut extra = UnixStream::connect(&sock).await.unwrap();
    assert!(closed_by_peer(&mut extra).await, "over the cap is closed");
    t.wait_var("the refusal counted", |v| {
        v["tambo/ipc/refused"]["submit:max_sessions"].as_u64() >= Some(1)
    });
    // queued still works for everything else: deliveries go on.
    t.start("deliverd");
    t.wait_maildir("ann", 1);
    // Once the sessions go away, SMTP clients are served again.
    drop(held);
    wait_for("a session to be served again", || {
        let r = t.send(
            "x@remote.example",
            &["bob@example.test"],
            &message("again", "x\r\n"),
        );
        (r.code == 250).then_some(())
    });
}

#[tokio::test(flavor = "current_thread")]
async fn silent_and_oversize_ipc_peers_are_closed() {
    let mut t = Tambo::new("", "", "ipc_idle_timeout = \"500ms\"\n");
    t.start("monitord");
    t.start("queued");
    let submit = t.run_dir.join("submit.sock");
    // Silent after its Session: closed after the idle timeout.
    let mut s = submit_session(&submit).await;
    assert!(closed_by_peer(&mut s).await);
    t.wait_log(
        "queued",
        "submit.sock: closing connection: peer idle for more than 500ms",
    );
    // Outside DATA, a frame larger than any request: closed before it is
    // read.
    let mut s = submit_session(&submit).await;
    s.write_all(&(100_000u32).to_be_bytes()).await.unwrap();
    assert!(closed_by_peer(&mut s).await);
    t.wait_log(
        "queued",
        "frame of 100000 bytes is over the limit for this state",
    );
    // A Session whose client is not an address.
    let mut s = hello::connect(&submit, Role::Smtpd, Role::Queued, &ids())
        .await
        .unwrap();
    write_frame(
        &mut s,
        &SubmitRequest::Session {
            client: "evil\r\nX-Injected: 1".into(),
            mode: Mode::Smtp,
            tls: false,
        },
    )
    .await
    .unwrap();
    assert!(closed_by_peer(&mut s).await);
    t.wait_log("queued", "Session whose client is not an address");
    // A deliverd that says Ready and then nothing, not even heartbeats.
    let deliver = t.run_dir.join("deliver.sock");
    let mut d = hello::connect(&deliver, Role::Deliverd, Role::Queued, &ids())
        .await
        .unwrap();
    write_frame(&mut d, &FromDeliverd::Ready { slots: 1 })
        .await
        .unwrap();
    assert!(closed_by_peer(&mut d).await);
    t.wait_log("queued", "deliver.sock: peer idle for more than 500ms");
    // A well-behaved session still works.
    let mut s = submit_session(&submit).await;
    write_frame(&mut s, &SubmitRequest::Ping).await.unwrap();
    assert_eq!(
        read_frame::<_, SubmitReply>(&mut s).await.unwrap(),
        Some(SubmitReply::Ok)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_deliverd_that_never_answers_cannot_pin_mail() {
    let mut t = Tambo::new("", "", "delivery_job_deadline = \"1s\"\n");
    t.start("monitord");
    t.start("queued");
    t.start("smtpd");
    let deliver = t.run_dir.join("deliver.sock");
    // It takes a job and sits on it, heartbeating so it is not idle.
    let s = hello::connect(&deliver, Role::Deliverd, Role::Queued, &ids())
        .await
        .unwrap();
    let (rd, mut w) = s.into_split();
    write_frame(&mut w, &FromDeliverd::Ready { slots: 1 })
        .await
        .unwrap();
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("pinned", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let mut reader = tambo_proto::fd::FdReader::new(ReadHalf(rd));
    let job = tokio::time::timeout(WAIT, reader.read_frame::<ToDeliverd>(MAX_SMALL_FRAME))
        .await
        .expect("a job")
        .unwrap();
    assert!(job.is_some());
    // Its one slot expires, and queued closes the connection.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            let _ = write_frame(&mut w, &FromDeliverd::Heartbeat).await;
            match tokio::time::timeout(
                Duration::from_millis(200),
                reader.read_frame::<ToDeliverd>(MAX_SMALL_FRAME),
            )
            .await
            {
                Ok(Ok(None) | Err(_)) => return,
                _ => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "queued closed the connection");
    t.wait_log("queued", "no result for job 1 within 1s");
    t.wait_var("the expiry counted", |v| {
        v["tambo/queue/jobsExpired"].as_u64() >= Some(1)
    });
    // A real deliverd gets the retry.
    t.start("deliverd");
    t.wait_maildir("ann", 1);
    t.wait_queue_empty();
}

/// An owned read half, for FdReader.
struct ReadHalf(tokio::net::unix::OwnedReadHalf);

impl AsRef<UnixStream> for ReadHalf {
    fn as_ref(&self) -> &UnixStream {
        self.0.as_ref()
    }
}

#[test]
fn a_slow_but_live_client_keeps_its_transaction() {
    // queued closes quiet links after 1 s here; smtpd must keep this one
    // alive while the client dawdles between commands and inside DATA,
    // each pause well within its own 10 s command timeout.
    let mut t = Tambo::new(
        "",
        "",
        "ipc_idle_timeout = \"1s\"\nsmtp_command_timeout = \"10s\"\n",
    );
    t.start_all();
    let pause = Duration::from_secs(3);
    let mut c = t.smtp();
    c.expect("EHLO slow.example", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    // The pauses are the slow client under test, not a wait for a result.
    std::thread::sleep(pause);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: slow\r\n\r\nfirst line\r\n");
    std::thread::sleep(pause);
    c.send_raw(b"second line\r\n.\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{r:?}");
    let msgs = t.wait_maildir("ann", 1);
    let s = String::from_utf8_lossy(&msgs[0]);
    assert!(s.contains("first line\r\nsecond line\r\n"), "{s}");
    assert!(!t.log("queued").contains("peer idle"), "no link was closed");
}

#[test]
fn a_client_that_trickles_keeps_its_transaction() {
    // Never silent for long, so no smtpd timeout applies; but between its
    // NOOPs, and between its bytes inside DATA, nothing would reach
    // queued for longer than queued's idle timeout (1 s here) unless smtpd
    // keeps the link alive on the link's own clock.
    let mut t = Tambo::new(
        "",
        "",
        "ipc_idle_timeout = \"1s\"\nsmtp_command_timeout = \"10s\"\n",
    );
    t.start_all();
    let step = Duration::from_millis(200);
    let mut c = t.smtp();
    c.expect("EHLO trickle.example", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    // The pacing is the client under test, not a wait for a result.
    for _ in 0..20 {
        c.expect("NOOP", 250);
        std::thread::sleep(step);
    }
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: trickle\r\n\r\n");
    for b in b"one byte at a time\r\n" {
        c.send_raw(&[*b]);
        std::thread::sleep(step);
    }
    c.send_raw(b".\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{r:?}");
    let msgs = t.wait_maildir("ann", 1);
    assert!(String::from_utf8_lossy(&msgs[0]).contains("one byte at a time\r\n"));
    assert!(!t.log("queued").contains("peer idle"), "no link was closed");
}

#[test]
fn a_body_refused_at_its_start_is_read_to_its_end_with_the_link_kept() {
    // smtpd writes its 354 before it has queued's answer to DATA; here
    // the answer is "queue full" (deliverd is not running), so the body
    // is read for nothing, slowly, for longer than queued's idle timeout
    // (1 s): pings keep the link, the refusal comes at the end, and the
    // session goes on.
    let mut t = Tambo::new(
        "max_queue_items = 1",
        "",
        "ipc_idle_timeout = \"1s\"\nsmtp_command_timeout = \"10s\"\n",
    );
    t.start("monitord");
    t.start("queued");
    t.start("smtpd");
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("one", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let step = Duration::from_millis(200);
    let mut c = t.smtp();
    c.expect("EHLO trickle.example", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: refused\r\n\r\n");
    // The pacing is the client under test, not a wait for a result.
    for b in b"one byte at a time\r\n" {
        c.send_raw(&[*b]);
        std::thread::sleep(step);
    }
    c.send_raw(b".\r\n");
    let r = c.reply();
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().starts_with("4.3.0 "), "{r:?}");
    c.expect("NOOP", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    assert!(!t.log("queued").contains("peer idle"), "no link was closed");
    assert_eq!(t.queue_items().len(), 1, "only the first message is queued");
}

/// smtpd answers a plain MAIL without waiting for queued, which answers
/// it too: a client pipelining MAIL after MAIL must not pile up replies
/// nobody reads until queued's writes block and the session hangs.
#[test]
fn a_client_pipelining_thousands_of_mails_is_served() {
    let mut t = Tambo::default_setup();
    t.start_all();
    let mut c = Smtp::connect(t.smtp_addr());
    c.expect("EHLO client.test", 250);
    const MAILS: usize = 3000;
    c.send_raw("MAIL FROM:<>\r\n".repeat(MAILS).as_bytes());
    for i in 0..MAILS {
        let r = c.reply();
        assert_eq!(r.code, 250, "MAIL {i}: {r:?}");
    }
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("after the flood", "x\r\n"));
    c.expect(".", 250);
    t.wait_maildir("ann", 1);
}
