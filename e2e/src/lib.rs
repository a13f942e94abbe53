//! Test harness: a whole tambo in a temporary directory, started from the
//! real binaries (built by `cargo build --workspace`), on loopback ports
//! chosen by the kernel, plus a small SMTP client and helpers that wait for
//! conditions instead of sleeping.
#![forbid(unsafe_code)]

pub mod ca;
pub mod dns;
pub mod https;
pub mod pymx;
pub mod tls;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The password hash of every test user.
pub const TEST_HASH: &str =
    "$scrypt$ln=14,r=8,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4";

/// How long any condition may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Directory holding the built binaries (target/debug).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test binary>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in [
        "tambo",
        "tambo-smtpd",
        "tambo-queued",
        "tambo-deliverd",
        "tambo-monitord",
        "tambo-test-peer",
    ] {
        assert!(
            dir.join(b).is_file(),
            "{} is missing: run `cargo build --workspace` before the tests (the README's test command does)",
            dir.join(b).display()
        );
    }
    dir
}

/// Polls `cond` until it returns Some, or panics after [`WAIT`].
pub fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if start.elapsed() > WAIT {
            panic!("timed out after {WAIT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a pid written (then renamed into place) by a script.
pub fn read_pid(path: &Path) -> i32 {
    wait_for(&format!("a pid in {}", path.display()), || {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    })
}

/// Whether `pid` has stopped running: no such process, or a zombie. A
/// killed orphan stays a zombie until init reaps it, and some container
/// inits never do.
pub fn is_dead(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH) {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Waits until `pid` is dead (see [`is_dead`]).
pub fn wait_dead(what: &str, pid: i32) {
    wait_for(&format!("{what} (pid {pid}) to die"), || {
        is_dead(pid).then_some(())
    });
}

pub const DOMAIN: &str = "example.test";

/// Whether the tests run as root (as in CI). Then the daemons run as real,
/// separate users where tambo drops privileges (smtpd and monitord become
/// `nobody`), and the attacker tests run hostile peers as other users.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The `[tambo] *_user` lines every test config gets. As root: users that
/// every Debian system has (smtpd and monitord as `nobody`, queued and
/// deliverd as root until privilege separation lands). Otherwise: the
/// current user for every role (development).
pub fn role_users() -> String {
    let (smtpd, queued, deliverd, monitord) = if is_root() {
        ("nobody", "root", "root", "nobody")
    } else {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .expect("the current user has a name");
        let leaked: &'static str = Box::leak(me.into_boxed_str());
        (leaked, leaked, leaked, leaked)
    };
    format!(
        "smtpd_user = \"{smtpd}\"\nqueued_user = \"{queued}\"\ndeliverd_user = \"{deliverd}\"\nmonitord_user = \"{monitord}\"\n"
    )
}

/// Runs the hostile test peer (`tambo-test-peer`, see its source) as
/// `uid`/`gid` and returns what it printed.
pub fn peer_as(uid: u32, gid: u32, args: &[&str]) -> String {
    use std::os::unix::process::CommandExt;
    let out = Command::new(bin_dir().join("tambo-test-peer"))
        .args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .expect("run tambo-test-peer");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the hostile test peer as `uid`/`gid` in the background; its
/// output goes to `log`.
pub fn spawn_peer_as(uid: u32, gid: u32, args: &[&str], log: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("peer log");
    Command::new(bin_dir().join("tambo-test-peer"))
        .args(args)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(out)
        .spawn()
        .expect("start tambo-test-peer")
}

/// Opens a submit.sock session as smtpd would (hello, then `Session`).
pub async fn submit_session(sock: &Path) -> tokio::net::UnixStream {
    use tambo_proto::frame::{read_frame, write_frame};
    use tambo_proto::submit::{Mode, SubmitReply, SubmitRequest};
    let mut s = tambo_proto::hello::connect(
        sock,
        tambo_proto::Role::Smtpd,
        tambo_proto::Role::Queued,
        &ids(),
    )
    .await
    .expect("handshake");
    write_frame(
        &mut s,
        &SubmitRequest::Session {
            client: "203.0.113.9:4242".into(),
            mode: Mode::Smtp,
            tls: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        read_frame::<_, SubmitReply>(&mut s).await.unwrap(),
        Some(SubmitReply::Ok)
    );
    s
}

/// One request on a submit.sock connection and its reply.
pub async fn ask(
    s: &mut tokio::net::UnixStream,
    req: tambo_proto::submit::SubmitRequest,
) -> tambo_proto::submit::SubmitReply {
    use tambo_proto::frame::{read_frame_max, write_frame};
    write_frame(s, &req).await.unwrap();
    read_frame_max(s, 1 << 20).await.unwrap().expect("a reply")
}

/// True once the peer has closed the connection (within [`WAIT`]).
pub async fn closed_by_peer(s: &mut tokio::net::UnixStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Writes a self-signed certificate for `names` into `certs/<name>/`
/// (`fullchain.pem`, `privkey.pem`), as certbot lays them out. Returns the
/// certificate's DER, for clients that should trust it.
pub fn write_cert(config_dir: &Path, name: &str, names: &[&str]) -> Vec<u8> {
    let dir = config_dir.join("certs").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (chain, key, der) = cert_pair(names);
    std::fs::write(dir.join("fullchain.pem"), chain).unwrap();
    std::fs::write(dir.join("privkey.pem"), key).unwrap();
    der
}

/// A self-signed certificate for `names`: its PEM, its key's PEM, and the
/// certificate's DER.
pub fn cert_pair(names: &[&str]) -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

/// The path of an installed tool (swaks, msmtp, openssl…), or a panic that
/// says how to get it.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run scripts/test.sh, which installs it (apt-get install {name})")
        })
}

/// Raises this test process's open-files soft limit to its hard limit, for
/// tests that hold thousands of connections.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}

/// The identities a test client uses to check the daemons it talks to.
pub fn ids() -> tambo_proto::identity::Identities {
    tambo_proto::identity::Identities::development(tambo_proto::identity::Account {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    })
}

/// One tambo installation under test.
pub struct Tambo {
    pub dir: tempfile::TempDir,
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub mail_dir: PathBuf,
    pub log_dir: PathBuf,
    bins: PathBuf,
    procs: HashMap<String, Child>,
    /// The DNS server smtpd and deliverd ask, unless the test named its
    /// own `dns_server`: no test may ask the real DNS, and smtpd looks up
    /// the SPF record of every unauthenticated sender.
    dns: Option<dns::TestDns>,
}

impl Tambo {
    /// A config with smtp and monitoring on ephemeral loopback ports, users
    /// `ann` and `bob` in example.test, Maildir delivery, and fast retries.
    /// `extra` is appended to tambo.conf top-level keys; `tambo_extra` to
    /// `[tambo]`; `testing_extra` to `[testing]`. Every lookup goes to a
    /// [`TestDns`](dns::TestDns) of this installation's own ([`Tambo::dns`];
    /// empty: every name is NXDOMAIN, so SPF says `none`), unless
    /// `testing_extra` names a `dns_server` itself.
    pub fn new(extra: &str, tambo_extra: &str, testing_extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tambo-e2e")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        // smtpd and monitord drop to `nobody` when the tests run as root:
        // they must be able to reach the sockets under this directory.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let t = Tambo {
            config_dir: root.join("config"),
            data_dir: root.join("data"),
            run_dir: root.join("run"),
            mail_dir: root.join("mail"),
            log_dir: root.join("logs"),
            dir,
            bins: bin_dir(),
            procs: HashMap::new(),
            dns: (!testing_extra.contains("dns_server")).then(dns::TestDns::start),
        };
        let domain = t.config_dir.join("domains").join(DOMAIN);
        std::fs::create_dir_all(&domain).unwrap();
        std::fs::create_dir_all(&t.log_dir).unwrap();
        let hash = TEST_HASH;
        std::fs::write(domain.join("users"), format!("ann {hash}\nbob {hash}\n")).unwrap();
        std::fs::write(domain.join("aliases"), "postmaster: ann\nteam: ann, bob\n").unwrap();
        write_cert(&t.config_dir, "mx", &["mx.example.test"]);
        let maildir_line = if tambo_extra.contains("maildir") {
            String::new()
        } else {
            format!(
                "maildir = \"{}/%to_domain%/%to_user%\"\n",
                t.mail_dir.display()
            )
        };
        let mut testing = if testing_extra.contains("retry_delays") {
            testing_extra.to_string()
        } else {
            format!(
                "retry_delays = [\"200ms\", \"200ms\", \"200ms\", \"200ms\"]\nretry_jitter = \"0s\"\n{testing_extra}"
            )
        };
        if let Some(dns) = &t.dns {
            testing.push_str(&format!("\ndns_server = \"{}\"\n", dns.addr()));
        }
        let conf = format!(
            "hostname = \"mx.example.test\"
smtp_address = [\"127.0.0.1:0\"]
submission_address = [\"127.0.0.1:0\"]
submission_over_tls_address = [\"127.0.0.1:0\"]
monitoring_address = \"127.0.0.1:0\"
data_dir = \"{data}\"
{extra}
[tambo]
runtime_dir = \"{run}\"
{users}{maildir_line}{tambo_extra}
[testing]
{testing}",
            data = t.data_dir.display(),
            run = t.run_dir.display(),
            users = role_users(),
        );
        std::fs::write(t.config_dir.join("tambo.conf"), conf).unwrap();
        t
    }

    /// The default test setup.
    pub fn default_setup() -> Self {
        Self::new("", "", "")
    }

    /// A setup where mail to `hold@` stays in the queue: its only
    /// recipient is a pipe to a program that asks to be retried (exit 75),
    /// and retries are an hour apart. Returns the program's path (the
    /// recipient's address in the queue).
    pub fn holding() -> (Self, PathBuf) {
        let t = Self::new(
            "",
            "",
            "retry_delays = [\"1h\", \"1h\", \"1h\", \"1h\"]\nretry_jitter = \"0s\"\n",
        );
        let script = t.config_dir.join("tempfail");
        std::fs::write(&script, "#!/bin/sh\nexit 75\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let aliases = t.config_dir.join("domains").join(DOMAIN).join("aliases");
        let text = std::fs::read_to_string(&aliases).unwrap();
        std::fs::write(&aliases, format!("{text}hold: | {}\n", script.display())).unwrap();
        (t, script)
    }

    /// This installation's DNS server, to add records to (SPF TXT records,
    /// MX hosts…) while it runs. Panics if the test gave its own
    /// `dns_server`: that one is the test's.
    pub fn dns(&self) -> &dns::TestDns {
        self.dns
            .as_ref()
            .expect("this Tambo uses the test's own dns_server")
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// Starts one daemon (`smtpd`, `queued`, `deliverd`, `monitord`) and
    /// waits until it serves.
    pub fn start(&mut self, name: &str) {
        // With queued up, smtpd serves STARTTLS once it has queued's
        // certificates, a moment after it listens: a test must not race it.
        if name == "smtpd" && self.procs.contains_key("queued") {
            let tls = self.log("smtpd").matches("TLS ready").count();
            self.start_until(name, "smtpd listening on");
            wait_for("smtpd's TLS certificates from queued", || {
                (self.log("smtpd").matches("TLS ready").count() > tls).then_some(())
            });
            return;
        }
        let ready = match name {
            "smtpd" => "smtpd listening on",
            "queued" => "queued listening on",
            "monitord" => "monitord listening on",
            // Both of its connections: deliveries and hooks.
            "deliverd" => return self.start_until_n(name, "connected to queued at", 2),
            _ => "",
        };
        self.start_until(name, ready);
    }

    /// Starts one daemon with another config directory (e.g. one without
    /// the private keys), waiting until it serves.
    pub fn start_with_config(&mut self, name: &str, config_dir: &Path) {
        let saved = std::mem::replace(&mut self.config_dir, config_dir.to_path_buf());
        self.start(name);
        self.config_dir = saved;
    }

    /// Starts one daemon and waits for `ready` (a new log line containing
    /// it); `""` waits for nothing.
    pub fn start_until(&mut self, name: &str, ready: &str) {
        self.start_until_n(name, ready, 1)
    }

    /// Starts one daemon and waits for `n` new log lines containing
    /// `ready`.
    pub fn start_until_n(&mut self, name: &str, ready: &str, n: usize) {
        // A restarted daemon's log already has the line from its last run.
        let seen = self.log(name).matches(ready).count();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .unwrap();
        let child = Command::new(self.bins.join(format!("tambo-{name}")))
            .arg("--config_dir")
            .arg(&self.config_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .env("TAMBO_LOG", "info")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tambo-{name}: {e}"));
        self.procs.insert(name.to_string(), child);
        if !ready.is_empty() {
            wait_for(&format!("tambo-{name} to be ready"), || {
                (self.log(name).matches(ready).count() >= seen + n).then_some(())
            });
        }
    }

    /// Starts all four daemons.
    pub fn start_all(&mut self) {
        for d in ["monitord", "queued", "deliverd", "smtpd"] {
            self.start(d);
        }
    }

    pub fn pid(&self, name: &str) -> u32 {
        self.procs[name].id()
    }

    /// Stops a daemon with SIGSTOP, and returns once every one of its
    /// threads has stopped. kill() returns before that: one thread takes
    /// the signal and stops the others only when it next runs, and on a
    /// busy machine the others may meanwhile go on serving requests.
    pub fn freeze(&self, name: &str) {
        let pid = self.pid(name);
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
        let stopped = |stat: &str| {
            // `pid (comm) S ...`: the state follows the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        };
        wait_for(&format!("every thread of {name} stopped"), || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            let all = tasks
                .flatten()
                .all(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| stopped(&s)));
            all.then_some(())
        });
    }

    /// Lets a daemon [`freeze`](Self::freeze) stopped run again.
    pub fn thaw(&self, name: &str) {
        kill(Pid::from_raw(self.pid(name) as i32), Signal::SIGCONT).unwrap();
    }

    /// Sends SIGKILL and reaps.
    pub fn kill9(&mut self, name: &str) {
        if let Some(mut c) = self.procs.remove(name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self, name: &str) -> std::process::ExitStatus {
        let mut c = self.procs.remove(name).expect("not running");
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
        wait_for(&format!("{name} to exit"), || c.try_wait().ok().flatten())
    }

    /// The daemon's log, complete lines only (a line being written is not
    /// returned half-way, so a pid or port is never read truncated).
    pub fn log(&self, name: &str) -> String {
        let mut s = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let end = s.rfind('\n').map_or(0, |i| i + 1);
        s.truncate(end);
        s
    }

    /// Waits until `needle` is in the daemon's log; returns that line.
    pub fn wait_log(&self, name: &str, needle: &str) -> String {
        wait_for(&format!("{needle:?} in the {name} log"), || {
            self.log(name)
                .lines()
                .rev()
                .find(|l| l.contains(needle))
                .map(str::to_string)
        })
    }

    fn addr_after(&self, name: &str, marker: &str) -> SocketAddr {
        let line = self.wait_log(name, marker);
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        let word: String = rest
            .trim_start_matches("http://")
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '/')
            .collect();
        word.parse()
            .unwrap_or_else(|_| panic!("no address in {line:?}"))
    }

    /// The SMTP port smtpd bound (the config asks for port 0).
    pub fn smtp_addr(&self) -> SocketAddr {
        self.listener("smtpd", "SMTP")
    }

    /// The submission port (587's role; STARTTLS, AUTH needed).
    pub fn submission_addr(&self) -> SocketAddr {
        self.listener("smtpd", "submission")
    }

    /// The submission-over-TLS port (465's role).
    pub fn submission_tls_addr(&self) -> SocketAddr {
        self.listener("smtpd", "submission+TLS")
    }

    /// The address smtpd logged (in the log `log`) for its listener of
    /// `mode` (`SMTP`, `submission`, `submission+TLS`).
    pub fn listener(&self, log: &str, mode: &str) -> SocketAddr {
        let marker = "smtpd listening on ";
        let tail = format!("({mode})");
        let line = wait_for(&format!("smtpd's {mode} listener"), || {
            self.log(log)
                .lines()
                .rev()
                .find(|l| l.contains(marker) && l.trim_end().ends_with(&tail))
                .map(str::to_string)
        });
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        rest.split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.addr_after("monitord", "monitoring listening on ")
    }

    pub fn smtp(&self) -> Smtp {
        Smtp::connect(self.smtp_addr())
    }

    /// GET a path from the monitoring server: (status, headers, body).
    pub fn http_get(&self, path: &str) -> (u16, String, String) {
        http_get(self.http_addr(), path)
    }

    pub fn vars(&self) -> serde_json::Value {
        let (status, _, body) = self.http_get("/debug/vars");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("valid JSON from /debug/vars")
    }

    /// Waits until a /debug/vars value satisfies `pred`.
    pub fn wait_var(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, || {
            let v = self.vars();
            pred(&v).then_some(v)
        })
    }

    /// Adds a local domain with `users` (password "secret"), before start.
    pub fn add_domain(&self, domain: &str, users: &[&str]) {
        let dir = self.config_dir.join("domains").join(domain);
        std::fs::create_dir_all(&dir).unwrap();
        let lines: String = users.iter().map(|u| format!("{u} {TEST_HASH}\n")).collect();
        std::fs::write(dir.join("users"), lines).unwrap();
    }

    /// Replaces `hostname` in tambo.conf (a second instance in one test
    /// needs a name of its own), before start.
    pub fn set_hostname(&self, hostname: &str) {
        let path = self.config_dir.join("tambo.conf");
        let conf = std::fs::read_to_string(&path).unwrap();
        let conf = conf.replacen(
            "hostname = \"mx.example.test\"",
            &format!("hostname = \"{hostname}\""),
            1,
        );
        std::fs::write(path, conf).unwrap();
    }

    /// Messages in a user's Maildir `new/`, oldest first.
    pub fn maildir(&self, user: &str) -> Vec<Vec<u8>> {
        self.maildir_in(DOMAIN, user)
    }

    /// Messages in the Maildir `new/` of `user@domain`, oldest first.
    pub fn maildir_in(&self, domain: &str, user: &str) -> Vec<Vec<u8>> {
        let dir = self.mail_dir.join(domain).join(user).join("new");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => return Vec::new(),
        };
        files.sort();
        files.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    pub fn wait_maildir(&self, user: &str, count: usize) -> Vec<Vec<u8>> {
        self.wait_maildir_in(DOMAIN, user, count)
    }

    pub fn wait_maildir_in(&self, domain: &str, user: &str, count: usize) -> Vec<Vec<u8>> {
        wait_for(&format!("{count} message(s) for {user}@{domain}"), || {
            let m = self.maildir_in(domain, user);
            (m.len() >= count).then_some(m)
        })
    }

    /// The queue items (JSON) that can be read: `m:` files, and the items
    /// on the bodies of messages never rewritten.
    pub fn queue_items(&self) -> Vec<serde_json::Value> {
        let queue = self.data_dir.join("queue");
        let files = self.queue_files();
        files
            .iter()
            .filter_map(|n| {
                if n.starts_with("m:") {
                    return std::fs::read(queue.join(n)).ok();
                }
                // A message never rewritten: its item is on its body.
                let id = n.strip_prefix("d:")?;
                if files.contains(&format!("m:{id}")) {
                    return None;
                }
                let mut buf = vec![0u8; 64 * 1024];
                let n =
                    rustix::fs::getxattr(queue.join(n), "user.tambo.item", &mut buf[..]).ok()?;
                buf.truncate(n);
                Some(buf)
            })
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    /// Names of the files in the queue directory that are messages or
    /// parts of one: not its lock file, `orphans/`, nor the empty `d:`
    /// files made ready for messages to come.
    pub fn queue_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data_dir.join("queue"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| {
                        let n = e.file_name();
                        let ready = n.to_string_lossy().starts_with("d:")
                            && e.metadata().is_ok_and(|m| m.len() == 0);
                        n != ".lock" && n != "orphans" && !ready
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn wait_queue_empty(&self) {
        wait_for("the queue to empty", || {
            self.queue_files().is_empty().then_some(())
        });
    }

    /// Sends one message from `from` to `to` and returns the final reply.
    pub fn send(&self, from: &str, to: &[&str], body: &[u8]) -> Reply {
        let mut c = self.smtp();
        c.expect("EHLO client.test", 250);
        c.expect(&format!("MAIL FROM:<{from}>"), 250);
        for t in to {
            c.expect(&format!("RCPT TO:<{t}>"), 250);
        }
        c.expect("DATA", 354);
        c.send_raw(body);
        c.send_raw(b".\r\n");
        let r = c.reply();
        c.cmd("QUIT");
        r
    }
}

impl Drop for Tambo {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for name in ["smtpd", "queued", "deliverd", "monitord", "tambo"] {
                let log = self.log(name);
                if !log.is_empty() {
                    eprintln!("---- {name} log ----\n{log}");
                }
            }
        }
    }
}

/// Resident memory now (VmRSS) of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `<field> <n> kB` line of /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// A TCP connection to `addr` from the loopback address `src` (any of
/// 127.0.0.0/8: another client, as far as the server can tell).
pub fn connect_from(src: &str, addr: SocketAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        sock.connect(addr).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// An SMTP reply: code and all its lines' texts.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A minimal, strict SMTP client.
pub struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    pub fn connect(addr: SocketAddr) -> Self {
        Self::connect_after(addr, b"")
    }

    /// Connects, sends `prefix` (a PROXY header, as a proxy would), then
    /// reads the greeting (which must be 220).
    pub fn connect_after(addr: SocketAddr, prefix: &[u8]) -> Self {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(prefix).unwrap();
        let mut c = Smtp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = c.reply();
        assert_eq!(greeting.code, 220, "{greeting:?}");
        c
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    /// Reads one reply; panics on EOF.
    pub fn reply(&mut self) -> Reply {
        self.try_reply()
            .expect("connection closed while waiting for a reply")
    }

    /// Reads one reply; None on EOF.
    pub fn try_reply(&mut self) -> Option<Reply> {
        read_reply(&mut self.r)
    }

    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Sends a command and asserts the reply code.
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line);
        assert_eq!(r.code, code, "{line:?} got {r:?}");
        r
    }

    /// True if the server closed the connection.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0) | Err(_))
    }
}

/// A tiny HTTP/1.1 GET, enough for the monitoring server.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let (status, head, body) = http_get_bytes(addr, path);
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// [`http_get`], the body as bytes (a profile).
pub fn http_get_bytes(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response");
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, head, buf[end + 4..].to_vec())
}

/// A message body (CRLF, not dot-stuffed) with the given subject.
pub fn message(subject: &str, body: &str) -> Vec<u8> {
    format!("From: ann@example.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\n{body}").into_bytes()
}

/// Reads one SMTP reply (all its lines) from `r`; None on EOF. Panics on
/// a line without CRLF or without a code: the server under test broke the
/// protocol.
pub fn read_reply(r: &mut impl std::io::BufRead) -> Option<Reply> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
        let line = line.trim_end();
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad reply {line:?}"));
        let more = line.as_bytes().get(3) == Some(&b'-');
        lines.push(line.get(4..).unwrap_or("").to_string());
        if !more {
            return Some(Reply { code, lines });
        }
    }
}

/// Verifies every DKIM signature of `msg` with dkimpy, the public keys
/// coming from `txt` (name → record) instead of the DNS.
pub fn dkimpy_verifies(msg: &[u8], txt: &[(String, String)]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("msg.eml");
    std::fs::write(&path, msg).unwrap();
    let records: String = txt
        .iter()
        .map(|(n, r)| format!("{:?}: {:?},", format!("{n}."), r))
        .collect();
    let script = format!(
        "import dkim, sys\n\
         recs = {{{records}}}\n\
         def dns(name, timeout=5):\n\
         \x20   return recs.get(name.decode(), '').encode()\n\
         msg = open(sys.argv[1], 'rb').read()\n\
         d = dkim.DKIM(msg)\n\
         sigs = [i for i, (k, v) in enumerate(d.headers) if k.lower() == b'dkim-signature']\n\
         try:\n\
         \x20   ok = bool(sigs) and all(d.verify(idx=i, dnsfunc=dns) for i in range(len(sigs)))\n\
         except dkim.ValidationError as e:\n\
         \x20   print(e, file=sys.stderr)\n\
         \x20   ok = False\n\
         print('VERIFIED' if ok else 'FAILED')\n"
    );
    let out = Command::new(pymx::PYTHON)
        .arg("-c")
        .arg(&script)
        .arg(&path)
        .output()
        .expect("python3 with dkimpy (Debian python3-dkim)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dkimpy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.trim() == "VERIFIED"
}

/// `tambo dkim-keygen` then `tambo dkim-dns`: (TXT name, TXT value).
pub fn dkim_key(t: &Tambo, domain: &str, selector: &str) -> (String, String) {
    let key = t
        .config_dir
        .join("domains")
        .join(domain)
        .join(format!("dkim:{selector}.pem"));
    let tambo = bin_dir().join("tambo");
    let config = format!("--config_dir={}", t.config_dir.display());
    let out = Command::new(&tambo)
        .args(["dkim-keygen", config.as_str(), domain, selector])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(&tambo)
        .args(["dkim-dns", config.as_str(), domain, selector])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8(out.stdout).unwrap();
    let mut parts = line.trim_end().split('\t');
    let name = parts.next().unwrap().to_string();
    assert_eq!(parts.next(), Some("TXT"), "{line:?}");
    let value = parts.next().unwrap().trim_matches('"').to_string();
    (name, value)
}
