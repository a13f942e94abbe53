//! The connection against a socket pair: replies, limits, idle checks.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn pair() -> (Conn, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    let conn = Conn::new(
        Stream::Unix(a),
        Instant::now() + Duration::from_secs(10),
        Duration::from_secs(10),
    );
    (conn, b)
}

#[tokio::test]
async fn multiline_replies() {
    let (mut c, mut s) = pair().await;
    s.write_all(b"250-mx.test hi\r\n250-SMTPUTF8\n250 8BITMIME\r\n220 next\r\n")
        .await
        .unwrap();
    let r = c.read_reply().await.unwrap();
    assert_eq!(r.code, 250);
    assert_eq!(
        r.lines().collect::<Vec<_>>(),
        ["mx.test hi", "SMTPUTF8", "8BITMIME"]
    );
    assert_eq!(c.read_reply().await.unwrap().text, "next");
}

#[tokio::test]
async fn bad_replies() {
    let (mut c, mut s) = pair().await;
    s.write_all(b"250-a\r\n251 b\r\n").await.unwrap();
    assert!(matches!(c.read_reply().await, Err(ConnError::Malformed(_))));
    let (mut c, mut s) = pair().await;
    s.write_all(b"hello\r\n").await.unwrap();
    assert!(matches!(c.read_reply().await, Err(ConnError::Malformed(_))));
    let (mut c, s) = pair().await;
    drop(s);
    assert!(matches!(c.read_reply().await, Err(ConnError::Closed)));
}

#[tokio::test]
async fn long_lines_are_refused() {
    let (mut c, mut s) = pair().await;
    let mut line = b"250 ".to_vec();
    line.resize(MAX_LINE + 10, b'x');
    tokio::spawn(async move {
        let _ = s.write_all(&line).await;
        let _ = s.write_all(b"\r\n").await;
        s
    });
    assert!(matches!(c.read_reply().await, Err(ConnError::LineTooLong)));
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let (a, _s) = UnixStream::pair().unwrap();
    let mut c = Conn::new(
        Stream::Unix(a),
        Instant::now() + Duration::from_secs(60),
        Duration::from_millis(50),
    );
    assert!(matches!(c.read_reply().await, Err(ConnError::Timeout)));
}

#[tokio::test]
async fn one_reply_is_capped_at_64_kib() {
    // 4000-byte lines: 16 of them (64 000 bytes) fit, 17 do not.
    let line = |last: bool| {
        let mut l = format!("250{}", if last { ' ' } else { '-' }).into_bytes();
        l.resize(3998, b'x');
        l.extend_from_slice(b"\r\n");
        l
    };
    let reply = |lines: usize| {
        let mut all = Vec::new();
        for i in 0..lines {
            all.extend(line(i + 1 == lines));
        }
        all
    };
    let (mut c, mut s) = pair().await;
    let fits = reply(16);
    let writer = tokio::spawn(async move {
        s.write_all(&fits).await.unwrap();
        s
    });
    let r = c.read_reply().await.unwrap();
    assert_eq!(r.lines().count(), 16);
    drop(writer.await.unwrap());

    let (mut c, mut s) = pair().await;
    let over = reply(17);
    tokio::spawn(async move {
        // The client stops reading half-way: the rest may not go.
        let _ = s.write_all(&over).await;
        s
    });
    assert!(matches!(c.read_reply().await, Err(ConnError::ReplyTooLong)));
    // Still far below the per-connection budget: it was this cap.
    assert!(c.budget_left() > REPLY_BUDGET - 2 * MAX_REPLY);
    assert!(c.broken, "a connection out of step is only closed");
}

#[tokio::test]
async fn a_broken_connection_gets_no_quit() {
    let (mut c, mut s) = pair().await;
    s.write_all(b"garbage\r\n").await.unwrap();
    assert!(c.read_reply().await.is_err());
    c.quit().await;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"", "closed without a word");

    // A sound one does.
    let (c, mut s) = pair().await;
    let quit = tokio::spawn(c.quit());
    let mut line = [0u8; 6];
    s.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"QUIT\r\n");
    s.write_all(b"221 bye\r\n").await.unwrap();
    quit.await.unwrap();
}

#[tokio::test]
async fn idle_connections_are_checked_for_data_sent_unasked() {
    // Nothing pending: fit.
    let (mut c, _s) = pair().await;
    assert!(c.check_idle().await.is_ok());
    assert!(c.check_idle().await.is_ok());

    // A line sent unasked (Unix sockets deliver at once).
    let (mut c, mut s) = pair().await;
    s.write_all(b"250 stale\r\n").await.unwrap();
    assert!(matches!(c.check_idle().await, Err(ConnError::Unsolicited)));
    assert!(c.broken);

    // Left in the buffer after a reply.
    let (mut c, mut s) = pair().await;
    s.write_all(b"250 ok\r\n250 extra\r\n").await.unwrap();
    assert_eq!(c.read_reply().await.unwrap().text, "ok");
    assert!(matches!(c.check_idle().await, Err(ConnError::Unsolicited)));

    // Closed by the server while idle.
    let (mut c, s) = pair().await;
    drop(s);
    assert!(matches!(c.check_idle().await, Err(ConnError::Closed)));
}

#[tokio::test]
async fn a_limit_on_the_next_reply_applies_to_it_only() {
    let (a, mut s) = UnixStream::pair().unwrap();
    let mut c = Conn::new(
        Stream::Unix(a),
        Instant::now() + Duration::from_secs(60),
        Duration::from_secs(60),
    );
    s.write_all(b"250 first\r\n").await.unwrap();
    c.limit_next_reply(Duration::from_millis(1));
    assert_eq!(c.once, Some(Duration::from_millis(1)));
    assert_eq!(c.read_reply().await.unwrap().text, "first");
    assert_eq!(c.once, None, "only the next reply");
    c.limit_next_reply(Duration::from_millis(50));
    assert!(matches!(c.command("MAIL").await, Err(ConnError::Timeout)));
    assert_eq!(c.once, None);
    // Never longer than the usual wait.
    c.limit_next_reply(Duration::from_secs(3600));
    assert_eq!(c.once, Some(Duration::from_secs(60)));
}

#[tokio::test]
async fn data_ahead_of_a_handshake_is_refused() {
    let (mut c, mut s) = pair().await;
    // One write: the client's one read takes both lines.
    s.write_all(b"220 go ahead\r\n250 injected\r\n")
        .await
        .unwrap();
    assert_eq!(c.read_reply().await.unwrap().text, "go ahead");
    assert!(matches!(c.into_tcp(), Err(ConnError::DataBeforeHandshake)));
}
