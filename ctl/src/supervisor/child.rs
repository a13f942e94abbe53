//! One daemon's lifecycle: start it with its sockets, follow it to
//! readiness, pass SIGHUP on, stop it, and decide what to do when it dies.
//!
//! The restart rule is Postfix master's: only a daemon that dies before it
//! was ready is throttled. One that crashes after serving is replaced at
//! once, since mail waits meanwhile (the sockets stay open, so clients wait
//! in the backlog rather than being refused); a pause of a second guards
//! only against one that dies right after becoming ready, over and over.
//! A daemon that cannot get ready at all is a configuration or system
//! problem, not a crash: before the system first came up it stops
//! everything at once, and afterwards after a few spaced tries, so `tambo
//! run` exits with the daemon's reason instead of restarting it forever
//! while looking healthy to systemd.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

use tambo_proto::activation::{FIRST_FD, SUPERVISOR_ENV};

use super::Daemon;
use super::reaper::{Event, Events, ExitHow, Registry};
use super::sockets::{Sockets, listen_env};

/// A daemon that dies less than this after becoming ready is held back for
/// [`CRASH_LOOP_PAUSE`] before the next start.
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(1);
pub const CRASH_LOOP_PAUSE: Duration = Duration::from_secs(1);
/// Consecutive deaths before readiness, once the system was up, after
/// which the supervisor gives up.
pub const MAX_EARLY_FAILURES: u32 = 5;
/// How long a daemon gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for a process to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What every start of every daemon needs.
pub struct Launcher {
    pub bin_dir: PathBuf,
    /// `--config_dir …` and `--config_overrides …`, as `tambo run` got them.
    pub args: Vec<OsString>,
    /// The supervisor's sd_notify socket.
    pub notify_path: PathBuf,
    pub sockets: Arc<Sockets>,
    pub registry: Arc<Registry>,
}

/// What the supervisor asks of a daemon's watcher.
#[derive(Debug, Clone, Copy)]
pub enum Order {
    /// Pass SIGHUP on (only to a ready process: before that, its handler
    /// may not be installed and SIGHUP would kill it).
    Reload,
}

/// What a watcher tells the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Ready(Daemon),
    /// A ready process of this daemon exited.
    Down(Daemon),
    /// The daemon cannot run: the whole system must stop, for this reason.
    Failed(String),
}

/// What to do after a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Start it again after this delay.
    Restart(Duration),
    GiveUp,
}

/// The restart rule, apart from processes and clocks so it can be tested.
#[derive(Debug, Default)]
pub struct Policy {
    /// Deaths before readiness in a row.
    early_failures: u32,
}

impl Policy {
    /// `served` is how long the process had been ready when it died, or
    /// `None` if it never was; `system_up`, whether all daemons were ready
    /// together at some point.
    pub fn after_exit(&mut self, served: Option<Duration>, system_up: bool) -> Next {
        match served {
            Some(t) => {
                self.early_failures = 0;
                if t < CRASH_LOOP_WINDOW {
                    Next::Restart(CRASH_LOOP_PAUSE)
                } else {
                    Next::Restart(Duration::ZERO)
                }
            }
            None if !system_up => Next::GiveUp,
            None => {
                self.early_failures += 1;
                if self.early_failures >= MAX_EARLY_FAILURES {
                    Next::GiveUp
                } else {
                    // 1, 2, 4, 8 s between the five tries.
                    Next::Restart(Duration::from_secs(1 << (self.early_failures - 1)))
                }
            }
        }
    }

    pub fn early_failures(&self) -> u32 {
        self.early_failures
    }
}

/// How one process of the daemon ended.
struct Ended {
    pid: Option<i32>,
    /// "exited (signal: 9 (SIGKILL))", or why it could not be started.
    what: String,
    /// How long it had been ready, if it was.
    served: Option<Duration>,
    /// Its last `STATUS=`.
    status: Option<String>,
}

/// Watches one daemon for the supervisor's whole life.
pub struct Watcher {
    daemon: Daemon,
    launcher: Arc<Launcher>,
    events_tx: Events,
    events: mpsc::UnboundedReceiver<(i32, Event)>,
    orders: mpsc::UnboundedReceiver<Order>,
    reports: mpsc::UnboundedSender<Report>,
    stop: watch::Receiver<bool>,
    system_up: watch::Receiver<bool>,
}

impl Watcher {
    pub fn new(
        daemon: Daemon,
        launcher: Arc<Launcher>,
        orders: mpsc::UnboundedReceiver<Order>,
        reports: mpsc::UnboundedSender<Report>,
        stop: watch::Receiver<bool>,
        system_up: watch::Receiver<bool>,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            daemon,
            launcher,
            events_tx,
            events,
            orders,
            reports,
            stop,
            system_up,
        }
    }

    /// Keeps the daemon running until told to stop, or until it cannot
    /// run (reported as [`Report::Failed`]).
    pub async fn run(mut self) {
        let name = self.daemon.binary();
        let mut policy = Policy::default();
        loop {
            let ended = self.start_and_follow().await;
            self.kill_what_deliverd_left(ended.as_ref().and_then(|e| e.pid));
            let Some(ended) = ended else {
                return;
            };
            let system_up = *self.system_up.borrow();
            let next = policy.after_exit(ended.served, system_up);
            let pid = ended.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            let delay = match (next, ended.served) {
                (Next::Restart(d), Some(served)) if d.is_zero() => {
                    tracing::error!(
                        "{name} {} after serving {}s{pid}; restarting it now",
                        ended.what,
                        served.as_secs()
                    );
                    d
                }
                (Next::Restart(d), Some(served)) => {
                    tracing::error!(
                        "{name} {} {}ms after it became ready{pid}; restarting it in {}s so a crash loop cannot spin",
                        ended.what,
                        served.as_millis(),
                        d.as_secs()
                    );
                    d
                }
                (Next::Restart(d), None) => {
                    tracing::error!(
                        "{name}{pid} failed before it was ready: {}; retrying in {}s ({} of {MAX_EARLY_FAILURES} tries failed)",
                        reason(&ended),
                        d.as_secs(),
                        policy.early_failures()
                    );
                    d
                }
                (Next::GiveUp, _) => {
                    let why = if system_up {
                        format!(
                            "{name} failed {MAX_EARLY_FAILURES} times in a row before it was ready, last: {}",
                            reason(&ended)
                        )
                    } else {
                        format!("{name} could not start: {}", reason(&ended))
                    };
                    let _ = self.reports.send(Report::Failed(why));
                    return;
                }
            };
            if !delay.is_zero() && self.pause(delay).await {
                return;
            }
        }
    }

    /// Starts one process and follows it until it exits (`Some`) or the
    /// supervisor stops (`None`, the process stopped too).
    async fn start_and_follow(&mut self) -> Option<Ended> {
        let name = self.daemon.binary();
        // SIGHUPs that came while no process ran are moot: a new process
        // reads the current files anyway.
        while self.orders.try_recv().is_ok() {}
        let pid = match self.start() {
            Ok(pid) => pid,
            Err(e) => {
                return Some(Ended {
                    pid: None,
                    what: format!("could not be started ({e})"),
                    served: None,
                    status: None,
                });
            }
        };
        tracing::info!("started {name} (pid {pid})");
        let mut ready_at: Option<Instant> = None;
        let mut status = None;
        loop {
            tokio::select! {
                event = self.events.recv() => {
                    // The watcher holds a sender: the channel never closes.
                    let (from, event) = event?;
                    if from != pid {
                        continue;
                    }
                    match event {
                        Event::Ready => {
                            if ready_at.is_none() {
                                ready_at = Some(Instant::now());
                                tracing::info!("{name} (pid {pid}) is ready");
                                let _ = self.reports.send(Report::Ready(self.daemon));
                            }
                        }
                        Event::Status(s) => {
                            tracing::debug!("{name} (pid {pid}) status: {s}");
                            status = Some(s);
                        }
                        Event::Exited(how) => {
                            if ready_at.is_some() {
                                let _ = self.reports.send(Report::Down(self.daemon));
                            }
                            return Some(Ended {
                                pid: Some(pid),
                                what: format!("exited ({how})"),
                                served: ready_at.map(|t| t.elapsed()),
                                status,
                            });
                        }
                    }
                }
                Some(order) = self.orders.recv() => match order {
                    Order::Reload if ready_at.is_some() => {
                        if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGHUP) {
                            tracing::warn!("cannot pass SIGHUP to {name} (pid {pid}): {e}");
                        }
                    }
                    Order::Reload => tracing::info!(
                        "{name} (pid {pid}) is not ready yet: SIGHUP not passed on (it is reading the current files)"
                    ),
                },
                _ = stopped(&mut self.stop) => {
                    self.stop_process(pid).await;
                    return None;
                }
            }
        }
    }

    /// After deliverd exited, for whatever reason: kills the programs it
    /// ran that are still running (see [`super::orphans`]), before a new
    /// deliverd gets the jobs they were running again.
    fn kill_what_deliverd_left(&self, deliverd: Option<i32>) {
        let (Daemon::Deliverd, Some(session)) = (self.daemon, deliverd) else {
            return;
        };
        let killed = self.launcher.registry.kill_orphans(session);
        if killed > 0 {
            tracing::warn!(
                "killed {killed} process(es) that tambo-deliverd left running, each with its process group"
            );
        }
    }

    /// Spawns the daemon with its sockets at fds 3… and the supervisor's
    /// notify socket, in a process group of its own (a terminal's Ctrl-C
    /// goes to the supervisor alone, which then stops everyone in order).
    /// deliverd instead starts a session of its own (it cannot while it
    /// leads a group), which also marks every program it runs.
    fn start(&self) -> io::Result<i32> {
        let l = &self.launcher;
        let fds = l.sockets.for_daemon(self.daemon)?;
        let mut cmd = Command::new(l.bin_dir.join(self.daemon.binary()));
        if self.daemon != Daemon::Deliverd {
            cmd.process_group(0);
        }
        cmd.args(&l.args)
            .stdin(Stdio::null())
            .env(SUPERVISOR_ENV, std::process::id().to_string())
            .env("NOTIFY_SOCKET", &l.notify_path);
        // What systemd gave the supervisor itself is not the daemons'.
        for var in [
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "WATCHDOG_PID",
            "WATCHDOG_USEC",
        ] {
            cmd.env_remove(var);
        }
        if let Some((count, names)) = listen_env(&fds) {
            cmd.env("LISTEN_FDS", count).env("LISTEN_FDNAMES", names);
        }
        let mappings = fds
            .into_iter()
            .zip(FIRST_FD..)
            .map(|((_, parent_fd), child_fd)| FdMapping {
                parent_fd,
                child_fd,
            })
            .collect();
        cmd.fd_mappings(mappings).map_err(io::Error::other)?;
        l.registry
            .spawn(&mut cmd, self.daemon.binary(), &self.events_tx)
    }

    /// SIGTERM, then after [`STOP_GRACE`] SIGKILL to its whole process
    /// group (what it started dies with it).
    async fn stop_process(&mut self, pid: i32) {
        let name = self.daemon.binary();
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        if let Some(how) = self.wait_exit(pid, STOP_GRACE).await {
            tracing::info!("{name} stopped ({how})");
            return;
        }
        tracing::warn!(
            "{name} (pid {pid}) did not stop in {}s; killing it",
            STOP_GRACE.as_secs()
        );
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        match self.wait_exit(pid, KILL_WAIT).await {
            Some(how) => tracing::info!("{name} killed ({how})"),
            None => tracing::error!("{name} (pid {pid}) is still there after SIGKILL"),
        }
    }

    /// Waits up to `limit` for `pid` to exit.
    async fn wait_exit(&mut self, pid: i32, limit: Duration) -> Option<ExitHow> {
        let events = &mut self.events;
        let wait = async {
            while let Some((from, event)) = events.recv().await {
                if let (true, Event::Exited(how)) = (from == pid, event) {
                    return Some(how);
                }
            }
            None
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }

    /// Sleeps `d`; true if the supervisor stops meanwhile.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stopped(&mut self.stop) => true,
        }
    }
}

/// Why a process that never got ready ended: its own last word
/// (`STATUS=`), else how it ended.
fn reason(ended: &Ended) -> String {
    match &ended.status {
        Some(s) if !s.is_empty() => s.clone(),
        _ => ended.what.clone(),
    }
}

/// Resolves once the supervisor stops (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_daemon_that_served_is_replaced_at_once() {
        let mut p = Policy::default();
        for _ in 0..10 {
            assert_eq!(
                p.after_exit(Some(S(5)), true),
                Next::Restart(Duration::ZERO)
            );
        }
        // Even before the whole system was up.
        assert_eq!(
            p.after_exit(Some(S(5)), false),
            Next::Restart(Duration::ZERO)
        );
    }

    #[test]
    fn dying_right_after_ready_pauses_a_second() {
        let mut p = Policy::default();
        assert_eq!(
            p.after_exit(Some(Duration::from_millis(300)), true),
            Next::Restart(CRASH_LOOP_PAUSE)
        );
    }

    #[test]
    fn never_ready_at_startup_gives_up_at_once() {
        assert_eq!(Policy::default().after_exit(None, false), Next::GiveUp);
    }

    #[test]
    fn never_ready_after_startup_backs_off_then_gives_up() {
        let mut p = Policy::default();
        let delays: Vec<Next> = (0..MAX_EARLY_FAILURES)
            .map(|_| p.after_exit(None, true))
            .collect();
        assert_eq!(
            delays,
            [
                Next::Restart(S(1)),
                Next::Restart(S(2)),
                Next::Restart(S(4)),
                Next::Restart(S(8)),
                Next::GiveUp
            ]
        );
    }

    #[test]
    fn getting_ready_resets_the_count() {
        let mut p = Policy::default();
        for _ in 0..MAX_EARLY_FAILURES - 1 {
            assert_ne!(p.after_exit(None, true), Next::GiveUp);
        }
        assert_eq!(
            p.after_exit(Some(S(60)), true),
            Next::Restart(Duration::ZERO)
        );
        assert_eq!(p.after_exit(None, true), Next::Restart(S(1)));
    }
}
