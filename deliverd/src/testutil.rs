//! Helpers for tests that watch processes come and go.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// How long a test waits for a condition before failing.
pub const WAIT: Duration = Duration::from_secs(20);

/// Whether `pid` has stopped running: no such process, or a zombie. A
/// killed orphan stays a zombie until init reaps it, and some container
/// inits never do; a zombie has run its last instruction all the same.
pub fn is_dead(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Polls `cond` every 10 ms until it holds; panics after [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for a file holding a pid (written then renamed into place by the
/// script under test) and returns the pid.
pub async fn read_pid(path: &Path) -> i32 {
    let mut pid = 0;
    wait_until(
        &format!("a pid in {}", path.display()),
        || match std::fs::read_to_string(path).map(|s| s.trim().parse()) {
            Ok(Ok(p)) => {
                pid = p;
                true
            }
            _ => false,
        },
    )
    .await;
    pid
}

/// Waits until `pid` is dead (see [`is_dead`]).
pub async fn wait_dead(what: &str, pid: i32) {
    wait_until(&format!("{what} (pid {pid}) to die"), || is_dead(pid)).await;
}
