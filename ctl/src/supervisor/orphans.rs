//! What deliverd leaves running when it dies without stopping its
//! programs. deliverd kills every MDA and pipe process group when it stops,
//! but a SIGKILL or a crash skips that: the programs, reparented to the
//! supervisor (a child subreaper), would go on delivering a message that
//! queued hands the new deliverd again. So when deliverd exits, every
//! process the supervisor adopted is killed with its process group, before
//! the next deliverd starts.
//!
//! deliverd makes itself a session leader at startup, so every program it
//! runs, and whatever those leave behind, is in deliverd's session (its
//! session id is deliverd's pid), and only those are killed: the
//! supervisor may have other children (a wrapper script's sidecar, or
//! anything a container hands its PID 1), and those are not deliverd's.
//! Within the session, process groups are deliverd's too: setpgid() cannot
//! move a process into another session's group. A program that starts a
//! session of its own escapes, as it escapes deliverd's own group kill.

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// One line of `/proc/<pid>/stat`, the fields this needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    /// The session id (the pid of the session's leader).
    pub session: i32,
    /// Exited, not yet reaped.
    pub zombie: bool,
}

/// Reads `pid (comm) state ppid pgrp session …`. The command name may hold spaces
/// and parentheses: the fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    Some(Stat {
        pid,
        ppid,
        pgid,
        session,
        zombie: state == "Z",
    })
}

/// Every process whose parent is `parent`.
fn children_of(parent: i32) -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<i32>().is_ok())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
        .filter(|s| s.ppid == parent)
        .collect()
}

/// Which of `children` to kill, and which of their groups: every child in
/// deliverd's `session` that is not a daemon, and its group unless that is
/// the supervisor's own group (`own_pgid`) or a daemon's (neither can be
/// in deliverd's session, but a wrong group kill would take down the
/// supervisor or a daemon, so it is checked anyway). Ids 0 and 1 are never
/// groups to kill: killpg(0) means the caller's own group.
pub fn targets(
    children: &[Stat],
    daemons: &[i32],
    own_pgid: i32,
    session: i32,
) -> Vec<(i32, Option<i32>)> {
    children
        .iter()
        .filter(|c| c.session == session && session > 1 && !daemons.contains(&c.pid))
        .map(|c| {
            let spared = c.pgid == own_pgid || daemons.contains(&c.pgid) || c.pgid <= 1;
            (c.pid, (!spared).then_some(c.pgid))
        })
        .collect()
}

/// Kills every child of this process in `session` (deliverd's) not in
/// `daemons`, and its process group; returns how many were still running
/// (zombies have exited, but their groups may hold live processes, so
/// those are killed too). The caller must keep every child unreaped
/// meanwhile: then no pid or group id found here can be given to another
/// process before it is signalled.
pub fn kill_session_but(session: i32, daemons: &[i32]) -> usize {
    let me = nix::unistd::getpid().as_raw();
    let own_pgid = nix::unistd::getpgrp().as_raw();
    let children = children_of(me);
    let mut running = 0;
    for (pid, pgid) in targets(&children, daemons, own_pgid, session) {
        if let Some(g) = pgid {
            signal(
                killpg(Pid::from_raw(g), Signal::SIGKILL),
                "process group",
                g,
            );
        }
        signal(kill(Pid::from_raw(pid), Signal::SIGKILL), "process", pid);
        if children.iter().any(|c| c.pid == pid && !c.zombie) {
            running += 1;
        }
    }
    running
}

fn signal(result: nix::Result<()>, what: &str, id: i32) {
    match result {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!("cannot kill {what} {id} left by tambo-deliverd: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(pid: i32, ppid: i32, pgid: i32) -> Stat {
        Stat {
            pid,
            ppid,
            pgid,
            session: DELIVERD,
            zombie: false,
        }
    }

    const DELIVERD: i32 = 300;

    #[test]
    fn parses_stat_lines_whatever_the_command_name() {
        assert_eq!(
            parse_stat("812 (sh) S 1 812 300 0 -1 4194560 1\n"),
            Some(stat(812, 1, 812))
        );
        assert_eq!(
            parse_stat("9 (a) b (c) Z 7 5 5 0"),
            Some(Stat {
                pid: 9,
                ppid: 7,
                pgid: 5,
                session: 5,
                zombie: true
            })
        );
        assert_eq!(parse_stat("9 (sh) S"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn kills_every_adopted_process_and_its_group_never_a_daemon() {
        let (me, own_pgid) = (100, 50);
        let daemons = [200, 300];
        let children = [
            stat(200, me, 200),      // a daemon
            stat(300, me, 300),      // another
            stat(400, me, 400),      // an MDA, leading its group
            stat(500, me, 400),      // something it left, same group
            stat(600, me, own_pgid), // moved into the supervisor's group
            stat(700, me, 300),      // moved into a daemon's group
            Stat {
                session: 42, // not deliverd's: a sidecar of a wrapper script
                ..stat(800, me, 800)
            },
        ];
        assert_eq!(
            targets(&children, &daemons, own_pgid, DELIVERD),
            [(400, Some(400)), (500, Some(400)), (600, None), (700, None)]
        );
        // Without a session to go by, nothing is killed.
        assert!(targets(&children, &daemons, own_pgid, 0).is_empty());
    }
}
