use super::*;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::UnixListener;

/// What a fake Dovecot does with each connection: send `greeting`,
/// read `read` lines (kept in `seen`), then send `reply` (unless it
/// stalls), then hang up.
#[derive(Clone)]
struct Script {
    greeting: String,
    read: usize,
    reply: String,
    stall: bool,
}

const USERDB_HELLO: &str = "VERSION\t1\t1\nSPID\t4242\n";
const CLIENT_HELLO: &str = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t4242\nCUID\t7\nCOOKIE\t0123456789abcdef\nDONE\n";

fn userdb(reply: &str) -> Script {
    Script {
        greeting: USERDB_HELLO.into(),
        read: 2,
        reply: reply.into(),
        stall: false,
    }
}

fn client(reply: &str) -> Script {
    Script {
        greeting: CLIENT_HELLO.into(),
        read: 3,
        reply: reply.into(),
        stall: false,
    }
}

type Seen = Arc<std::sync::Mutex<Vec<String>>>;

/// Serves `script` on a socket at `path`, every connection, until the
/// test's runtime ends. Returns the lines it was sent.
fn serve(path: &Path, script: Script) -> Seen {
    let listener = UnixListener::bind(path).unwrap();
    let seen = Seen::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (script, seen) = (script.clone(), s2.clone());
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                if w.write_all(script.greeting.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..script.read {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    seen.lock()
                        .unwrap()
                        .push(line.trim_end_matches('\n').to_string());
                }
                if script.stall {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                let _ = w.write_all(script.reply.as_bytes()).await;
            });
        }
    });
    seen
}

struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A client whose sockets are configured: `userdb` and `client`.
    fn dovecot(&self) -> Dovecot {
        Dovecot::with_candidates(&self.path("userdb"), &self.path("client"), &[], &[])
            .timeout(Duration::from_millis(500))
    }

    fn userdb(&self, script: Script) -> Seen {
        serve(Path::new(&self.path("userdb")), script)
    }

    fn client(&self, script: Script) -> Seen {
        serve(Path::new(&self.path("client")), script)
    }
}

#[tokio::test]
async fn exists_asks_the_userdb() {
    let f = Fake::new();
    let seen = f.userdb(userdb("USER\t1\tdave@example.test\thome=/home/dave\n"));
    assert!(f.dovecot().exists("dave@example.test").await.unwrap());
    assert_eq!(
        *seen.lock().unwrap(),
        ["VERSION\t1\t1", "USER\t1\tdave@example.test\tservice=smtp"]
    );
}

#[tokio::test]
async fn not_found_is_no() {
    let f = Fake::new();
    let seen = f.userdb(userdb("NOTFOUND\t1\n"));
    assert!(!f.dovecot().exists("nobody").await.unwrap());
    // A bare user goes as it is.
    assert_eq!(seen.lock().unwrap()[1], "USER\t1\tnobody\tservice=smtp");
}

#[tokio::test]
async fn anything_else_from_the_userdb_is_an_error() {
    for reply in [
        "FAIL\t1\treason=ldap down\n",
        "USER\t12\tdave\n",
        "USER\n",
        "user\t1\tdave\n",
        "\n",
        "NOTFOUNDX\t1\n",
        // No newline: the peer hung up mid-line.
        "USER\t1\tdave",
        "",
    ] {
        let f = Fake::new();
        f.userdb(userdb(reply));
        let r = f.dovecot().exists("dave").await;
        assert!(
            matches!(r, Err(Error::Protocol(_) | Error::Io(_))),
            "{reply:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn the_userdb_greeting_is_checked() {
    for greeting in [
        "VERSION\t2\t0\nSPID\t1\n",
        "SPID\t1\nVERSION\t1\t0\n",
        "VERSION\t1\t0\nCUID\t1\n",
        // The auth-client socket configured as the userdb.
        CLIENT_HELLO,
    ] {
        let f = Fake::new();
        f.userdb(Script {
            greeting: greeting.into(),
            ..userdb("USER\t1\tdave\n")
        });
        let r = f.dovecot().exists("dave").await;
        assert!(matches!(r, Err(Error::Protocol(_))), "{greeting:?}: {r:?}");
    }
}

#[tokio::test]
async fn a_silent_peer_times_out() {
    let f = Fake::new();
    f.userdb(Script {
        stall: true,
        ..userdb("USER\t1\tdave\n")
    });
    let start = Instant::now();
    let r = f.dovecot().exists("dave").await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // A listener that never accepts: connect works (the backlog), then
    // nothing is ever said.
    let f = Fake::new();
    let _held = std::os::unix::net::UnixListener::bind(f.path("client")).unwrap();
    let start = Instant::now();
    let r = f.dovecot().authenticate("dave", b"pw").await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn the_default_budget_is_five_seconds() {
    assert_eq!(TIMEOUT, Duration::from_secs(5));
    let d = Dovecot::with_candidates("/x", "/y", &[], &[]);
    assert_eq!(d.timeout, TIMEOUT);
}

#[tokio::test]
async fn authenticate_with_plain() {
    let f = Fake::new();
    let seen = f.client(client("OK\t1\tuser=dave@example.test\n"));
    assert!(
        f.dovecot()
            .authenticate("dave@example.test", "sécret pw".as_bytes())
            .await
            .unwrap()
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], "VERSION\t1\t1");
    assert_eq!(seen[1], format!("CPID\t{}", std::process::id()));
    let resp = seen[2]
        .strip_prefix("AUTH\t1\tPLAIN\tservice=smtp\tsecured\tno-penalty\tnologin\tresp=")
        .unwrap_or_else(|| panic!("{:?}", seen[2]));
    let sasl = base64::engine::general_purpose::STANDARD
        .decode(resp)
        .unwrap();
    assert_eq!(
        sasl,
        "dave@example.test\0dave@example.test\0sécret pw".as_bytes()
    );
}

#[tokio::test]
async fn fail_is_a_refusal() {
    let f = Fake::new();
    f.client(client("FAIL\t1\tuser=dave\treason=bad password\n"));
    assert!(!f.dovecot().authenticate("dave", b"wrong").await.unwrap());
}

#[tokio::test]
async fn anything_else_from_the_client_socket_is_an_error() {
    for reply in [
        "CONT\t1\t\n",
        "OK\t2\n",
        "OK\n",
        "ok\t1\n",
        "FAIL\n",
        "garbage\n",
        "\n",
        "OK\t1",
        "",
    ] {
        let f = Fake::new();
        f.client(client(reply));
        let r = f.dovecot().authenticate("dave", b"pw").await;
        assert!(
            matches!(r, Err(Error::Protocol(_) | Error::Io(_))),
            "{reply:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn the_client_handshake_is_checked() {
    for greeting in [
        // No version first.
        "MECH\tPLAIN\nVERSION\t1\t2\nDONE\n",
        "VERSION\t2\t0\nMECH\tPLAIN\nDONE\n",
        // The userdb socket configured as the client: no DONE ever;
        // the peer hangs up.
        USERDB_HELLO,
    ] {
        let f = Fake::new();
        f.client(Script {
            greeting: greeting.into(),
            read: 0,
            ..client("OK\t1\n")
        });
        let r = f.dovecot().authenticate("dave", b"pw").await;
        assert!(
            matches!(r, Err(Error::Protocol(_) | Error::Io(_))),
            "{greeting:?}: {r:?}"
        );
    }
    // PLAIN not offered: a clear error, not a wrong password.
    let f = Fake::new();
    f.client(Script {
        greeting: "VERSION\t1\t2\nMECH\tLOGIN\tplaintext\nDONE\n".into(),
        ..client("FAIL\t1\n")
    });
    let r = f.dovecot().authenticate("dave", b"pw").await;
    let Err(Error::Protocol(e)) = r else {
        panic!("{r:?}")
    };
    assert!(e.contains("auth_mechanisms"), "{e}");
}

#[tokio::test]
async fn reads_are_bounded() {
    // One line too long, in each protocol.
    let long = format!("SPID\t{}\n", "x".repeat(MAX_LINE));
    let f = Fake::new();
    f.userdb(Script {
        greeting: format!("VERSION\t1\t1\n{long}"),
        ..userdb("USER\t1\n")
    });
    let r = f.dovecot().exists("dave").await;
    assert!(
        matches!(&r, Err(Error::Protocol(e)) if e.contains("longer")),
        "{r:?}"
    );
    f.client(Script {
        greeting: format!("VERSION\t1\t2\n{long}DONE\n"),
        ..client("OK\t1\n")
    });
    let r = f.dovecot().authenticate("dave", b"pw").await;
    assert!(
        matches!(&r, Err(Error::Protocol(e)) if e.contains("longer")),
        "{r:?}"
    );
    // A handshake that never ends: refused at the line limit, well
    // before the time budget.
    let f = Fake::new();
    let endless = "MECH\tX\n".repeat(MAX_HANDSHAKE_LINES + 1);
    f.client(Script {
        greeting: format!("VERSION\t1\t2\nMECH\tPLAIN\n{endless}DONE\n"),
        ..client("OK\t1\n")
    });
    let d = f.dovecot().timeout(Duration::from_secs(30));
    let start = Instant::now();
    let r = d.authenticate("dave", b"pw").await;
    assert!(
        matches!(&r, Err(Error::Protocol(e)) if e.contains("DONE")),
        "{r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn read_line_limits() {
    let ok = format!("{}\nnext\r\n", "a".repeat(MAX_LINE));
    let mut r = ok.as_bytes();
    assert_eq!(read_line(&mut r).await.unwrap(), "a".repeat(MAX_LINE));
    assert_eq!(read_line(&mut r).await.unwrap(), "next");
    assert!(matches!(read_line(&mut r).await, Err(Error::Io(_))));
    let too_long = format!("{}\n", "a".repeat(MAX_LINE + 1));
    assert!(matches!(
        read_line(&mut too_long.as_bytes()).await,
        Err(Error::Protocol(_))
    ));
    // Not UTF-8: read, not trusted (nothing matches it).
    assert_eq!(
        read_line(&mut &b"\xff\tx\n"[..]).await.unwrap(),
        "\u{fffd}\tx"
    );
}

#[tokio::test]
async fn user_names_with_whitespace_are_errors() {
    let f = Fake::new();
    let seen = f.userdb(userdb("USER\t1\n"));
    f.client(client("OK\t1\n"));
    let d = f.dovecot();
    for id in [
        "da ve",
        "dave\t",
        "dave\nUSER\t2\troot",
        "\u{a0}dave",
        "da\u{7}ve",
        "",
    ] {
        assert!(
            matches!(d.exists(id).await, Err(Error::InvalidUser(_))),
            "{id:?}"
        );
        assert!(
            matches!(d.authenticate(id, b"pw").await, Err(Error::InvalidUser(_))),
            "{id:?}"
        );
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
    // A NUL in the password is no password Dovecot could check.
    assert!(!d.authenticate("dave", b"pw\0root").await.unwrap());
}

#[tokio::test]
async fn configured_paths_win() {
    let f = Fake::new();
    // A working Dovecot at the usual place, but the configured path
    // has none: the configured one is what counts.
    f.userdb(userdb("USER\t1\n"));
    let d = Dovecot::with_candidates(&f.path("missing"), "", &[&f.path("userdb")], &[]);
    let r = d.exists("dave").await;
    assert!(matches!(r, Err(Error::Connect { .. })), "{r:?}");
}

#[tokio::test]
async fn sockets_are_found_in_order_and_lazily() {
    let f = Fake::new();
    let candidates = [f.path("tambo"), f.path("chasquid"), f.path("plain")];
    let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let d = Dovecot::with_candidates("", "", &candidates, &candidates)
        .timeout(Duration::from_millis(500));
    // Nothing there yet: an error (a warning at startup), not a
    // verdict.
    let r = d.exists("dave").await;
    assert!(
        matches!(&r, Err(Error::NoSocket { tried, .. }) if tried.contains("chasquid")),
        "{r:?}"
    );
    assert!(d.reachable().await.is_err());
    // Dovecot comes up later: the next call finds it.
    serve(Path::new(&f.path("plain")), userdb("NOTFOUND\t1\n"));
    assert!(!d.exists("dave").await.unwrap());
    // An earlier candidate wins once it exists, but only when the one
    // found stops answering.
    serve(Path::new(&f.path("chasquid")), userdb("USER\t1\n"));
    assert!(!d.exists("dave").await.unwrap(), "still the one found");
    std::fs::remove_file(f.path("plain")).unwrap();
    assert!(d.exists("dave").await.unwrap(), "found again, in order");
    assert!(d.describe().contains("chasquid"), "{}", d.describe());
}
