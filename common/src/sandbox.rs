//! What a role may still do once it serves (DESIGN §1): each daemon locks
//! itself down after dropping root and before its runtime starts threads
//! (a Landlock domain only covers the calling thread and its later
//! children until Landlock ABI 8).
//!
//! - **Landlock**, files: smtpd and monitord open nothing but the time
//!   zone; queued reads its config directory and reads and writes its data
//!   directory, nothing else; none of the three may execute a file.
//!   Landlock, TCP: smtpd may connect only to DNS servers' port; queued and
//!   monitord may neither connect nor bind.
//! - **seccomp**: smtpd, queued and monitord cannot `execve`; queued and
//!   monitord cannot create an internet socket at all (Landlock does not
//!   cover UDP). Their listening sockets were made before, and `accept`
//!   stays allowed.
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
    RulesetCreatedAttr, RulesetStatus,
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
    /// TCP ports it may connect to; with `tcp` false, none at all.
    pub connect_ports: Vec<u16>,
    /// Whether TCP is restricted by Landlock at all.
    pub tcp: bool,
    /// No `execve`.
    pub no_exec: bool,
    /// No AF_INET/AF_INET6 socket may be created.
    pub no_inet: bool,
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
                    tcp: true,
                    no_exec: true,
                    no_inet: false,
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
                    write: vec![cfg.data_dir.clone()],
                    connect_ports: Vec::new(),
                    tcp: true,
                    no_exec: true,
                    no_inet: true,
                })
            }
            Role::Monitord => Some(Sandbox {
                role,
                read: Vec::new(),
                write: Vec::new(),
                connect_ports: Vec::new(),
                tcp: true,
                no_exec: true,
                no_inet: true,
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
        let write = all & !AccessFs::Execute;
        let mut ruleset = Ruleset::default().handle_access(all).map_err(err)?;
        if self.tcp {
            ruleset = ruleset
                .handle_access(AccessNet::from_all(ABI_WANTED))
                .map_err(err)?;
        }
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
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        if self.no_exec {
            // An empty rule list matches every call.
            rules.insert(libc::SYS_execve, Vec::new());
            rules.insert(libc::SYS_execveat, Vec::new());
        }
        if self.no_inet {
            let family = |f: libc::c_int| -> Result<SeccompRule, String> {
                let c =
                    SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, f as u64)
                        .map_err(err)?;
                SeccompRule::new(vec![c]).map_err(err)
            };
            rules.insert(
                libc::SYS_socket,
                vec![family(libc::AF_INET)?, family(libc::AF_INET6)?],
            );
        }
        if rules.is_empty() {
            return Ok(false);
        }
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|e: seccompiler::BackendError| format!("seccomp: {e}"))?;
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
            if report.seccomp { "on" } else { "off" }
        );
    }
    Ok(())
}
