//! The process groups deliverd started. Every MDA or pipe command runs as
//! the leader of its own group, so whatever it leaves running in the
//! background can be killed with it: on a timeout, when its delivery is
//! abandoned, and when deliverd stops.
//!
//! A program that calls setsid() or setpgid() leaves its group and escapes
//! this; only a cgroup (a systemd unit) would hold it.
//!
//! A group id is a pid, and the kernel hands it out again once the group
//! is empty; killing a listed id then reaches a stranger. So a group is
//! forgotten as soon as it is found empty (whenever any delivery ends),
//! and before a late kill the id is checked: if a process holds the
//! leader's pid but not its start time, the id was given out again and is
//! left alone. What remains: the id given out again to a new group whose
//! leader already exited too, between two checks. That takes the pid
//! space to wrap around while a group deliverd started sits empty, and
//! closing it for good would take a cgroup.

use std::collections::BTreeMap;
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
    /// Group id → its leader's start time (`/proc/<pid>/stat` field 22),
    /// when it could be read.
    live: BTreeMap<i32, Option<u64>>,
    /// Set once deliverd stops: a group started after that is killed at
    /// once rather than left behind.
    closing: bool,
}

impl Registry {
    pub const fn new() -> Self {
        Registry(Mutex::new(Inner {
            live: BTreeMap::new(),
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
        // Read while the leader is unreaped, so the pid is still its own.
        self.insert(pgid, start_time(pgid))
    }

    fn insert(&'static self, pgid: i32, started: Option<u64>) -> Group {
        let mut inner = self.lock();
        inner.prune();
        if inner.closing {
            kill(pgid);
        }
        inner.live.insert(pgid, started);
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
        inner.prune();
        let mut killed = 0;
        for (&pgid, &started) in &inner.live {
            if let (Some(ours), Some(now)) = (started, start_time(pgid))
                && ours != now
            {
                // Our group ended and its id went to someone else.
                tracing::debug!("process group {pgid} is no longer deliverd's: not killed");
                continue;
            }
            kill(pgid);
            killed += 1;
        }
        killed
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
        // This group, if it is empty, and any other that emptied since
        // (a background process that ended): the sooner an empty group is
        // forgotten, the smaller the chance its id is given out again
        // while listed.
        self.registry.lock().prune();
    }
}

impl Inner {
    /// Forgets every group with no member left.
    fn prune(&mut self) {
        self.live.retain(|&g, _| !is_gone(g));
    }
}

/// When the process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`); `None` if there is no such process. With the pid,
/// it names one process for good: a pid given out again comes with a later
/// start time.
fn start_time(pid: i32) -> Option<u64> {
    start_time_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn start_time_in(stat: &str) -> Option<u64> {
    // The command name, in parentheses, may hold anything: count the
    // fields from its last closing parenthesis, where field 3 starts.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
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

    #[tokio::test]
    async fn an_emptied_group_is_forgotten_when_any_delivery_ends() {
        static REG: Registry = Registry::new();
        let mut leader = spawn("exec sleep 60");
        let pgid = leader.id() as i32;
        // A second member, which the test can reap itself (an orphan of
        // the leader would go to an init that may never reap it, and a
        // zombie still holds the group).
        let mut member = Command::new("/bin/sh")
            .args(["-c", "exec sleep 60"])
            .process_group(pgid)
            .spawn()
            .unwrap();
        let mut group = REG.register(Some(leader.id()));
        leader.kill().unwrap();
        leader.wait().unwrap();
        group.leader_reaped();
        drop(group);
        assert_eq!(REG.len(), 1, "the member keeps the group listed");
        // Another delivery starts, the member ends, the delivery ends.
        let mut other = spawn("exit 0");
        let mut second = REG.register(Some(other.id()));
        member.kill().unwrap();
        member.wait().unwrap();
        assert!(other.wait().unwrap().success());
        second.leader_reaped();
        drop(second);
        assert_eq!(REG.len(), 0, "both empty groups are forgotten at once");
    }

    #[test]
    fn a_group_id_given_out_again_is_not_killed() {
        static REG: Registry = Registry::new();
        // A stranger leading a group whose id deliverd once listed: the
        // start time recorded then was another process's.
        let mut stranger = spawn("exec sleep 60");
        let pid = stranger.id() as i32;
        let then = start_time(pid).unwrap().checked_sub(1).unwrap();
        let mut group = REG.insert(pid, Some(then));
        group.leader_reaped();
        drop(group);
        assert_eq!(REG.len(), 1);
        assert_eq!(REG.kill_all(), 0);
        assert_eq!(stranger.try_wait().unwrap(), None, "the stranger lives");
        stranger.kill().unwrap();
        stranger.wait().unwrap();

        // A live leader, its start time recorded at registration: killed.
        static MINE: Registry = Registry::new();
        let mut leader = spawn("exec sleep 60");
        let group = MINE.register(Some(leader.id()));
        assert_eq!(MINE.kill_all(), 1);
        assert_eq!(leader.wait().unwrap().signal(), Some(libc_sigkill()));
        drop(group);
    }

    #[test]
    fn start_times_are_read_past_odd_command_names() {
        let fields: Vec<String> = (3..=22).map(|n| n.to_string()).collect();
        let stat = format!("4242 (a) b) (c 9) {}\n", fields.join(" "));
        assert_eq!(start_time_in(&stat), Some(22));
        assert_eq!(start_time_in("4242 (sh) S 1 2"), None);
        assert!(start_time(std::process::id() as i32).is_some());
        assert_eq!(start_time(i32::MAX), None);
    }

    fn libc_sigkill() -> i32 {
        Signal::SIGKILL as i32
    }
}
