//! The reaper: the one place that collects exited processes and routes
//! what the daemons say (sd_notify) and how they end (wait status) to the
//! task watching each one.
//!
//! The supervisor is a child subreaper, so MDA and pipe processes orphaned
//! by deliverd become its children too; they must be reaped with
//! `waitpid(-1)`, which would also reap the daemons. So nothing else waits
//! for a child: daemons are spawned through [`Registry::spawn`], and the
//! exit status of each pid goes to whoever registered it; an unknown pid is
//! an orphan, reaped and forgotten.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::Signal;
use tokio::sync::mpsc;

use super::notify::{Message, NotifySocket, Received};

/// What happened to a daemon process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// It sent `READY=1`.
    Ready,
    /// It sent `STATUS=…`.
    Status(String),
    /// It exited; the process is reaped.
    Exited(ExitHow),
}

/// Where a daemon's watcher gets the events of its processes, each tagged
/// with the pid it is about (a late event from a previous process can
/// then be told apart).
pub type Events = mpsc::UnboundedSender<(i32, Event)>;

/// The daemon processes alive now, by pid.
#[derive(Debug, Default)]
pub struct Registry {
    children: Mutex<HashMap<i32, Entry>>,
}

#[derive(Debug)]
struct Entry {
    name: &'static str,
    events: Events,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Entry>> {
        // The map stays consistent even if a holder panicked: every change
        // is a single insert or remove.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` and registers its pid under one lock, which the reaper
    /// also holds while it calls waitpid: a child that exits at once is
    /// found registered when its status is routed, and no waitpid of ours
    /// can steal the status `spawn` itself waits for when exec fails.
    pub fn spawn(&self, cmd: &mut Command, name: &'static str, events: &Events) -> io::Result<i32> {
        let mut children = self.lock();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
        children.insert(
            pid,
            Entry {
                name,
                events: events.clone(),
            },
        );
        Ok(pid)
    }

    /// Routes one notification to the daemon that sent it; anything from
    /// another process is dropped.
    pub fn deliver(&self, received: Received) {
        let children = self.lock();
        let Some(entry) = children.get(&received.pid) else {
            tracing::debug!(
                "notification from pid {}, which is not a tambo daemon: ignored",
                received.pid
            );
            return;
        };
        for m in received.messages {
            let event = match m {
                Message::Ready => Event::Ready,
                Message::Status(s) => Event::Status(s),
            };
            let _ = entry.events.send((received.pid, event));
        }
    }

    /// Kills every child that is not a daemon, each with its process group
    /// (see [`super::orphans`]); returns how many were still running.
    /// Holds the lock [`Registry::reap`] takes, so no child is reaped
    /// meanwhile and every pid and group id found stays the one it was, and
    /// [`Registry::spawn`] takes, so a daemon being started is already
    /// listed as one.
    pub fn kill_orphans(&self, session: i32) -> usize {
        let children = self.lock();
        let daemons: Vec<i32> = children.keys().copied().collect();
        super::orphans::kill_session_but(session, &daemons)
    }

    /// Reaps every process that has exited, without blocking.
    pub fn reap(&self) {
        let mut children = self.lock();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    let Some(pid) = status.pid().map(|p| p.as_raw()) else {
                        continue;
                    };
                    let how = ExitHow(status);
                    match children.remove(&pid) {
                        Some(entry) => {
                            tracing::debug!("reaped {} (pid {pid}): {how}", entry.name);
                            let _ = entry.events.send((pid, Event::Exited(how)));
                        }
                        None => tracing::debug!("reaped orphan pid {pid}: {how}"),
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    return;
                }
            }
        }
    }
}

/// Reaps on every SIGCHLD and routes notifications, until the SIGCHLD
/// stream ends. Before reaping, it reads every pending notification: a
/// daemon's `STATUS=` reason is queued before it exits, so its watcher
/// always has the reason when the exit arrives.
pub async fn run(registry: std::sync::Arc<Registry>, mut sigchld: Signal, notify: NotifySocket) {
    // A child that died before the SIGCHLD handler existed sent no signal
    // we can see.
    registry.reap();
    loop {
        tokio::select! {
            got = sigchld.recv() => {
                if got.is_none() {
                    return;
                }
                for r in notify.drain() {
                    registry.deliver(r);
                }
                registry.reap();
            }
            ready = notify.readable() => match ready {
                Ok(()) => {
                    for r in notify.drain() {
                        registry.deliver(r);
                    }
                }
                Err(e) => {
                    tracing::warn!("{}: {e}", notify.path().display());
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// How a process ended, written as `std::process::ExitStatus` writes it
/// (`exit status: 1`, `signal: 9 (SIGKILL)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitHow(pub WaitStatus);

impl fmt::Display for ExitHow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            WaitStatus::Exited(_, code) => write!(f, "exit status: {code}"),
            WaitStatus::Signaled(_, sig, core) => {
                write!(f, "signal: {} ({})", sig as i32, sig.as_str())?;
                if core {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
            other => write!(f, "{other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal as Sig;
    use nix::unistd::Pid;

    #[test]
    fn exit_statuses_read_like_std() {
        let p = Pid::from_raw(7);
        assert_eq!(
            ExitHow(WaitStatus::Exited(p, 1)).to_string(),
            "exit status: 1"
        );
        assert_eq!(
            ExitHow(WaitStatus::Signaled(p, Sig::SIGKILL, false)).to_string(),
            "signal: 9 (SIGKILL)"
        );
        assert_eq!(
            ExitHow(WaitStatus::Signaled(p, Sig::SIGSEGV, true)).to_string(),
            "signal: 11 (SIGSEGV) (core dumped)"
        );
    }

    #[test]
    fn a_child_that_exits_at_once_is_reaped_and_routed() {
        // The only test in this binary that starts processes: reap() waits
        // for any child of the test process.
        let registry = Registry::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pid = registry
            .spawn(Command::new("/bin/sh").args(["-c", "exit 3"]), "sh", &tx)
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let got = loop {
            registry.reap();
            if let Ok(got) = rx.try_recv() {
                break got;
            }
            assert!(std::time::Instant::now() < deadline, "never reaped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(
            got,
            (
                pid,
                Event::Exited(ExitHow(WaitStatus::Exited(Pid::from_raw(pid), 3)))
            )
        );
        assert!(registry.lock().is_empty());
    }

    #[test]
    fn routes_notifications_only_from_registered_pids() {
        let registry = Registry::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        registry.lock().insert(
            42,
            Entry {
                name: "tambo-queued",
                events: tx,
            },
        );
        registry.deliver(Received {
            pid: 43,
            messages: vec![Message::Ready],
        });
        assert!(rx.try_recv().is_err(), "a stranger's READY is ignored");
        registry.deliver(Received {
            pid: 42,
            messages: vec![Message::Status("x".into()), Message::Ready],
        });
        assert_eq!(rx.try_recv().unwrap(), (42, Event::Status("x".into())));
        assert_eq!(rx.try_recv().unwrap(), (42, Event::Ready));
    }
}
