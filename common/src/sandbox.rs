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
//! deliverd runs programs and writes Maildirs wherever the template says:
//! it is not locked down here (yet); file permissions keep it out of the
//! queue and the keys.
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
}

/// What was enforced, for the one line the daemon logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub landlock: &'static str,
    pub seccomp: bool,
}

impl Sandbox {
    /// The rules for `role` (None: deliverd, which is not locked down).
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
                    connect_ports: ports,
                    no_exec: true,
                    sockets: Sockets::UnixTcpUdp,
                })
            }
            Role::Queued => {
                let mut read = zone;
                read.push(cfg.config_dir.clone());
                // Certificates are often links into /etc/letsencrypt: the
                // directories they point to are read too.
                read.extend(link_targets(&cfg.config_dir.join("certs")));
                Some(Sandbox {
                    role,
                    read,
                    write: vec![cfg.queue_dir(), cfg.domaininfo_dir()],
                    connect_ports: Vec::new(),
                    no_exec: true,
                    sockets: Sockets::Unix,
                })
            }
            Role::Monitord => Some(Sandbox {
                role,
                read: zone,
                write: Vec::new(),
                connect_ports: Vec::new(),
                no_exec: true,
                sockets: Sockets::Unix,
            }),
            _ => None,
        }
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
        let mut ruleset = Ruleset::default()
            .handle_access(all)
            .map_err(err)?
            // Abstract Unix sockets (outside the file system) and signals
            // to processes outside its domain.
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(err)?;
        ruleset = ruleset
            .handle_access(AccessNet::from_all(ABI_WANTED))
            .map_err(err)?;
        let mut created = ruleset.create().map_err(err)?;
        for (paths, access) in [(&self.read, read), (&self.write, write)] {
            for p in paths {
                // A path that does not exist (no zoneinfo here) grants
                // nothing.
                let Ok(fd) = PathFd::new(p) else { continue };
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
        let socket_rules = match self.sockets {
            // Refused: any family but AF_UNIX.
            Sockets::Unix => vec![rule(vec![ne(0, libc::AF_UNIX)?])?],
            Sockets::UnixTcpUdp => {
                let mut v = vec![rule(vec![
                    ne(0, libc::AF_UNIX)?,
                    ne(0, libc::AF_INET)?,
                    ne(0, libc::AF_INET6)?,
                ])?];
                for family in [libc::AF_INET, libc::AF_INET6] {
                    v.push(rule(vec![
                        eq(0, family)?,
                        ne(2, 0)?,
                        ne(2, libc::IPPROTO_TCP)?,
                        ne(2, libc::IPPROTO_UDP)?,
                    ])?);
                }
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
    let report = sandbox.apply()?;
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
