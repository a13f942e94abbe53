//! What a role may still do once it serves (DESIGN §1): each daemon locks
//! itself down after dropping root and before its runtime starts threads
//! (a Landlock domain only covers the calling thread and its later
//! children until Landlock ABI 8).
//!
//! - **Landlock**, files: smtpd and monitord open nothing but the time
//!   zone; queued reads its config directory and reads and writes its
//!   queue and domaininfo directories, nothing else; none of the three may
//!   execute a file. Landlock, TCP (kernel 6.7 and later): smtpd may
//!   connect only to DNS servers' port; queued and monitord may neither
//!   connect nor bind. Abstract Unix sockets and signals outside the
//!   domain are refused (6.12 and later). Pathname Unix sockets are not
//!   Landlock's to restrict (up to ABI 7).
//! - **seccomp**: smtpd, queued and monitord cannot `execve` nor use
//!   io_uring; queued and monitord can create Unix sockets only (Landlock
//!   does not cover UDP), smtpd also plain TCP and UDP ones (not MPTCP,
//!   which Landlock's TCP rules do not see). Their listening sockets were
//!   made before, and `accept` stays allowed. On an architecture seccompiler
//!   does not know, this part is skipped and said once.
//!
//! deliverd runs programs (which inherit all of this): it may execute what
//! the system installed and its hooks, read the system, and write only its
//! cache, the Maildir tree, the temporary directories and `[tambo]
//! deliverd_paths`; never the queue. Its sockets are Unix, IPv4, IPv6 and
//! netlink ones; no io_uring.
//!
//! On a kernel without Landlock the daemon says so once and goes on with
//! what the kernel enforces (seccomp, the dropped user).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use tambo_proto::Role;

use crate::config::Config;

/// The newest Landlock ABI whose rights are asked for; older kernels get
/// what they support (best effort).
const ABI_WANTED: ABI = ABI::V6;

/// Where the time zone is read from (Received and DSN dates).
const ZONEINFO: [&str; 2] = ["/etc/localtime", "/usr/share/zoneinfo"];

/// What one role keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub role: Role,
    /// Read (files and directories) beneath these.
    pub read: Vec<PathBuf>,
    /// Read and write beneath these (never execute).
    pub write: Vec<PathBuf>,
    /// Read and execute beneath these.
    pub exec: Vec<PathBuf>,
    /// Whether files are restricted at all (deliverd whose MDA may write
    /// anywhere is not).
    pub files: bool,
    /// Whether TCP is restricted (to `connect_ports`).
    pub restrict_tcp: bool,
    /// TCP ports it may connect to (Landlock); it may bind none.
    pub connect_ports: Vec<u16>,
    /// No `execve`.
    pub no_exec: bool,
    /// Which sockets it may create.
    pub sockets: Sockets,
}

/// The sockets a role may create (seccomp, on `socket(2)`'s arguments;
/// io_uring, which could make one behind seccomp's back, is refused to
/// every locked-down role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sockets {
    /// Unix sockets only.
    Unix,
    /// Unix sockets, and IPv4/IPv6 sockets of plain TCP or UDP (not
    /// MPTCP, which Landlock's TCP rules do not see, nor ICMP or SCTP).
    UnixTcpUdp,
    /// Unix, IPv4/IPv6 of TCP or UDP, and routing netlink (the C
    /// library's getaddrinfo asks it which addresses the host has):
    /// deliverd and the programs it runs.
    Outbound,
}

/// What was enforced, for the one line the daemon logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub landlock: &'static str,
    pub seccomp: bool,
}

impl Sandbox {
    /// The rules for `role` (None: a role that is not a daemon).
    pub fn for_role(role: Role, cfg: &Config) -> Option<Sandbox> {
        let zone = ZONEINFO.iter().map(PathBuf::from).collect::<Vec<_>>();
        match role {
            Role::Smtpd => {
                let mut ports = vec![53];
                if let Some(a) = cfg.testing.dns_server {
                    ports.push(a.port());
                }
                Some(Sandbox {
                    role,
                    read: zone,
                    write: Vec::new(),
                    exec: Vec::new(),
                    files: true,
                    restrict_tcp: true,
                    connect_ports: ports,
                    no_exec: true,
                    sockets: Sockets::UnixTcpUdp,
                })
            }
            Role::Queued => {
                let mut read = zone;
                read.push(cfg.config_dir.clone());
                // The names of local users who submit on local.sock.
                read.push(PathBuf::from("/etc/passwd"));
                // Certificates are often links into /etc/letsencrypt: the
                // directories they point to are read too.
                read.extend(link_targets(&cfg.config_dir.join("certs")));
                let mut write = vec![cfg.queue_dir(), cfg.domaininfo_dir()];
                // The mail log's directory: reopened after a rotation.
                if let Some(dir) = cfg.mail_log_file().as_deref().and_then(Path::parent) {
                    write.push(dir.to_path_buf());
                }
                Some(Sandbox {
                    role,
                    read,
                    write,
                    exec: Vec::new(),
                    files: true,
                    restrict_tcp: true,
                    connect_ports: Vec::new(),
                    no_exec: true,
                    sockets: Sockets::Unix,
                })
            }
            Role::Monitord => Some(Sandbox {
                role,
                read: zone,
                write: Vec::new(),
                exec: Vec::new(),
                files: true,
                restrict_tcp: true,
                connect_ports: Vec::new(),
                no_exec: true,
                sockets: Sockets::Unix,
            }),
            Role::Deliverd => Some(Self::deliverd(cfg)),
            _ => None,
        }
    }

    /// deliverd runs programs (the MDA, pipe commands, hooks: they inherit
    /// all of this) and writes Maildirs: it may execute what the system
    /// installed and its hooks, and write only its cache, the Maildir tree
    /// (the template up to its first `%`), the temporary directories and
    /// `[tambo] deliverd_paths`. Never the queue, nor anything else of
    /// tambo's state. When local mail goes through an MDA that may write
    /// anywhere (no `maildir`, no `lmtp_address`) and no `deliverd_paths`
    /// say where, files are not restricted (and it says so).
    fn deliverd(cfg: &Config) -> Sandbox {
        let system: Vec<PathBuf> = [
            "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let mut exec = system;
        exec.push(cfg.config_dir.clone());
        // The MDA where the config says it is.
        let mda = Path::new(&cfg.mail_delivery_agent_bin);
        if let Some(dir) = mda.parent().filter(|_| mda.is_absolute()) {
            exec.push(dir.to_path_buf());
        }
        // What programs commonly look at: their own /proc entries, CPU
        // and memory facts under /sys.
        let mut read = vec![PathBuf::from("/proc"), PathBuf::from("/sys")];
        if let Some(roots) = &cfg.testing.tls_roots {
            read.push(roots.clone());
        }
        let mut write: Vec<PathBuf> =
            ["/tmp", "/var/tmp", "/dev/null", "/dev/zero", "/dev/urandom"]
                .iter()
                .map(PathBuf::from)
                .collect();
        write.push(cfg.sts_cache_dir());
        let maildir = maildir_root_of(cfg);
        if let Some(m) = &maildir {
            write.push(m.clone());
        }
        // Written, never executed: what deliverd may write it must not run.
        write.extend(cfg.tambo.deliverd_paths.iter().cloned());
        let files = maildir.is_some()
            || cfg.tambo.lmtp_address.is_some()
            || !cfg.tambo.deliverd_paths.is_empty();
        Sandbox {
            role: Role::Deliverd,
            read,
            write,
            exec,
            files,
            restrict_tcp: false,
            connect_ports: Vec::new(),
            no_exec: false,
            sockets: Sockets::Outbound,
        }
    }

    /// Refuses rules that would reach what the role must not: a rule of
    /// deliverd's above the queue (a Maildir template, `deliverd_paths` or
    /// the config directory containing `data_dir`), or `/` itself. The
    /// scratch directories are left out: state never lives there in
    /// production (tests do put it there).
    pub fn check_reach(&self, cfg: &Config) -> Result<(), String> {
        if self.role != Role::Deliverd || !self.files {
            return Ok(());
        }
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let queue = canon(&cfg.queue_dir());
        let scratch = [Path::new("/tmp"), Path::new("/var/tmp")];
        for root in self.write.iter().chain(&self.exec).chain(&self.read) {
            if scratch.contains(&root.as_path()) || root.starts_with("/dev") {
                continue;
            }
            let r = canon(root);
            if r == Path::new("/") {
                return Err(format!(
                    "{}: deliverd may not be given all of /",
                    root.display()
                ));
            }
            if queue.starts_with(&r) {
                return Err(format!(
                    "{} contains the queue ({}): deliverd, and the programs it runs, could read it; move data_dir, the maildir template or the deliverd_paths entry apart",
                    root.display(),
                    queue.display()
                ));
            }
        }
        Ok(())
    }

    /// Applies the rules to this process, for good.
    pub fn apply(&self) -> Result<Report, String> {
        let landlock = self.landlock()?;
        let seccomp = self.seccomp()?;
        Ok(Report { landlock, seccomp })
    }

    fn landlock(&self) -> Result<&'static str, String> {
        let err = |e: landlock::RulesetError| format!("Landlock: {e}");
        let all = AccessFs::from_all(ABI_WANTED);
        let read = AccessFs::from_read(ABI_WANTED) & !AccessFs::Execute;
        // No links, sockets, fifos or devices made where it writes.
        let write = all
            & !(AccessFs::Execute
                | AccessFs::MakeSym
                | AccessFs::MakeSock
                | AccessFs::MakeFifo
                | AccessFs::MakeBlock
                | AccessFs::MakeChar);
        let mut ruleset = Ruleset::default();
        if self.files {
            ruleset = ruleset.handle_access(all).map_err(err)?;
        }
        if self.restrict_tcp {
            ruleset = ruleset
                .handle_access(AccessNet::from_all(ABI_WANTED))
                .map_err(err)?;
            // Abstract Unix sockets (outside the file system) and signals
            // to processes outside its domain. Not for deliverd: the
            // programs it runs may signal their own children, and talk to
            // whatever abstract sockets their work needs.
            ruleset = ruleset
                .scope(Scope::AbstractUnixSocket | Scope::Signal)
                .map_err(err)?;
        }
        if !self.files && !self.restrict_tcp {
            return Ok("not used for this role's files");
        }
        let mut created = ruleset.create().map_err(err)?;
        let exec = AccessFs::from_read(ABI_WANTED);
        let rules: [(&Vec<PathBuf>, _); 3] =
            [(&self.read, read), (&self.write, write), (&self.exec, exec)];
        for (paths, access) in rules.into_iter().filter(|_| self.files) {
            for p in paths {
                // A path that does not exist (no zoneinfo here) grants
                // nothing; a place to write that is missing is worth a line.
                let Ok(fd) = PathFd::new(p) else {
                    if access == write && !p.starts_with("/dev") {
                        tracing::warn!(
                            "{}: {} does not exist: nothing may be written there until a restart",
                            self.role.name(),
                            p.display()
                        );
                    }
                    continue;
                };
                // A file gets only the rights a file can have.
                let access = if p.is_dir() {
                    access
                } else {
                    access & AccessFs::from_file(ABI_WANTED)
                };
                created = created
                    .add_rule(PathBeneath::new(fd, access))
                    .map_err(err)?;
            }
        }
        for port in &self.connect_ports {
            created = created
                .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
                .map_err(err)?;
        }
        let status = created.restrict_self().map_err(err)?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => "fully enforced",
            RulesetStatus::PartiallyEnforced => "partly enforced (an older kernel)",
            RulesetStatus::NotEnforced => "not available on this kernel",
        })
    }

    fn seccomp(&self) -> Result<bool, String> {
        use nix::libc;
        let err = |e: seccompiler::BackendError| format!("seccomp: {e}");
        let cond = |n: u8, op: SeccompCmpOp, v: libc::c_int| -> Result<SeccompCondition, String> {
            SeccompCondition::new(n, SeccompCmpArgLen::Dword, op, v as u64).map_err(err)
        };
        let ne = |n: u8, v: libc::c_int| cond(n, SeccompCmpOp::Ne, v);
        let eq = |n: u8, v: libc::c_int| cond(n, SeccompCmpOp::Eq, v);
        let rule = |c: Vec<SeccompCondition>| SeccompRule::new(c).map_err(err);
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        if self.no_exec {
            // An empty rule list matches every call.
            rules.insert(libc::SYS_execve, Vec::new());
            rules.insert(libc::SYS_execveat, Vec::new());
        }
        // io_uring can open sockets and files without the calls below.
        for call in [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
        ] {
            rules.insert(call, Vec::new());
        }
        // Refused: an IPv4/IPv6 socket of any protocol but TCP and UDP.
        let ip_protocols = || -> Result<Vec<SeccompRule>, String> {
            [libc::AF_INET, libc::AF_INET6]
                .into_iter()
                .map(|family| {
                    rule(vec![
                        eq(0, family)?,
                        ne(2, 0)?,
                        ne(2, libc::IPPROTO_TCP)?,
                        ne(2, libc::IPPROTO_UDP)?,
                    ])
                })
                .collect()
        };
        let socket_rules = match self.sockets {
            // Refused: any family but AF_UNIX.
            Sockets::Unix => vec![rule(vec![ne(0, libc::AF_UNIX)?])?],
            Sockets::UnixTcpUdp => {
                let mut v = vec![rule(vec![
                    ne(0, libc::AF_UNIX)?,
                    ne(0, libc::AF_INET)?,
                    ne(0, libc::AF_INET6)?,
                ])?];
                v.extend(ip_protocols()?);
                v
            }
            Sockets::Outbound => {
                let mut v = vec![rule(vec![
                    ne(0, libc::AF_UNIX)?,
                    ne(0, libc::AF_INET)?,
                    ne(0, libc::AF_INET6)?,
                    ne(0, libc::AF_NETLINK)?,
                ])?];
                v.extend(ip_protocols()?);
                // Netlink for the routing family only (getaddrinfo).
                v.push(rule(vec![
                    eq(0, libc::AF_NETLINK)?,
                    ne(2, libc::NETLINK_ROUTE)?,
                ])?);
                v
            }
        };
        rules.insert(libc::SYS_socket, socket_rules);
        let Ok(arch) = std::env::consts::ARCH.try_into() else {
            return Ok(false);
        };
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(err)?;
        let program: seccompiler::BpfProgram = filter.try_into().map_err(err)?;
        seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("seccomp: {e}"))?;
        Ok(true)
    }
}

/// The fixed part of a Maildir template: the directory above its first
/// `%` (`/var/mail/%to_domain%/%to_user%` → `/var/mail`). None unless it
/// is absolute, free of `..`, and not `/`.
pub fn maildir_root(template: &str) -> Option<PathBuf> {
    let fixed = &template[..template.find('%').unwrap_or(template.len())];
    let p = Path::new(fixed);
    let dir = if fixed.ends_with('/') { p } else { p.parent()? };
    let plain = dir.components().all(|c| {
        !matches!(
            c,
            std::path::Component::ParentDir | std::path::Component::CurDir
        )
    });
    (dir.is_absolute() && plain && dir != Path::new("/")).then(|| dir.to_path_buf())
}

/// [`maildir_root`] of the config's `maildir`, if any.
pub fn maildir_root_of(cfg: &Config) -> Option<PathBuf> {
    cfg.tambo.maildir.as_deref().and_then(maildir_root)
}

/// The directories that links under `certs/<name>/` point into.
fn link_targets(certs: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(names) = std::fs::read_dir(certs) else {
        return out;
    };
    for name in names.flatten() {
        let Ok(files) = std::fs::read_dir(name.path()) else {
            continue;
        };
        for f in files.flatten() {
            let is_link = f.file_type().is_ok_and(|t| t.is_symlink());
            if let (true, Ok(target)) = (is_link, std::fs::canonicalize(f.path()))
                && let Some(dir) = target.parent()
                && !out.iter().any(|d: &PathBuf| d == dir)
            {
                out.push(dir.to_path_buf());
            }
        }
    }
    out
}

/// Locks this process down for `role` and logs once what was enforced.
/// Err: the rules could not be applied (the daemon must not serve).
pub fn lock_down(role: Role, cfg: &Config) -> Result<(), String> {
    let Some(sandbox) = Sandbox::for_role(role, cfg) else {
        return Ok(());
    };
    sandbox.check_reach(cfg)?;
    let report = sandbox.apply()?;
    if role == Role::Deliverd
        && sandbox.files
        && cfg.tambo.maildir.is_none()
        && cfg.tambo.lmtp_address.is_none()
    {
        tracing::warn!(
            "deliverd: the MDA ({}) may write only beneath /tmp and [tambo] deliverd_paths: list its mailboxes there",
            cfg.mail_delivery_agent_bin
        );
    }
    if !sandbox.files {
        tracing::warn!(
            "{}: its file access is not restricted: local mail goes through an MDA that may write anywhere; list where in [tambo] deliverd_paths to restrict it",
            role.name()
        );
    }
    if report.landlock.starts_with("not available") {
        tracing::warn!(
            "{}: Landlock is not available on this kernel: it keeps the file access of its user; seccomp {}",
            role.name(),
            if report.seccomp { "on" } else { "off" }
        );
    } else {
        tracing::info!(
            "{}: locked down (Landlock {}, seccomp {})",
            role.name(),
            report.landlock,
            if report.seccomp {
                "on"
            } else {
                "off: this architecture has no filter"
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::maildir_root;
    use std::path::PathBuf;

    #[test]
    fn the_maildir_root_is_the_fixed_directory_or_nothing() {
        let r = |t: &str| maildir_root(t);
        assert_eq!(
            r("/var/mail/%to_domain%/%to_user%"),
            Some(PathBuf::from("/var/mail"))
        );
        assert_eq!(r("/srv/mail/u-%to_user%"), Some(PathBuf::from("/srv/mail")));
        assert_eq!(r("/srv/mail/"), Some(PathBuf::from("/srv/mail")));
        for bad in [
            "%to_user%",
            "mail/%to_user%",
            "/%to_domain%/%to_user%",
            "/var/../%to_user%",
            "/x%y",
        ] {
            assert_eq!(r(bad), None, "{bad}");
        }
    }
}
