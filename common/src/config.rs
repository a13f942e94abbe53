//! `tambo.conf`: chasquid's keys in TOML, plus tambo's own `[tambo]` table
//! and the test-only `[testing]` table.
//!
//! Every problem becomes one [`ConfigError`] naming the file, the key (or
//! line) and what is wrong, so a daemon can refuse to start with one clear
//! line. Keys are read one by one from the parsed table rather than through
//! serde, precisely so the error can name the key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::duration;

/// A configuration problem: file, then key or line, then the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub line: Option<usize>,
    pub problem: String,
}

impl ConfigError {
    pub fn file(file: &Path, problem: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            key: None,
            line: None,
            problem: problem.into(),
        }
    }
    pub fn key(file: &Path, key: &str, problem: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            key: Some(key.to_string()),
            line: None,
            problem: problem.into(),
        }
    }
    pub fn line(file: &Path, line: usize, problem: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            key: None,
            line: Some(line),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key {key}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Where a daemon listens: a socket address, or the sockets systemd passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `"systemd"`: the sockets passed with the mode's FileDescriptorName.
    Systemd,
    Addr(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Systemd => f.write_str("systemd"),
            ListenAddr::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// Where one SMTP mode listens (see [`Config::smtp_modes`]).
#[derive(Debug, Clone, Copy)]
pub struct SmtpListen<'a> {
    pub mode: tambo_proto::submit::Mode,
    pub key: &'static str,
    pub fd_name: &'static str,
    pub addrs: &'a [ListenAddr],
}

/// tambo-only settings (`[tambo]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TamboConfig {
    /// Unix sockets between the processes live here.
    pub runtime_dir: PathBuf,
    pub smtpd_user: String,
    pub queued_user: String,
    pub deliverd_user: String,
    pub monitord_user: String,
    /// When set, local mail goes to this Maildir path template
    /// (`%to_user%`, `%to_domain%`, `%to%`) instead of the MDA.
    pub maildir: Option<String>,
    /// How many deliveries deliverd runs at once.
    pub delivery_slots: u32,
    /// Most SMTP sessions at once, all clients together.
    pub max_sessions: u32,
    /// Most SMTP sessions at once from one client address (IPv4 address,
    /// or IPv6 /64).
    pub max_sessions_per_client: u32,
    /// Most message bytes being received at once, over all sessions.
    pub max_data_in_flight_mb: u64,
    /// An authenticated user may only use their own addresses (and `<>`)
    /// as the envelope sender.
    pub sender_bound_to_login: bool,
    /// TLS handshake signatures queued makes for smtpd per second, all key
    /// links together (bursts of twice as many).
    pub max_tls_signatures_per_second: u32,
    /// Local mail goes to this LMTP server (RFC 2033) instead of the MDA or
    /// the Maildir: a Unix socket path (starting with `/`) or `host:port`.
    pub lmtp_address: Option<String>,
    /// Outgoing SMTP connections start from one of these local addresses
    /// (at most one IPv4 and one IPv6; the one of the destination's family
    /// is used). Empty: the kernel chooses.
    pub outgoing_source_address: Vec<std::net::IpAddr>,
    /// How long an outgoing SMTP connection is kept open after a delivery,
    /// for the next message to the same destination. Zero: never reused.
    pub smtp_connection_cache_time: Duration,
    /// Clients in these networks may relay without AUTH (chasquid #55).
    /// Empty (the default): only authenticated sessions relay.
    pub relay_networks: Vec<crate::cidr::Cidr>,
    /// Where deliverd (and so the MDA, pipe commands and hooks) may write
    /// besides the Maildir tree, its cache and the temporary directories
    /// (docs/security.md).
    pub deliverd_paths: Vec<PathBuf>,
}

/// Test knobs (chasquid's `testing__*`). Not for production use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Testing {
    /// Replaces the retry schedule's 1m/5m/10m/20m delays.
    pub retry_delays: Option<[Duration; 4]>,
    /// Replaces the 0–60 s random extra added to each retry delay.
    pub retry_jitter: Option<Duration>,
    /// Makes every queue write fail, as a full disk would.
    pub fail_queue_writes: bool,
    /// Replaces smtpd's 1-minute command timeout.
    pub smtp_command_timeout: Option<Duration>,
    /// Replaces smtpd's 1-minute first deadline (the PROXY header, the
    /// implicit-TLS handshake and the greeting).
    pub smtp_first_deadline: Option<Duration>,
    /// Replaces the deadline queued gives deliverd for each job.
    pub delivery_job_deadline: Option<Duration>,
    /// While this file exists, fsyncs of the queue directory fail.
    pub fail_dir_sync_if_exists: Option<PathBuf>,
    /// Replaces the idle timeout of queued's and monitord's IPC sockets.
    pub ipc_idle_timeout: Option<Duration>,
    /// Replaces the monitoring HTTP server's keep-alive idle timeout.
    pub http_idle_timeout: Option<Duration>,
    /// Replaces the 30-second MDA and pipe timeout.
    pub mda_timeout: Option<Duration>,
    /// Replaces the 512 KiB between two heap-profile samples (a test
    /// wants samples from a process that holds little).
    pub heap_profile_rate: Option<u64>,
    /// deliverd waits this long after writing a message into a Maildir
    /// before it reports it delivered: the window a crash can fall into.
    pub maildir_pause: Option<Duration>,
    /// Replaces the 30-second period of the reloads (certificates).
    pub reload_period: Option<Duration>,
    /// Every DNS lookup of deliverd goes to this server (instead of
    /// /etc/resolv.conf's).
    pub dns_server: Option<SocketAddr>,
    /// Outgoing SMTP connects to this port instead of 25.
    pub smtp_port: Option<u16>,
    /// MTA-STS policies are fetched from this port instead of 443.
    pub sts_https_port: Option<u16>,
    /// Certificates (PEM) that replace the system's roots when deliverd
    /// verifies a server (TLS_SECURE, MTA-STS).
    pub tls_roots: Option<PathBuf>,
    /// Replaces the 10-minute limit of an outgoing SMTP session (and caps
    /// each wait for a reply).
    pub smtp_out_timeout: Option<Duration>,
    /// Replaces the 10-minute period of the MTA-STS cache refresh.
    pub sts_refresh_period: Option<Duration>,
    /// Replaces every hook's timeout (REFERENCE §6).
    pub hook_timeout: Option<Duration>,
}

/// The effective configuration of one tambo installation.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The directory the config was read from; relative paths resolve here.
    pub config_dir: PathBuf,
    pub hostname: String,
    pub max_data_size_mb: u64,
    pub smtp_address: Vec<ListenAddr>,
    pub submission_address: Vec<ListenAddr>,
    pub submission_over_tls_address: Vec<ListenAddr>,
    pub monitoring_address: Option<SocketAddr>,
    pub mail_delivery_agent_bin: String,
    pub mail_delivery_agent_args: Vec<String>,
    pub data_dir: PathBuf,
    pub suffix_separators: String,
    pub drop_characters: String,
    pub mail_log_path: String,
    pub dovecot_auth: bool,
    pub dovecot_userdb_path: String,
    pub dovecot_client_path: String,
    pub haproxy_incoming: bool,
    pub max_queue_items: u64,
    pub give_up_send_after: Duration,
    pub tambo: TamboConfig,
    pub testing: Testing,
}

/// The config file's name inside the config directory.
pub const FILE_NAME: &str = "tambo.conf";

impl Config {
    /// Defaults, as in REFERENCE §1.2, for a config in `config_dir`.
    pub fn defaults(config_dir: &Path) -> Self {
        Config {
            config_dir: config_dir.to_path_buf(),
            hostname: os_hostname(),
            max_data_size_mb: 50,
            smtp_address: vec![ListenAddr::Systemd],
            submission_address: vec![ListenAddr::Systemd],
            submission_over_tls_address: vec![ListenAddr::Systemd],
            monitoring_address: None,
            mail_delivery_agent_bin: "maildrop".into(),
            mail_delivery_agent_args: ["-f", "%from%", "-d", "%to_user%"]
                .map(String::from)
                .to_vec(),
            data_dir: PathBuf::from("/var/lib/tambo"),
            suffix_separators: "+".into(),
            drop_characters: ".".into(),
            mail_log_path: "<syslog>".into(),
            dovecot_auth: false,
            dovecot_userdb_path: String::new(),
            dovecot_client_path: String::new(),
            haproxy_incoming: false,
            max_queue_items: 200,
            give_up_send_after: Duration::from_secs(20 * 3600),
            tambo: TamboConfig {
                runtime_dir: PathBuf::from("/run/tambo"),
                smtpd_user: "tambo-smtpd".into(),
                queued_user: "tambo-queue".into(),
                deliverd_user: "tambo-deliver".into(),
                monitord_user: "tambo-monitor".into(),
                maildir: None,
                delivery_slots: 16,
                max_sessions: 1000,
                max_sessions_per_client: 50,
                max_data_in_flight_mb: 512,
                sender_bound_to_login: true,
                max_tls_signatures_per_second: 1000,
                lmtp_address: None,
                outgoing_source_address: Vec::new(),
                smtp_connection_cache_time: Duration::from_secs(2),
                relay_networks: Vec::new(),
                deliverd_paths: Vec::new(),
            },
            testing: Testing::default(),
        }
    }

    /// Reads `<config_dir>/tambo.conf`, then applies `overrides` (TOML) on
    /// top: a key present replaces the default, whatever its value.
    pub fn load(config_dir: &Path, overrides: Option<&str>) -> Result<Self, ConfigError> {
        let path = config_dir.join(FILE_NAME);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::file(&path, format!("cannot read: {e}")))?;
        let mut cfg = Self::from_str(config_dir, &path, &text)?;
        if let Some(ov) = overrides {
            let ov_path = PathBuf::from("--config_overrides");
            let table = parse_table(&ov_path, ov)?;
            cfg.apply(&ov_path, &table)?;
        }
        Ok(cfg)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn from_str(config_dir: &Path, path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut cfg = Self::defaults(config_dir);
        let table = parse_table(path, text)?;
        cfg.apply(path, &table)?;
        Ok(cfg)
    }

    fn apply(&mut self, file: &Path, table: &Table) -> Result<(), ConfigError> {
        let g = Getter { file };
        for (key, v) in table {
            match key.as_str() {
                "hostname" => {
                    let h = g.string(key, v)?;
                    if h.is_empty() || h.contains(char::is_whitespace) {
                        return Err(g.err(key, "must be a host name without spaces"));
                    }
                    self.hostname = h;
                }
                "max_data_size_mb" => self.max_data_size_mb = g.positive(key, v)?,
                "smtp_address" => self.smtp_address = g.listen_list(key, v)?,
                "submission_address" => self.submission_address = g.listen_list(key, v)?,
                "submission_over_tls_address" => {
                    self.submission_over_tls_address = g.listen_list(key, v)?
                }
                "monitoring_address" => {
                    let s = g.string(key, v)?;
                    self.monitoring_address = if s.is_empty() {
                        None
                    } else {
                        Some(parse_socket_addr(&s).map_err(|p| g.err(key, p))?)
                    };
                }
                "mail_delivery_agent_bin" => self.mail_delivery_agent_bin = g.string(key, v)?,
                "mail_delivery_agent_args" => {
                    self.mail_delivery_agent_args = g.string_list(key, v)?
                }
                "data_dir" => self.data_dir = g.path(key, v)?,
                "suffix_separators" => self.suffix_separators = g.string(key, v)?,
                "drop_characters" => self.drop_characters = g.string(key, v)?,
                "mail_log_path" => self.mail_log_path = g.string(key, v)?,
                "dovecot_auth" => self.dovecot_auth = g.bool(key, v)?,
                "dovecot_userdb_path" => self.dovecot_userdb_path = g.string(key, v)?,
                "dovecot_client_path" => self.dovecot_client_path = g.string(key, v)?,
                "haproxy_incoming" => self.haproxy_incoming = g.bool(key, v)?,
                "max_queue_items" => self.max_queue_items = g.positive(key, v)?,
                "give_up_send_after" => self.give_up_send_after = g.duration(key, v)?,
                "tambo" => self.apply_tambo(&g, g.table(key, v)?)?,
                "testing" => self.apply_testing(&g, g.table(key, v)?)?,
                _ => return Err(g.err(key, "unknown key")),
            }
        }
        if self.tambo.max_data_in_flight_mb < self.max_data_size_mb {
            return Err(g.err(
                "tambo.max_data_in_flight_mb",
                format!(
                    "is {}, smaller than max_data_size_mb ({}): a message of the largest size could never be accepted",
                    self.tambo.max_data_in_flight_mb, self.max_data_size_mb
                ),
            ));
        }
        if self.mail_delivery_agent_bin.is_empty()
            && self.tambo.maildir.is_none()
            && self.tambo.lmtp_address.is_none()
        {
            return Err(g.err(
                "mail_delivery_agent_bin",
                "is empty and neither [tambo] maildir nor [tambo] lmtp_address is set: local mail could not be delivered",
            ));
        }
        Ok(())
    }

    fn apply_tambo(&mut self, g: &Getter, table: &Table) -> Result<(), ConfigError> {
        for (k, v) in table {
            let key = format!("tambo.{k}");
            let key = key.as_str();
            match k.as_str() {
                "runtime_dir" => self.tambo.runtime_dir = g.path(key, v)?,
                "smtpd_user" => self.tambo.smtpd_user = g.nonempty(key, v)?,
                "queued_user" => self.tambo.queued_user = g.nonempty(key, v)?,
                "deliverd_user" => self.tambo.deliverd_user = g.nonempty(key, v)?,
                "monitord_user" => self.tambo.monitord_user = g.nonempty(key, v)?,
                "maildir" => {
                    let s = g.string(key, v)?;
                    // deliverd may write beneath the fixed part only
                    // (docs/security.md): it must name a real directory.
                    if !s.is_empty() && crate::sandbox::maildir_root(&s).is_none() {
                        return Err(g.err(
                            key,
                            format!("{s:?} must be an absolute path with a directory before its first %, other than /"),
                        ));
                    }
                    self.tambo.maildir = if s.is_empty() { None } else { Some(s) };
                }
                "delivery_slots" => {
                    let n = g.positive(key, v)?;
                    self.tambo.delivery_slots = u32::try_from(n)
                        .ok()
                        .filter(|n| *n <= 1024)
                        .ok_or_else(|| g.err(key, "must be between 1 and 1024"))?;
                }
                "max_sessions" => self.tambo.max_sessions = g.u32(key, v)?,
                "max_sessions_per_client" => self.tambo.max_sessions_per_client = g.u32(key, v)?,
                "max_data_in_flight_mb" => self.tambo.max_data_in_flight_mb = g.positive(key, v)?,
                "sender_bound_to_login" => self.tambo.sender_bound_to_login = g.bool(key, v)?,
                "max_tls_signatures_per_second" => {
                    self.tambo.max_tls_signatures_per_second = g.u32(key, v)?
                }
                "lmtp_address" => {
                    let s = g.string(key, v)?;
                    self.tambo.lmtp_address = if s.is_empty() {
                        None
                    } else if s.starts_with('/')
                        || s.rsplit_once(':')
                            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                    {
                        Some(s)
                    } else {
                        return Err(g.err(
                            key,
                            format!(
                                "{s:?} is neither a socket path (starting with /) nor host:port"
                            ),
                        ));
                    };
                }
                "outgoing_source_address" => {
                    let list = g.string_list(key, v)?;
                    let mut ips = Vec::new();
                    for a in &list {
                        let ip: std::net::IpAddr = a
                            .parse()
                            .map_err(|_| g.err(key, format!("{a:?} is not an IP address")))?;
                        if ips
                            .iter()
                            .any(|o: &std::net::IpAddr| o.is_ipv4() == ip.is_ipv4())
                        {
                            return Err(g.err(key, "holds at most one IPv4 and one IPv6 address"));
                        }
                        ips.push(ip);
                    }
                    self.tambo.outgoing_source_address = ips;
                }
                "smtp_connection_cache_time" => {
                    let s = g.string(key, v)?;
                    self.tambo.smtp_connection_cache_time = if s == "0s" || s == "0" {
                        Duration::ZERO
                    } else {
                        duration::parse(&s).map_err(|p| g.err(key, p))?
                    };
                }
                "relay_networks" => {
                    let mut nets = Vec::new();
                    for n in g.string_list(key, v)? {
                        nets.push(n.parse().map_err(|p: String| g.err(key, p))?);
                    }
                    self.tambo.relay_networks = nets;
                }
                "deliverd_paths" => {
                    let mut paths = Vec::new();
                    for p in g.string_list(key, v)? {
                        let p = PathBuf::from(p);
                        if !p.is_absolute() {
                            return Err(
                                g.err(key, format!("{} is not an absolute path", p.display()))
                            );
                        }
                        paths.push(p);
                    }
                    self.tambo.deliverd_paths = paths;
                }
                _ => return Err(g.err(key, "unknown key")),
            }
        }
        Ok(())
    }

    fn apply_testing(&mut self, g: &Getter, table: &Table) -> Result<(), ConfigError> {
        for (k, v) in table {
            let key = format!("testing.{k}");
            let key = key.as_str();
            match k.as_str() {
                "retry_delays" => {
                    let list = g.string_list(key, v)?;
                    let ds = list
                        .iter()
                        .map(|s| duration::parse(s).map_err(|p| g.err(key, p)))
                        .collect::<Result<Vec<_>, _>>()?;
                    let arr: [Duration; 4] = ds
                        .try_into()
                        .map_err(|_| g.err(key, "needs exactly 4 durations"))?;
                    self.testing.retry_delays = Some(arr);
                }
                "retry_jitter" => {
                    let s = g.string(key, v)?;
                    self.testing.retry_jitter = Some(if s == "0s" || s == "0" {
                        Duration::ZERO
                    } else {
                        duration::parse(&s).map_err(|p| g.err(key, p))?
                    });
                }
                "fail_queue_writes" => self.testing.fail_queue_writes = g.bool(key, v)?,
                "smtp_command_timeout" => {
                    self.testing.smtp_command_timeout = Some(g.duration(key, v)?)
                }
                "smtp_first_deadline" => {
                    self.testing.smtp_first_deadline = Some(g.duration(key, v)?)
                }
                "delivery_job_deadline" => {
                    self.testing.delivery_job_deadline = Some(g.duration(key, v)?)
                }
                "fail_dir_sync_if_exists" => {
                    self.testing.fail_dir_sync_if_exists = Some(g.path(key, v)?)
                }
                "ipc_idle_timeout" => self.testing.ipc_idle_timeout = Some(g.duration(key, v)?),
                "http_idle_timeout" => self.testing.http_idle_timeout = Some(g.duration(key, v)?),
                "mda_timeout" => self.testing.mda_timeout = Some(g.duration(key, v)?),
                "heap_profile_rate" => self.testing.heap_profile_rate = Some(g.positive(key, v)?),
                "maildir_pause" => self.testing.maildir_pause = Some(g.duration(key, v)?),
                "reload_period" => self.testing.reload_period = Some(g.duration(key, v)?),
                "dns_server" => {
                    let s = g.string(key, v)?;
                    self.testing.dns_server =
                        Some(parse_socket_addr(&s).map_err(|p| g.err(key, p))?);
                }
                "smtp_port" => self.testing.smtp_port = Some(g.port(key, v)?),
                "sts_https_port" => self.testing.sts_https_port = Some(g.port(key, v)?),
                "tls_roots" => self.testing.tls_roots = Some(g.path(key, v)?),
                "smtp_out_timeout" => self.testing.smtp_out_timeout = Some(g.duration(key, v)?),
                "sts_refresh_period" => self.testing.sts_refresh_period = Some(g.duration(key, v)?),
                "hook_timeout" => self.testing.hook_timeout = Some(g.duration(key, v)?),
                _ => return Err(g.err(key, "unknown key")),
            }
        }
        Ok(())
    }

    /// The three SMTP modes: each with its listen addresses, its config
    /// key, and the name its sockets carry when passed by socket
    /// activation (`FileDescriptorName=`, as chasquid's units name them).
    pub fn smtp_modes(&self) -> [SmtpListen<'_>; 3] {
        use tambo_proto::submit::Mode;
        [
            SmtpListen {
                mode: Mode::Smtp,
                key: "smtp_address",
                fd_name: "smtp",
                addrs: &self.smtp_address,
            },
            SmtpListen {
                mode: Mode::Submission,
                key: "submission_address",
                fd_name: "submission",
                addrs: &self.submission_address,
            },
            SmtpListen {
                mode: Mode::SubmissionTls,
                key: "submission_over_tls_address",
                fd_name: "submission_tls",
                addrs: &self.submission_over_tls_address,
            },
        ]
    }

    /// `data_dir/queue`.
    pub fn queue_dir(&self) -> PathBuf {
        self.data_dir.join("queue")
    }

    /// `data_dir/domaininfo`: queued's per-domain security levels.
    pub fn domaininfo_dir(&self) -> PathBuf {
        self.data_dir.join("domaininfo")
    }

    /// `data_dir/sts-cache`: deliverd's MTA-STS policy cache.
    pub fn sts_cache_dir(&self) -> PathBuf {
        self.data_dir.join("sts-cache")
    }

    /// Paths of the Unix sockets between processes.
    pub fn submit_socket(&self) -> PathBuf {
        self.tambo.runtime_dir.join("submit.sock")
    }
    pub fn deliver_socket(&self) -> PathBuf {
        self.tambo.runtime_dir.join("deliver.sock")
    }
    pub fn monitor_socket(&self) -> PathBuf {
        self.tambo.runtime_dir.join("monitor.sock")
    }

    /// Largest message, in bytes.
    pub fn max_data_size(&self) -> u64 {
        self.max_data_size_mb.saturating_mul(1024 * 1024)
    }

    /// How often changed files are picked up without a restart (REFERENCE
    /// §1.1: 30 s, or `[testing] reload_period`).
    pub fn reload_period(&self) -> Duration {
        self.testing
            .reload_period
            .unwrap_or(Duration::from_secs(30))
    }

    /// The mail log's file, when `mail_log_path` names one (not
    /// `<syslog>`, `<stdout>` or `<stderr>`); relative to the config
    /// directory.
    pub fn mail_log_file(&self) -> Option<PathBuf> {
        match self.mail_log_path.as_str() {
            "<syslog>" | "<stdout>" | "<stderr>" => None,
            p => Some(self.config_dir.join(p)),
        }
    }

    /// `[tambo] max_data_in_flight_mb`, in bytes.
    pub fn max_data_in_flight(&self) -> u64 {
        self.tambo.max_data_in_flight_mb.saturating_mul(1024 * 1024)
    }

    /// The user of each daemon role (`[tambo] *_user`).
    pub fn role_users(&self) -> tambo_proto::identity::RoleUsers<'_> {
        tambo_proto::identity::RoleUsers {
            smtpd: &self.tambo.smtpd_user,
            queued: &self.tambo.queued_user,
            deliverd: &self.tambo.deliverd_user,
            monitord: &self.tambo.monitord_user,
        }
    }

    /// Where the file named `file` of this config is, for error messages.
    pub fn file_path(&self) -> PathBuf {
        self.config_dir.join(FILE_NAME)
    }

    /// Resolves a path from the config against the config directory.
    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.config_dir.join(p)
        }
    }

    /// Makes every relative path absolute (against the config dir).
    pub fn resolve_paths(mut self) -> Self {
        self.data_dir = self.resolve(self.data_dir.clone());
        self.tambo.runtime_dir = self.resolve(self.tambo.runtime_dir.clone());
        if let Some(p) = self.testing.fail_dir_sync_if_exists.take() {
            self.testing.fail_dir_sync_if_exists = Some(self.resolve(p));
        }
        if let Some(p) = self.testing.tls_roots.take() {
            self.testing.tls_roots = Some(self.resolve(p));
        }
        self
    }
}

fn parse_table(path: &Path, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| {
        let mut problem = e.message().trim().to_string();
        if problem.is_empty() {
            problem = "invalid TOML".into();
        }
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                ConfigError::line(path, line, format!("invalid TOML: {problem}"))
            }
            None => ConfigError::file(path, format!("invalid TOML: {problem}")),
        }
    })
}

/// Typed access to table values, producing errors that name the key.
struct Getter<'a> {
    file: &'a Path,
}

impl Getter<'_> {
    fn err(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::key(self.file, key, problem)
    }
    fn string(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.err(key, format!("must be a string, not {}", v.type_str())))
    }
    fn nonempty(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        let s = self.string(key, v)?;
        if s.is_empty() {
            return Err(self.err(key, "must not be empty"));
        }
        Ok(s)
    }
    fn path(&self, key: &str, v: &Value) -> Result<PathBuf, ConfigError> {
        Ok(PathBuf::from(self.nonempty(key, v)?))
    }
    fn bool(&self, key: &str, v: &Value) -> Result<bool, ConfigError> {
        v.as_bool()
            .ok_or_else(|| self.err(key, format!("must be true or false, not {}", v.type_str())))
    }
    fn port(&self, key: &str, v: &Value) -> Result<u16, ConfigError> {
        u16::try_from(self.u32(key, v)?)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| self.err(key, "must be a port number, 1 to 65535"))
    }
    fn u32(&self, key: &str, v: &Value) -> Result<u32, ConfigError> {
        let n = self.positive(key, v)?;
        u32::try_from(n).map_err(|_| self.err(key, format!("must be at most {}", u32::MAX)))
    }
    fn positive(&self, key: &str, v: &Value) -> Result<u64, ConfigError> {
        match v.as_integer() {
            Some(n) if n > 0 => Ok(n as u64),
            Some(n) => Err(self.err(key, format!("must be > 0, not {n}"))),
            None => Err(self.err(key, format!("must be an integer, not {}", v.type_str()))),
        }
    }
    fn duration(&self, key: &str, v: &Value) -> Result<Duration, ConfigError> {
        let s = self.string(key, v)?;
        duration::parse(&s).map_err(|p| self.err(key, p))
    }
    fn table<'v>(&self, key: &str, v: &'v Value) -> Result<&'v Table, ConfigError> {
        v.as_table()
            .ok_or_else(|| self.err(key, format!("must be a table, not {}", v.type_str())))
    }
    fn string_list(&self, key: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
        let arr = v.as_array().ok_or_else(|| {
            self.err(
                key,
                format!("must be an array of strings, not {}", v.type_str()),
            )
        })?;
        arr.iter()
            .map(|item| {
                item.as_str().map(str::to_string).ok_or_else(|| {
                    self.err(
                        key,
                        format!("must be an array of strings; found {}", item.type_str()),
                    )
                })
            })
            .collect()
    }
    fn listen_list(&self, key: &str, v: &Value) -> Result<Vec<ListenAddr>, ConfigError> {
        self.string_list(key, v)?
            .iter()
            .map(|s| {
                if s.is_empty() {
                    Err(self.err(key, "contains \"\"; use [] to turn the mode off"))
                } else if s == "systemd" {
                    Ok(ListenAddr::Systemd)
                } else {
                    parse_socket_addr(s)
                        .map(ListenAddr::Addr)
                        .map_err(|p| self.err(key, p))
                }
            })
            .collect()
    }
}

/// `ip:port`, `[v6]:port`, or `:port` (every address).
fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("[::]{s}")
    } else {
        s.to_string()
    };
    full.parse().map_err(|_| {
        format!("{s:?} is not an address: use ip:port, [ipv6]:port, :port or \"systemd\"")
    })
}

/// The OS host name, for the default `hostname`.
pub fn os_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

mod render;

#[cfg(test)]
mod tests;
