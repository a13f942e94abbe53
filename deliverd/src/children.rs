//! The process groups deliverd started. Every MDA or pipe command runs as
//! the leader of its own group, so whatever it leaves running in the
//! background can be killed with it: on a timeout, when its delivery is
//! abandoned, and when deliverd stops.
//!
//! A program that calls setsid() or setpgid() leaves its group and escapes
//! this; only a cgroup (a systemd unit) would hold it.

use std::collections::BTreeSet;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Every group deliverd started that may still have members.
pub static LIVE: Registry = Registry::new();

/// A set of process groups. A group stays listed after its leader exits as
/// long as some member lives: a background process it left behind still
/// dies with deliverd.
pub struct Registry(Mutex<Inner>);

struct Inner {
    live: BTreeSet<i32>,
    /// Set once deliverd stops: a group started after that is killed at
    /// once rather than left behind.
    closing: bool,
}

impl Registry {
    pub const fn new() -> Self {
        Registry(Mutex::new(Inner {
            live: BTreeSet::new(),
            closing: false,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; a poisoned set is still a
        // valid set.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking the group a freshly spawned leader with pid `pid`
    /// heads (spawned with `process_group(0)`, so its pgid is its pid).
    pub fn register(&'static self, pid: Option<u32>) -> Group {
        let Some(pgid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 0) else {
            // Already reaped, or not a pid the kernel hands out: nothing
            // to track.
            return Group {
                registry: self,
                pgid: None,
                reaped: true,
            };
        };
        let mut inner = self.lock();
        // Dead groups are forgotten at every new one: a stale id may be
        // given by the kernel to a group deliverd did not start, and
        // kill_all must not reach it.
        inner.live.retain(|&g| !is_gone(g));
        if inner.closing {
            kill(pgid);
        }
        inner.live.insert(pgid);
        Group {
            registry: self,
            pgid: Some(pgid),
            reaped: false,
        }
    }

    /// Kills every group still alive and every group started from now on.
    /// Called when deliverd stops, so no MDA outlives it and delivers a
    /// message queued will hand out again. Returns how many it signalled.
    pub fn kill_all(&self) -> usize {
        let mut inner = self.lock();
        inner.closing = true;
        inner.live.retain(|&g| !is_gone(g));
        for &pgid in &inner.live {
            kill(pgid);
        }
        inner.live.len()
    }

    /// How many groups are listed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }
}

/// One child's process group, from its spawn until its delivery is over.
/// Dropped before the leader was reaped (a timeout, an abandoned
/// delivery), it kills the whole group.
pub struct Group {
    registry: &'static Registry,
    pgid: Option<i32>,
    reaped: bool,
}

impl Group {
    /// Kills every process in the group.
    pub fn kill(&self) {
        if let Some(pgid) = self.pgid {
            kill(pgid);
        }
    }

    /// Records that the leader was reaped: the group is no longer killed
    /// on drop, only forgotten if nothing else is left in it.
    pub fn leader_reaped(&mut self) {
        self.reaped = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let Some(pgid) = self.pgid else { return };
        if !self.reaped {
            kill(pgid);
        }
        let mut inner = self.registry.lock();
        if is_gone(pgid) {
            inner.live.remove(&pgid);
        }
    }
}

/// Whether the group has no member left. EPERM (a member changed its
/// credentials) means it still exists.
fn is_gone(pgid: i32) -> bool {
    killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH)
}

fn kill(pgid: i32) {
    match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!("cannot kill process group {pgid}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{read_pid, wait_dead};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::Command;

    fn spawn(script: &str) -> std::process::Child {
        Command::new("/bin/sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .unwrap()
    }

    #[tokio::test]
    async fn a_group_outlives_its_leader_until_killed() {
        static REG: Registry = Registry::new();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bg");
        let mut leader = spawn(&format!(
            "sleep 60 & echo $! > {f}.tmp; mv {f}.tmp {f}; exit 0",
            f = f.display()
        ));
        let mut group = REG.register(Some(leader.id()));
        assert!(leader.wait().unwrap().success());
        group.leader_reaped();
        drop(group);
        let bg = read_pid(&f).await;
        assert_eq!(REG.len(), 1, "the background sleep keeps the group listed");
        assert_eq!(REG.kill_all(), 1);
        wait_dead("the background sleep", bg).await;

        // Once stopping, a new group is killed as soon as it is known.
        let mut late = spawn("exec sleep 60");
        let _group = REG.register(Some(late.id()));
        assert_eq!(late.wait().unwrap().signal(), Some(libc_sigkill()));
    }

    #[tokio::test]
    async fn dropping_an_unreaped_group_kills_it() {
        static REG: Registry = Registry::new();
        let mut child = spawn("exec sleep 60");
        drop(REG.register(Some(child.id())));
        assert_eq!(child.wait().unwrap().signal(), Some(libc_sigkill()));
        // Reaped and alone in its group: gone, and forgotten at the next
        // registration.
        let mut other = spawn("exit 0");
        let mut group = REG.register(Some(other.id()));
        assert!(other.wait().unwrap().success());
        group.leader_reaped();
        drop(group);
        assert_eq!(REG.len(), 0);
    }

    fn libc_sigkill() -> i32 {
        Signal::SIGKILL as i32
    }
}
