//! What the daemons inherit from the supervisor: the runtime directory
//! (locked, so two supervisors never share one), the three IPC sockets and
//! the TCP listeners. All are created once and held for the supervisor's
//! whole life, so a restarting daemon gets the very same sockets back and
//! connections made meanwhile wait in the listen backlog instead of being
//! refused.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};

use tambo_common::config::{Config, ListenAddr};
use tambo_common::lockfile::LockFile;
use tambo_common::sockets::{self, Bound, IpcSocket};
use tambo_proto::activation::Inherited;
use tambo_proto::identity::Identities;

use super::{Daemon, SetupError};

/// The lock file that makes a runtime directory one supervisor's own.
pub const LOCK_FILE: &str = "tambo.lock";

/// The name monitord takes its HTTP listener under.
pub const MONITORING: &str = "monitoring";

/// Every socket the supervisor hands out.
#[derive(Debug)]
pub struct Sockets {
    submit: Bound,
    deliver: Bound,
    local: Bound,
    monitor: Bound,
    /// Each SMTP listener with its activation name (`smtp`, `submission`,
    /// `submission_tls`).
    smtp: Vec<(&'static str, TcpListener)>,
    monitoring: Option<TcpListener>,
    _runtime_lock: LockFile,
}

impl Sockets {
    /// Creates the runtime directory, takes its lock, binds every TCP
    /// listener of the config (or takes the ones systemd passed for
    /// `"systemd"`), then the IPC sockets. The first failure is returned,
    /// naming the key or path at fault.
    pub fn open(
        cfg: &Config,
        ids: &Identities,
        inherited: &mut Inherited,
    ) -> Result<Self, SetupError> {
        let dir = &cfg.tambo.runtime_dir;
        sockets::create_runtime_dir(dir, ids.is_development()).map_err(|e| {
            SetupError::RuntimeDir {
                path: dir.clone(),
                source: e,
            }
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let runtime_lock = LockFile::acquire(&lock_path).map_err(|e| SetupError::Locked {
            path: lock_path,
            source: e,
        })?;
        let file = cfg.file_path();
        let mut smtp = Vec::new();
        for m in cfg.smtp_modes() {
            let mut systemd = Some(inherited.take_named(m.fd_name));
            for addr in m.addrs {
                match addr {
                    ListenAddr::Systemd => match systemd.take() {
                        Some(fds) if !fds.is_empty() => {
                            smtp.extend(
                                fds.into_iter().map(|fd| (m.fd_name, TcpListener::from(fd))),
                            );
                        }
                        // REFERENCE §1.1: a mode with no socket only gets a
                        // warning (a unit may pass port 25 alone).
                        Some(_) => tracing::warn!(
                            "{}: key {}: \"systemd\" is listed, but no socket named \"{}\" was passed to tambo (FileDescriptorName={}): that listener is off",
                            file.display(),
                            m.key,
                            m.fd_name,
                            m.fd_name
                        ),
                        // Listed twice: the sockets were taken the first time.
                        None => {}
                    },
                    ListenAddr::Addr(a) => smtp.push((m.fd_name, listen(&file, m.key, *a)?)),
                }
            }
        }
        if smtp.is_empty() {
            return Err(SetupError::NoListener { file });
        }
        let monitoring = match cfg.monitoring_address {
            Some(a) => Some(listen(&file, "monitoring_address", a)?),
            None => None,
        };
        let leftover = inherited.leftover();
        if !leftover.is_empty() {
            tracing::warn!(
                "ignoring sockets passed by systemd that tambo does not use: {}",
                leftover.join(", ")
            );
        }
        let ipc = |which: IpcSocket| -> Result<Bound, SetupError> {
            let path = which.path(cfg);
            sockets::bind(&path, which.access(ids))
                .map_err(|source| SetupError::Socket { path, source })
        };
        Ok(Sockets {
            submit: ipc(IpcSocket::Submit)?,
            deliver: ipc(IpcSocket::Deliver)?,
            local: ipc(IpcSocket::Local)?,
            monitor: ipc(IpcSocket::Monitor)?,
            smtp,
            monitoring,
            _runtime_lock: runtime_lock,
        })
    }

    /// Fresh descriptors for `daemon`'s sockets, in the order they go to
    /// fds 3…, each with its `LISTEN_FDNAMES` name. Duplicates, so the
    /// supervisor keeps its own copies for the next start.
    pub fn for_daemon(&self, daemon: Daemon) -> io::Result<Vec<(&'static str, OwnedFd)>> {
        let dup = |name: &'static str, fd: &dyn AsFd| -> io::Result<(&'static str, OwnedFd)> {
            Ok((name, fd.as_fd().try_clone_to_owned()?))
        };
        match daemon {
            Daemon::Smtpd => self.smtp.iter().map(|(name, l)| dup(name, l)).collect(),
            Daemon::Queued => Ok(vec![
                dup(IpcSocket::Submit.name(), &self.submit.listener)?,
                dup(IpcSocket::Deliver.name(), &self.deliver.listener)?,
                dup(IpcSocket::Local.name(), &self.local.listener)?,
            ]),
            Daemon::Deliverd => Ok(Vec::new()),
            Daemon::Monitord => {
                let mut v = vec![dup(IpcSocket::Monitor.name(), &self.monitor.listener)?];
                if let Some(l) = &self.monitoring {
                    v.push(dup(MONITORING, l)?);
                }
                Ok(v)
            }
        }
    }

    /// The addresses the SMTP listeners are bound to (port 0 resolved),
    /// each with its mode's name (`smtp`, `submission`, `submission_tls`).
    pub fn smtp_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        self.smtp
            .iter()
            .filter_map(|(name, l)| Some((*name, l.local_addr().ok()?)))
            .collect()
    }

    /// The address of the monitoring HTTP listener, if there is one.
    pub fn monitoring_addr(&self) -> Option<SocketAddr> {
        self.monitoring.as_ref().and_then(|l| l.local_addr().ok())
    }
}

fn listen(
    file: &std::path::Path,
    key: &'static str,
    addr: SocketAddr,
) -> Result<TcpListener, SetupError> {
    tambo_common::sockets::listen_tcp(addr).map_err(|source| SetupError::Listen {
        file: file.to_path_buf(),
        key,
        addr,
        source,
    })
}

/// The environment that tells a child which descriptors it got: the
/// systemd variables, without `LISTEN_PID` (a `Command` cannot know the
/// child's pid; the daemon checks its parent instead).
pub fn listen_env(fds: &[(&'static str, OwnedFd)]) -> Option<(String, String)> {
    if fds.is_empty() {
        return None;
    }
    let names: Vec<&str> = fds.iter().map(|(n, _)| *n).collect();
    Some((fds.len().to_string(), names.join(":")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_env_names_each_descriptor_in_order() {
        assert_eq!(listen_env(&[]), None);
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let fds = vec![("submit", OwnedFd::from(a)), ("deliver", OwnedFd::from(b))];
        assert_eq!(
            listen_env(&fds),
            Some(("2".to_string(), "submit:deliver".to_string()))
        );
    }
}
