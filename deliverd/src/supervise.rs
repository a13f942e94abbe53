//! Running one program deliverd starts (an MDA, a pipe command, a hook)
//! to its end: the leader of a process group of its own, listed in
//! [`children::LIVE`], its stdin fed and its output read while it runs, the
//! whole group killed on a timeout.
//!
//! deliverd waits for the program's exit, not for the end of its output,
//! which anything it left running may hold open forever; and it stops
//! feeding stdin at the exit, so a program that never reads its input
//! cannot hold the run either.

use std::future::Future;
use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use crate::children;

/// How long output is still read once the program has exited. What is in
/// the pipe by then takes microseconds to read; a pipe still open after
/// this is held by something the program left in the background (`cmd &`
/// inheriting stdout), and waiting for its end would hold the delivery
/// hostage to that process.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// How long a program killed on a timeout gets to be reaped. SIGKILL
/// takes effect at once unless it cannot reach the program: it runs setuid
/// under another user (EPERM), it left its process group, or it is stuck
/// in the kernel (D state). Waiting longer for those would hold the
/// delivery until queued's job deadline, an hour away.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// How much of the output past the kept part is remembered, so the last
/// line of a chatty program is still known.
pub const TAIL: usize = 1024;

/// Starts `cmd` as the leader of a new process group and lists the group,
/// so it dies with a timeout, an abandoned run, or deliverd's stop.
pub fn spawn(cmd: &mut Command) -> io::Result<(Child, children::Group)> {
    cmd.process_group(0).kill_on_drop(true);
    let child = cmd.spawn()?;
    let group = children::LIVE.register(child.id());
    Ok((child, group))
}

/// What one output stream said, as far as it was kept.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The first bytes, up to the limit the caller set.
    pub head: Vec<u8>,
    /// The program wrote more than `head` holds.
    pub overflow: bool,
    /// With `overflow`: the last [`TAIL`] bytes written past `head`.
    pub tail: Vec<u8>,
}

impl Captured {
    fn push(&mut self, data: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.head.len());
        let (kept, rest) = data.split_at(room.min(data.len()));
        self.head.extend_from_slice(kept);
        if !rest.is_empty() {
            self.overflow = true;
            self.tail.extend_from_slice(rest);
            if self.tail.len() > TAIL {
                self.tail.drain(..self.tail.len() - TAIL);
            }
        }
    }
}

/// How much of each stream to keep.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub stdout: usize,
    pub stderr: usize,
}

pub enum Waited {
    /// The exit status, and stdout and stderr as far as they were read.
    Exited(ExitStatus, Captured, Captured),
    /// Timed out, killed and reaped; what stdout said until then.
    TimedOut(Captured),
    /// Timed out, and still not reaped [`KILL_WAIT`] after the kill.
    Unstoppable,
    Failed(io::Error),
}

/// How the wait for a killed program ended.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterKill {
    Reaped,
    /// waitpid failed: nothing is known of the program.
    WaitFailed,
    /// Not reaped within the limit.
    StillThere,
}

/// Waits at most `limit` for `exit`, the exit of a program just killed.
pub async fn after_kill(
    exit: impl Future<Output = io::Result<ExitStatus>>,
    limit: Duration,
) -> AfterKill {
    match tokio::time::timeout(limit, exit).await {
        Ok(Ok(_)) => AfterKill::Reaped,
        Ok(Err(_)) => AfterKill::WaitFailed,
        Err(_) => AfterKill::StillThere,
    }
}

/// Waits for the child's exit, running `feed` (which writes its stdin)
/// and reading its output meanwhile (a chatty program would otherwise
/// block on a full pipe), then for at most [`OUTPUT_GRACE`] more output.
/// `feed` is dropped at the exit, closing stdin. On a timeout the whole
/// group is killed.
pub async fn wait(
    child: &mut Child,
    group: &mut children::Group,
    timeout: Duration,
    limits: Limits,
    feed: impl Future<Output = ()>,
) -> Waited {
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let (mut o, mut e) = (Captured::default(), Captured::default());
    let exited = {
        let mut reading = std::pin::pin!(async {
            tokio::join!(
                read_capped(out, &mut o, limits.stdout),
                read_capped(err, &mut e, limits.stderr)
            )
        });
        let mut read_all = false;
        let waited = {
            let mut feed = std::pin::pin!(feed);
            let mut fed = false;
            let mut exit = std::pin::pin!(tokio::time::timeout(timeout, child.wait()));
            loop {
                tokio::select! {
                    r = &mut exit => break r,
                    _ = &mut reading, if !read_all => read_all = true,
                    _ = &mut feed, if !fed => fed = true,
                }
            }
        };
        // Err(None): timed out, killed and reaped.
        let exited = match waited {
            Ok(Ok(status)) => {
                group.leader_reaped();
                Ok(status)
            }
            // The group is killed when it is dropped, leader unreaped.
            Ok(Err(e)) => Err(Some(Waited::Failed(e))),
            Err(_) => {
                group.kill();
                match after_kill(child.wait(), KILL_WAIT).await {
                    AfterKill::Reaped => {
                        group.leader_reaped();
                        Err(None)
                    }
                    AfterKill::WaitFailed => Err(None),
                    // Left unreaped: the group stays registered while it
                    // has a member, so deliverd's stop tries to kill it
                    // again, and tokio reaps the leader whenever it exits.
                    AfterKill::StillThere => {
                        let pid = child
                            .id()
                            .map(|p| format!(" (pid {p})"))
                            .unwrap_or_default();
                        tracing::warn!(
                            "a timed-out program{pid} still runs {}s after SIGKILL; giving up on it",
                            KILL_WAIT.as_secs()
                        );
                        Err(Some(Waited::Unstoppable))
                    }
                }
            }
        };
        if !read_all {
            let _ = tokio::time::timeout(OUTPUT_GRACE, &mut reading).await;
        }
        exited
    };
    match exited {
        Ok(status) => Waited::Exited(status, o, e),
        Err(None) => Waited::TimedOut(o),
        Err(Some(w)) => w,
    }
}

/// Keeps the first `limit` bytes (and the last [`TAIL`] past them) and
/// drains the rest: a program blocked on a full pipe would otherwise never
/// exit. Bytes read stay in `cap` if this is abandoned half-way.
async fn read_capped<R: AsyncRead + Unpin>(src: Option<R>, cap: &mut Captured, limit: usize) {
    let Some(mut src) = src else { return };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => cap.push(&buf[..n], limit),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::WAIT;
    use std::time::Instant;

    #[test]
    fn output_past_the_limit_keeps_its_tail() {
        let mut c = Captured::default();
        c.push(b"abc", 4);
        assert_eq!((c.head.as_slice(), c.overflow), (&b"abc"[..], false));
        c.push(b"defg", 4);
        assert_eq!(c.head, b"abcd");
        assert!(c.overflow);
        assert_eq!(c.tail, b"efg");
        c.push(&vec![b'x'; TAIL], 4);
        assert_eq!(c.tail.len(), TAIL);
        assert!(c.tail.iter().all(|&b| b == b'x'));
    }

    #[tokio::test]
    async fn the_wait_after_a_kill_is_bounded() {
        // A program SIGKILL cannot reach (setuid, D state) never exits: a
        // wait that never ends stands in for it.
        let limit = Duration::from_millis(200);
        let start = Instant::now();
        assert_eq!(
            after_kill(std::future::pending(), limit).await,
            AfterKill::StillThere
        );
        assert!(start.elapsed() >= limit && start.elapsed() < WAIT);
        let exited = async { Ok(ExitStatus::default()) };
        assert_eq!(after_kill(exited, limit).await, AfterKill::Reaped);
        let failed = async { Err(io::Error::from(io::ErrorKind::Other)) };
        assert_eq!(after_kill(failed, limit).await, AfterKill::WaitFailed);
    }
}
