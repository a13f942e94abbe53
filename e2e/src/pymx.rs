//! An independent SMTP/LMTP server for the tests: `e2e/support/mx.py`, on
//! Python's aiosmtpd (Debian `python3-aiosmtpd`, which scripts/test.sh
//! installs), run by Debian's own `/usr/bin/python3` (a python3 earlier in
//! PATH, a pyenv one say, lacks the Debian packages).
//!
//! [`PyMx::start`] waits until it accepts connections; dropping it kills
//! the server. Messages it accepts are read back with
//! [`PyMx::messages`]/[`PyMx::wait_messages`]; its log (every command and
//! reply) is printed when a test fails while it runs.
//!
//! ```no_run
//! use tambo_e2e::{ca::TestCa, dns::random_loopback, pymx::*};
//! let ca = TestCa::new();
//! let dir = tempfile::tempdir().unwrap();
//! let (cert, key) = ca.write_leaf(dir.path(), "mx", &["mx.dest.test"]);
//! let mx = PyMx::start(
//!     MxOpts::at(random_loopback().into())
//!         .tls(&cert, &key)
//!         .rcpt_reply("busy@dest.test", "451 4.7.1 try later"),
//! );
//! // …deliver to mx.addr() (its port is the [testing] smtp_port)…
//! let got = mx.wait_messages(1);
//! assert!(got[0].tls);
//! ```

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_for;

/// The interpreter with Debian's python3 packages.
pub const PYTHON: &str = "/usr/bin/python3";

/// The script, in this crate's `support/`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("support/mx.py")
}

/// How mx.py is started. Built with [`MxOpts::at`] and its methods.
#[derive(Debug, Clone)]
pub struct MxOpts {
    /// Where to listen; port 0 lets the kernel choose.
    pub listen: SocketAddr,
    /// The name in its greeting and EHLO reply.
    pub hostname: String,
    /// Certificate chain and key files (PEM): STARTTLS is offered.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub lmtp: bool,
    /// (address or `*`, `"CODE TEXT"`): fixed RCPT replies.
    pub rcpt_replies: Vec<(String, String)>,
    /// LMTP: (address or `*`, `"CODE TEXT"`): the reply after DATA.
    pub rcpt_data_replies: Vec<(String, String)>,
    /// The reply after DATA (LMTP: per recipient without its own).
    pub data_reply: Option<String>,
    pub hang_after_ehlo: bool,
    pub hang_after_dot: bool,
    pub no_smtputf8: bool,
    /// The SIZE limit it announces.
    pub size: Option<u64>,
}

impl MxOpts {
    /// Listens on `ip`, a port the kernel chooses.
    pub fn at(ip: IpAddr) -> Self {
        Self::listen(SocketAddr::new(ip, 0))
    }

    /// Listens on `addr` (a fixed port: another MX on the port of the
    /// first, on another address).
    pub fn listen(addr: SocketAddr) -> Self {
        MxOpts {
            listen: addr,
            hostname: "mx.test".into(),
            tls: None,
            lmtp: false,
            rcpt_replies: Vec::new(),
            rcpt_data_replies: Vec::new(),
            data_reply: None,
            hang_after_ehlo: false,
            hang_after_dot: false,
            no_smtputf8: false,
            size: None,
        }
    }

    pub fn hostname(mut self, name: &str) -> Self {
        self.hostname = name.into();
        self
    }

    /// Offers STARTTLS with this certificate chain and key (not required).
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Speaks LMTP (LHLO; one reply per accepted recipient after DATA).
    pub fn lmtp(mut self) -> Self {
        self.lmtp = true;
        self
    }

    /// RCPT TO `addr` (case-insensitive; `*`: every other) is answered
    /// `reply` (`"550 5.1.1 no"`); a 2xx reply accepts it.
    pub fn rcpt_reply(mut self, addr: &str, reply: &str) -> Self {
        self.rcpt_replies.push((addr.into(), reply.into()));
        self
    }

    /// LMTP: `addr`'s reply after DATA (`*`: every other).
    pub fn rcpt_data_reply(mut self, addr: &str, reply: &str) -> Self {
        self.rcpt_data_replies.push((addr.into(), reply.into()));
        self
    }

    /// The reply to the final dot (`"554 5.7.1 spam"`); a message is
    /// stored only if it is 2xx.
    pub fn data_reply(mut self, reply: &str) -> Self {
        self.data_reply = Some(reply.into());
        self
    }

    /// Answers EHLO/HELO/LHLO, then never anything more.
    pub fn hang_after_ehlo(mut self) -> Self {
        self.hang_after_ehlo = true;
        self
    }

    /// Stores the message, then never answers its final dot.
    pub fn hang_after_dot(mut self) -> Self {
        self.hang_after_dot = true;
        self
    }

    /// Does not offer SMTPUTF8.
    pub fn no_smtputf8(mut self) -> Self {
        self.no_smtputf8 = true;
        self
    }

    pub fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    fn args(&self, maildir: &Path) -> Vec<String> {
        let listen = match self.listen {
            SocketAddr::V4(a) => a.to_string(),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        let mut v = vec![
            "--listen".to_string(),
            listen,
            "--hostname".into(),
            self.hostname.clone(),
            "--maildir".into(),
            maildir.display().to_string(),
        ];
        if let Some((c, k)) = &self.tls {
            v.extend([
                "--tls-cert".into(),
                c.display().to_string(),
                "--tls-key".into(),
                k.display().to_string(),
            ]);
        }
        if self.lmtp {
            v.push("--lmtp".into());
        }
        for (a, r) in &self.rcpt_replies {
            v.extend(["--rcpt-reply".into(), format!("{a}={r}")]);
        }
        for (a, r) in &self.rcpt_data_replies {
            v.extend(["--rcpt-data-reply".into(), format!("{a}={r}")]);
        }
        if let Some(r) = &self.data_reply {
            v.extend(["--data-reply".into(), r.clone()]);
        }
        if self.hang_after_ehlo {
            v.push("--hang-after-ehlo".into());
        }
        if self.hang_after_dot {
            v.push("--hang-after-dot".into());
        }
        if self.no_smtputf8 {
            v.push("--no-smtputf8".into());
        }
        if let Some(s) = self.size {
            v.extend(["--size".into(), s.to_string()]);
        }
        v
    }
}

impl Default for MxOpts {
    /// Plain SMTP on 127.0.0.1, any port.
    fn default() -> Self {
        Self::at(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }
}

/// One message mx.py accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    /// MAIL FROM parameters (`SIZE=…`, `BODY=8BITMIME`, `SMTPUTF8`), upper
    /// case, as aiosmtpd keeps them.
    pub mail_options: Vec<String>,
    /// The recipients it accepted (LMTP: those whose reply after DATA was
    /// 2xx).
    pub rcpt_tos: Vec<String>,
    /// The EHLO/LHLO name (after STARTTLS, the one given again).
    pub helo: Option<String>,
    /// Whether the message came over STARTTLS.
    pub tls: bool,
    /// `"TLSv1.3"`…, when `tls`.
    pub tls_version: Option<String>,
    /// The client's address.
    pub peer: Option<String>,
    /// The message as received (CRLF line ends, dot-unstuffed).
    pub data: Vec<u8>,
}

impl Received {
    pub fn data_str(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    fn parse(bytes: &[u8]) -> Received {
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .expect("mx.py message file: a header line");
        let h: serde_json::Value =
            serde_json::from_slice(&bytes[..nl]).expect("mx.py message file: JSON header");
        let strs = |k: &str| -> Vec<String> {
            h[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let opt = |k: &str| h[k].as_str().map(str::to_string);
        Received {
            mail_from: opt("mail_from").unwrap_or_default(),
            mail_options: strs("mail_options"),
            rcpt_tos: strs("rcpt_tos"),
            helo: opt("helo"),
            tls: h["tls"].as_bool().unwrap_or(false),
            tls_version: opt("tls_version"),
            peer: opt("peer"),
            data: bytes[nl + 1..].to_vec(),
        }
    }
}

/// A running mx.py. Killed when dropped.
pub struct PyMx {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl PyMx {
    /// Starts mx.py and waits until it accepts connections. Panics, with
    /// its log, if it cannot start (aiosmtpd missing, address in use).
    pub fn start(opts: MxOpts) -> PyMx {
        assert!(
            opts.listen.ip().is_loopback(),
            "test servers are loopback only"
        );
        assert!(
            Path::new(PYTHON).is_file(),
            "{PYTHON} is missing: apt-get install python3 python3-aiosmtpd (scripts/test.sh installs them)"
        );
        let dir = tempfile::Builder::new()
            .prefix("tambo-pymx")
            .tempdir()
            .expect("tempdir");
        let maildir = dir.path().join("messages");
        let log_path = dir.path().join("mx.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(PYTHON)
            .arg("-u")
            .arg(script())
            .args(opts.args(&maildir))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PYTHON}: {e}"));
        let mut mx = PyMx {
            child,
            addr: opts.listen,
            dir,
        };
        let marker = "mx.py listening on ";
        let addr = wait_for("mx.py to listen", || {
            if let Ok(Some(status)) = mx.child.try_wait() {
                panic!(
                    "mx.py exited ({status}) before listening{}:\n{}",
                    if status.code() == Some(3) {
                        " — apt-get install python3-aiosmtpd (scripts/test.sh installs it)"
                    } else {
                        ""
                    },
                    mx.log()
                );
            }
            let log = mx.log();
            let line = log.lines().find(|l| l.starts_with(marker))?;
            let a = &line[marker.len()..];
            Some(
                a.trim()
                    .parse::<SocketAddr>()
                    .unwrap_or_else(|_| panic!("mx.py printed a bad address: {line:?}")),
            )
        });
        mx.addr = addr;
        wait_for("mx.py to accept a connection", || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .ok()
                .map(|_| ())
        });
        mx
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory its messages are written to.
    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("messages")
    }

    /// Its log: every command and reply, and what it stored.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("mx.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The messages accepted so far, oldest first.
    pub fn messages(&self) -> Vec<Received> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.maildir())
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "msg"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|p| Received::parse(&std::fs::read(p).unwrap()))
            .collect()
    }

    /// Waits until at least `n` messages were accepted; returns them all.
    pub fn wait_messages(&self, n: usize) -> Vec<Received> {
        wait_for(&format!("{n} message(s) at mx.py {}", self.addr), || {
            let m = self.messages();
            (m.len() >= n).then_some(m)
        })
    }
}

impl Drop for PyMx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- mx.py {} log ----\n{}", self.addr, self.log());
        }
    }
}
