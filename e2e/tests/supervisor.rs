//! `tambo run`: starts the four daemons, restarts one that dies (at once
//! when it had been serving), passes SIGHUP on, reaps orphans, refuses a
//! config that cannot run, and stops them all on SIGTERM with exit status
//! 0.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use tambo_e2e::*;

/// How long a daemon may take from SIGKILL to serving again.
const RESTART_LIMIT: Duration = Duration::from_secs(1);
/// The supervisor pauses a daemon that dies within 1 s of becoming ready;
/// a test that means to measure a plain restart waits this long first.
const PAST_CRASH_LOOP_WINDOW: Duration = Duration::from_millis(1200);

const DAEMONS: [&str; 4] = [
    "tambo-monitord",
    "tambo-queued",
    "tambo-deliverd",
    "tambo-smtpd",
];

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie still counts, so also check state.
    kill(Pid::from_raw(pid), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// The pid of the last `started <daemon> (pid N)` line.
fn child_pid(log: &str, daemon: &str) -> Option<i32> {
    let marker = format!("started {daemon} (pid ");
    let line = log.lines().rev().find(|l| l.contains(&marker))?;
    line[line.find(&marker)? + marker.len()..]
        .trim_end_matches(')')
        .parse()
        .ok()
}

/// The pid of the last `<daemon> (pid N) is ready` line.
fn ready_pid(log: &str, daemon: &str) -> Option<i32> {
    let marker = format!("{daemon} (pid ");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&marker) && l.ends_with(") is ready"))?;
    line[line.find(&marker)? + marker.len()..]
        .trim_end_matches(") is ready")
        .parse()
        .ok()
}

/// `tambo run` under test; stopped (and its daemons with it) if a test
/// fails half-way.
struct Supervisor {
    child: Child,
}

impl Supervisor {
    fn start(t: &Tambo, extra_args: &[&str]) -> Self {
        Self::start_with(t, extra_args, |_| {})
    }

    /// Starts it in a process group of its own, as a shell starts a job,
    /// after `customize` had its say on the command.
    fn start_with(t: &Tambo, extra_args: &[&str], customize: impl FnOnce(&mut Command)) -> Self {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(t.log_path("tambo"))
            .unwrap();
        let mut cmd = Command::new(bin_dir().join("tambo"));
        cmd.arg("run")
            .arg("--config_dir")
            .arg(&t.config_dir)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .env_remove("NOTIFY_SOCKET")
            .process_group(0);
        customize(&mut cmd);
        Supervisor {
            child: cmd.spawn().unwrap(),
        }
    }

    /// Starts it and waits until every daemon reported ready.
    fn start_ready(t: &Tambo) -> Self {
        let s = Self::start(t, &[]);
        t.wait_log("tambo", "all daemons are ready");
        s
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    fn wait_exit(&mut self) -> ExitStatus {
        wait_for("tambo run to exit", || self.child.try_wait().unwrap())
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn addr_in_log(t: &Tambo, marker: &str) -> SocketAddr {
    let line = t.wait_log("tambo", marker);
    let rest = &line[line.find(marker).unwrap() + marker.len()..];
    rest.trim_start_matches("http://")
        .split(|c: char| c.is_whitespace() || c == '/')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no address in {line:?}"))
}

fn smtp_addr(t: &Tambo) -> SocketAddr {
    t.listener("tambo", "SMTP")
}

fn http_addr(t: &Tambo) -> SocketAddr {
    addr_in_log(t, "monitoring listening on ")
}

/// Sends one message to `to` and returns the final reply code.
fn send(smtp: SocketAddr, to: &str, subject: &str) -> u16 {
    let mut c = Smtp::connect(smtp);
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect(&format!("RCPT TO:<{to}>"), 250);
    c.expect("DATA", 354);
    c.send_raw(&message(subject, "x\r\n"));
    c.send_raw(b".\r\n");
    let code = c.reply().code;
    c.cmd("QUIT");
    code
}

/// The process group of `pid`.
fn pgid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    // state, ppid, pgrp
    after.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Processes whose parent is `ppid`: (pid, command name, state).
fn children_of(ppid: i32) -> Vec<(i32, String, char)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid …"; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if rest.next().and_then(|p| p.parse::<i32>().ok()) == Some(ppid) {
            out.push((pid, comm, state));
        }
    }
    out
}

#[test]
fn run_supervises_and_stops_cleanly() {
    let t = Tambo::default_setup();
    let mut sup = Supervisor::start(&t, &[]);
    // The children log into the same file: wait for all four.
    for ready in [
        "smtpd listening on",
        "queued listening on",
        "connected to queued",
        "monitord listening on",
    ] {
        t.wait_log("tambo", ready);
    }
    let smtp = smtp_addr(&t);
    assert_eq!(send(smtp, "ann@example.test", "first"), 250);
    t.wait_maildir("ann", 1);

    // kill -9 deliverd: the supervisor notices and starts a new one.
    let old = wait_for("deliverd's pid", || {
        child_pid(&t.log("tambo"), "tambo-deliverd")
    });
    kill(Pid::from_raw(old), Signal::SIGKILL).unwrap();
    t.wait_log("tambo", "tambo-deliverd exited (signal: 9");
    let new = wait_for("a new deliverd", || {
        child_pid(&t.log("tambo"), "tambo-deliverd").filter(|p| *p != old)
    });
    assert_ne!(new, old);
    assert_eq!(send(smtp, "ann@example.test", "second"), 250);
    t.wait_maildir("ann", 2);

    let pids: Vec<i32> = DAEMONS
        .iter()
        .map(|d| child_pid(&t.log("tambo"), d).unwrap())
        .collect();
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit();
    assert!(status.success(), "tambo run exited with {status}");
    for pid in pids {
        wait_for("every child to be gone", || (!alive(pid)).then_some(()));
    }
    assert!(t.log("tambo").contains("all daemons stopped"));
}

/// Kills `daemon` with SIGKILL four times in a row; each time, `serve`
/// (called right after the kill) must succeed through a new process within
/// [`RESTART_LIMIT`] of the kill. Returns the measured times.
fn kill_four_times(t: &Tambo, daemon: &str, serve: impl Fn(usize)) -> Vec<Duration> {
    let mut times = Vec::new();
    for round in 0..4 {
        let old = wait_for(&format!("{daemon} to be ready"), || {
            ready_pid(&t.log("tambo"), daemon)
        });
        // Past the crash-loop guard, which would rightly pause a daemon
        // that dies right after becoming ready.
        let seen = Instant::now();
        wait_for("the crash-loop window to pass", || {
            (seen.elapsed() >= PAST_CRASH_LOOP_WINDOW).then_some(())
        });
        let killed = Instant::now();
        kill(Pid::from_raw(old), Signal::SIGKILL).unwrap();
        serve(round);
        let served = killed.elapsed();
        let new = wait_for(&format!("a new {daemon} to be ready"), || {
            ready_pid(&t.log("tambo"), daemon).filter(|p| *p != old)
        });
        let ready = killed.elapsed();
        assert!(!alive(old), "the old {daemon} (pid {old}) is gone");
        eprintln!(
            "{daemon} restart {}: pid {old} -> {new}, ready after {ready:?}, served after {served:?}",
            round + 1
        );
        assert!(
            served < RESTART_LIMIT,
            "{daemon} round {}: served {served:?} after the kill",
            round + 1
        );
        times.push(served);
    }
    times
}

#[test]
fn a_daemon_killed_after_serving_is_back_within_a_second_every_time() {
    let t = Tambo::default_setup();
    let _sup = Supervisor::start_ready(&t);
    let smtp = smtp_addr(&t);
    let http = http_addr(&t);

    // queued: a message sent right after the kill waits in submit.sock's
    // backlog for the new queued, gets its 250, and is delivered.
    kill_four_times(&t, "tambo-queued", |round| {
        assert_eq!(
            send(smtp, "ann@example.test", &format!("after-kill-{round}")),
            250
        );
    });
    t.wait_maildir("ann", 4);
    t.wait_queue_empty();

    // monitord: the HTTP request waits for the new monitord.
    kill_four_times(&t, "tambo-monitord", |_| {
        let (status, _, body) = http_get(http, "/debug/vars");
        assert_eq!(status, 200, "{body}");
    });

    // smtpd: a client connecting right after the kill gets a greeting.
    kill_four_times(&t, "tambo-smtpd", |_| {
        let mut c = Smtp::connect(smtp);
        c.expect("EHLO client.test", 250);
        c.cmd("QUIT");
    });
    assert_eq!(send(smtp, "bob@example.test", "at-the-end"), 250);
    t.wait_maildir("bob", 1);
    assert!(
        !t.log("tambo").contains("restarting it in"),
        "no restart was throttled"
    );
}

#[test]
fn sighup_reloads_without_restarting_anything() {
    let t = Tambo::default_setup();
    let sup = Supervisor::start_ready(&t);
    let smtp = smtp_addr(&t);
    let pids: Vec<i32> = DAEMONS
        .iter()
        .map(|d| ready_pid(&t.log("tambo"), d).unwrap())
        .collect();

    // A new alias, which queued only knows after a reload.
    let aliases = t.config_dir.join("domains").join(DOMAIN).join("aliases");
    std::fs::write(&aliases, "postmaster: ann\nteam: ann, bob\nsales: bob\n").unwrap();
    sup.signal(Signal::SIGHUP);
    t.wait_log("tambo", "SIGHUP: users and aliases reloaded");

    assert_eq!(send(smtp, "sales@example.test", "after-hup"), 250);
    t.wait_maildir("bob", 1);
    let after: Vec<i32> = DAEMONS
        .iter()
        .map(|d| child_pid(&t.log("tambo"), d).unwrap())
        .collect();
    assert_eq!(after, pids, "no daemon was restarted");
    assert!(pids.iter().all(|p| alive(*p)));
    assert!(alive(sup.pid()), "tambo run survives SIGHUP");
    assert_eq!(
        t.log("tambo").matches("started tambo-").count(),
        4,
        "nothing was started again"
    );
}

#[test]
fn a_busy_smtp_port_stops_tambo_run_at_once_naming_the_key() {
    let t = Tambo::default_setup();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let started = Instant::now();
    let mut sup = Supervisor::start(
        &t,
        &[
            "--config_overrides",
            &format!("smtp_address = [\"{addr}\"]"),
        ],
    );
    let status = sup.wait_exit();
    assert!(!status.success(), "tambo run exited with {status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let log = t.log("tambo");
    let want = format!("tambo.conf: key smtp_address: cannot listen on {addr}: ");
    assert!(log.contains(&want), "want {want:?} in:\n{log}");
    assert!(!log.contains("started tambo-"), "no daemon was started");
}

#[test]
fn a_daemon_that_cannot_start_stops_tambo_run_with_its_reason() {
    let t = Tambo::default_setup();
    // The supervisor's checks cannot see this; queued finds it when it
    // creates its queue directory.
    std::fs::create_dir_all(&t.data_dir).unwrap();
    std::fs::write(t.data_dir.join("queue"), b"not a directory").unwrap();
    let started = Instant::now();
    let mut sup = Supervisor::start(&t, &[]);
    let status = sup.wait_exit();
    assert!(!status.success(), "tambo run exited with {status}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let log = t.log("tambo");
    let line = log
        .lines()
        .find(|l| l.contains("tambo-queued could not start: "))
        .unwrap_or_else(|| panic!("no reason in:\n{log}"));
    assert!(
        line.contains("key data_dir: cannot open the queue directory"),
        "{line}"
    );
    assert_eq!(
        log.matches("started tambo-queued").count(),
        1,
        "queued is not restarted"
    );
    for d in DAEMONS {
        if let Some(pid) = child_pid(&log, d) {
            wait_for(&format!("{d} to be gone"), || (!alive(pid)).then_some(()));
        }
    }
}

#[test]
fn processes_orphaned_by_deliverd_are_reaped() {
    let t = Tambo::default_setup();
    // A pipe command that leaves a process behind: its shell exits at
    // once, and the `sleep` it started outlives it. In the config
    // directory, where deliverd may execute (docs/security.md).
    let script = t.config_dir.join("leave-orphan.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nsleep 2 </dev/null >/dev/null 2>&1 &\ncat >/dev/null\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(
        t.config_dir.join("domains").join(DOMAIN).join("aliases"),
        format!("postmaster: ann\norphan: | {}\n", script.display()),
    )
    .unwrap();
    let sup = Supervisor::start_ready(&t);
    assert_eq!(send(smtp_addr(&t), "orphan@example.test", "orphan"), 250);
    t.wait_queue_empty();
    // The orphan is reparented to the supervisor (a child subreaper)…
    wait_for("the orphan to become the supervisor's child", || {
        children_of(sup.pid())
            .iter()
            .any(|(_, comm, _)| comm == "sleep")
            .then_some(())
    });
    // …and reaped when it ends: no zombie is left.
    wait_for("the orphan to be reaped", || {
        let left: Vec<_> = children_of(sup.pid())
            .into_iter()
            .filter(|(_, comm, state)| comm == "sleep" || *state == 'Z')
            .collect();
        left.is_empty().then_some(())
    });
    let daemons = children_of(sup.pid());
    assert_eq!(daemons.len(), 4, "only the daemons are left: {daemons:?}");
}

#[test]
fn programs_a_crashed_deliverd_left_running_are_killed_before_the_next_one_starts() {
    let t = Tambo::new("", "maildir = \"\"", "");
    let d = t.dir.path().join("mda");
    std::fs::create_dir_all(&d).unwrap();
    // The first run hangs with a background child, as an MDA stuck on a
    // slow disk would; left alive, it would deliver when its sleep ends, a
    // second copy after the new deliverd's. The second run delivers at once.
    let mda = t.config_dir.join("mda.sh");
    std::fs::write(
        &mda,
        format!(
            "#!/bin/sh
if [ -e {d}/first ]; then cat >> {d}/delivered; echo . >> {d}/runs; exit 0; fi
touch {d}/first
sleep 300 &
echo $! > {d}/bg.tmp; mv {d}/bg.tmp {d}/bg
echo $$ > {d}/mda.tmp; mv {d}/mda.tmp {d}/mda
sleep 300
cat >> {d}/delivered\n",
            d = d.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&mda, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let conf = t.config_dir.join("tambo.conf");
    let text = std::fs::read_to_string(&conf).unwrap().replacen(
        "[tambo]",
        &format!(
            "mail_delivery_agent_bin = \"{}\"\nmail_delivery_agent_args = [\"%to_user%\"]\n[tambo]",
            mda.display()
        ),
        1,
    );
    std::fs::write(&conf, text).unwrap();
    let sup = Supervisor::start_ready(&t);
    assert_eq!(send(smtp_addr(&t), "ann@example.test", "stuck"), 250);
    let (leader, bg) = (read_pid(&d.join("mda")), read_pid(&d.join("bg")));
    let deliverd = ready_pid(&t.log("tambo"), "tambo-deliverd").unwrap();
    kill(Pid::from_raw(deliverd), Signal::SIGKILL).unwrap();

    wait_dead("the MDA", leader);
    wait_dead("its background child", bg);
    // Counted once: the MDA is the supervisor's child, its background
    // child is the MDA's, killed with its group.
    t.wait_log(
        "tambo",
        "killed 1 process(es) that tambo-deliverd left running",
    );
    // Killed before the new deliverd started, not merely at some point.
    let log = wait_for("a new deliverd", || {
        let log = t.log("tambo");
        (log.matches("started tambo-deliverd").count() == 2).then_some(log)
    });
    let killed = log.find("tambo-deliverd left running").unwrap();
    let restarted = log.rfind("started tambo-deliverd").unwrap();
    assert!(killed < restarted, "{log}");
    // The new deliverd gets the message again and delivers it, once.
    t.wait_queue_empty();
    assert_eq!(std::fs::read_to_string(d.join("runs")).unwrap(), ".\n");
    let delivered = std::fs::read_to_string(d.join("delivered")).unwrap();
    assert_eq!(delivered.matches("Subject: stuck").count(), 1);
    // Every killed process was reaped: only the daemons are left.
    wait_for("only the daemons as the supervisor's children", || {
        (children_of(sup.pid()).len() == 4).then_some(())
    });
}

#[test]
fn ctrl_c_in_a_terminal_reaches_only_the_supervisor_which_stops_everyone() {
    let t = Tambo::default_setup();
    let mut sup = Supervisor::start_ready(&t);
    let log = t.log("tambo");
    let pids: Vec<i32> = DAEMONS
        .iter()
        .map(|d| ready_pid(&log, d).unwrap())
        .collect();
    for pid in &pids {
        assert_eq!(pgid(*pid), *pid, "each daemon leads its own process group");
        assert_ne!(pgid(*pid), pgid(sup.pid()));
    }
    // What a terminal does on Ctrl-C: SIGINT to the foreground job's group.
    nix::sys::signal::killpg(Pid::from_raw(sup.pid()), Signal::SIGINT).unwrap();
    let status = sup.wait_exit();
    assert!(status.success(), "tambo run exited with {status}");
    let log = t.log("tambo");
    assert!(log.contains("SIGINT: stopping every daemon"), "{log}");
    for d in DAEMONS {
        assert!(
            log.contains(&format!("{d} stopped (exit status: 0)")),
            "{d} was stopped by the supervisor, not by the terminal's SIGINT"
        );
        assert!(
            !log.contains(&format!("{d} exited (")),
            "{d} did not die alone"
        );
    }
    for pid in pids {
        assert!(!alive(pid));
    }
}

#[test]
fn as_a_systemd_service_it_passes_sockets_on_and_reports_ready_once() {
    let t = Tambo::default_setup();
    // What systemd would pass: an SMTP socket named "smtp" at fd 3, and a
    // notification socket of its own.
    let smtp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let smtp_addr = smtp.local_addr().unwrap();
    let notify_path = t.dir.path().join("systemd-notify.sock");
    let systemd = UnixDatagram::bind(&notify_path).unwrap();
    let fd = std::os::fd::OwnedFd::from(smtp.try_clone().unwrap());
    let _sup = Supervisor::start_with(
        &t,
        &["--config_overrides", "smtp_address = [\"systemd\"]"],
        |cmd| {
            use command_fds::{CommandFdExt, FdMapping};
            cmd.env("NOTIFY_SOCKET", &notify_path)
                .env("LISTEN_FDS", "1")
                .env("LISTEN_FDNAMES", "smtp")
                // systemd would set LISTEN_PID; a Command cannot know the
                // pid, so the parent check stands in, as tambo's own does.
                .env(
                    tambo_proto::activation::SUPERVISOR_ENV,
                    std::process::id().to_string(),
                )
                .fd_mappings(vec![FdMapping {
                    parent_fd: fd,
                    child_fd: 3,
                }])
                .unwrap();
        },
    );
    t.wait_log("tambo", "all daemons are ready");
    // The daemons reported to tambo, not to systemd: the only message
    // systemd has is tambo's own READY=1, sent after theirs.
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), "READY=1\n");
    systemd.set_nonblocking(true).unwrap();
    assert!(systemd.recv(&mut buf).is_err(), "one message only");
    // smtpd serves on the socket systemd passed.
    let mut c = Smtp::connect(smtp_addr);
    c.expect("EHLO client.test", 250);
    assert_eq!(send(smtp_addr, "ann@example.test", "via-systemd"), 250);
    t.wait_maildir("ann", 1);
}

#[test]
fn a_systemd_listener_without_its_socket_is_off_with_a_warning() {
    // REFERENCE §1.1: a mode with no socket only gets a warning; the other
    // modes (bound by address here) serve.
    let t = Tambo::default_setup();
    let mut sup = Supervisor::start(&t, &["--config_overrides", "smtp_address = [\"systemd\"]"]);
    t.wait_log("tambo", "all daemons are ready");
    t.wait_log(
        "tambo",
        "key smtp_address: \"systemd\" is listed, but no socket named \"smtp\" was passed to tambo (FileDescriptorName=smtp): that listener is off",
    );
    let mut c = Smtp::connect(t.listener("tambo", "submission"));
    c.expect("EHLO client.test", 250);
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
    // With no socket at all, tambo refuses to start.
    let t = Tambo::default_setup();
    let mut sup = Supervisor::start(
        &t,
        &[
            "--config_overrides",
            "smtp_address = [\"systemd\"]\nsubmission_address = [\"systemd\"]\nsubmission_over_tls_address = []",
        ],
    );
    let status = sup.wait_exit();
    assert!(!status.success());
    let log = t.log("tambo");
    assert!(
        log.contains("no listening socket: set smtp_address"),
        "{log}"
    );
}

#[test]
fn a_daemon_that_never_gets_ready_again_stops_tambo_run_after_five_tries() {
    let t = Tambo::default_setup();
    let mut sup = Supervisor::start_ready(&t);
    let queued = ready_pid(&t.log("tambo"), "tambo-queued").unwrap();
    // Break the queue directory under the running system, then make queued
    // restart: every new queued fails before it is ready.
    let queue = t.data_dir.join("queue");
    std::fs::rename(&queue, t.data_dir.join("queue.away")).unwrap();
    std::fs::write(&queue, b"not a directory").unwrap();
    let killed = Instant::now();
    kill(Pid::from_raw(queued), Signal::SIGKILL).unwrap();
    let status = sup.wait_exit();
    let took = killed.elapsed();
    assert!(!status.success(), "tambo run exited with {status}");
    let log = t.log("tambo");
    // Retried after 1, 2, 4 and 8 s, then given up.
    assert!(took >= Duration::from_secs(15), "gave up after {took:?}");
    assert_eq!(log.matches("started tambo-queued").count(), 6, "{log}");
    for (n, delay) in [(1, 1), (2, 2), (3, 4), (4, 8)] {
        assert!(
            log.contains(&format!("retrying in {delay}s ({n} of 5 tries failed)")),
            "{log}"
        );
    }
    let line = log
        .lines()
        .find(|l| l.contains("tambo-queued failed 5 times in a row before it was ready"))
        .unwrap_or_else(|| panic!("no reason in:\n{log}"));
    assert!(
        line.contains("key data_dir: cannot open the queue directory"),
        "{line}"
    );
    for d in DAEMONS {
        let pid = child_pid(&log, d).unwrap();
        wait_for(&format!("{d} to be gone"), || (!alive(pid)).then_some(()));
    }
}

#[test]
fn as_root_a_configured_user_that_does_not_exist_is_named() {
    if !is_root() {
        // Not root: every role runs as the current user (development).
        return;
    }
    let t = Tambo::default_setup();
    let mut sup = Supervisor::start(
        &t,
        &[
            "--config_overrides",
            "[tambo]\nmonitord_user = \"tambo-no-such-user\"",
        ],
    );
    let status = sup.wait_exit();
    assert!(!status.success());
    let log = t.log("tambo");
    assert!(
        log.contains("key tambo.monitord_user: user \"tambo-no-such-user\" does not exist"),
        "{log}"
    );
    assert!(!log.contains("started tambo-"), "no daemon was started");
}

#[test]
fn only_what_deliverd_started_dies_with_it() {
    // tambo run started by a wrapper script that left a sidecar behind:
    // the sidecar is the supervisor's child too (the shell execs into tambo
    // run), but it is not deliverd's, and must survive deliverd's death.
    let t = Tambo::default_setup();
    let sidecar_pid = t.dir.path().join("sidecar");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(t.log_path("tambo"))
        .unwrap();
    let script = format!(
        "sleep 300 & echo $! > {p}.tmp; mv {p}.tmp {p}; exec {tambo} run --config_dir {c}",
        p = sidecar_pid.display(),
        tambo = bin_dir().join("tambo").display(),
        c = t.config_dir.display(),
    );
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .env_remove("NOTIFY_SOCKET")
        .process_group(0)
        .spawn()
        .unwrap();
    let _sup = Supervisor { child };
    t.wait_log("tambo", "all daemons are ready");
    let sidecar = read_pid(&sidecar_pid);
    let deliverd = ready_pid(&t.log("tambo"), "tambo-deliverd").unwrap();
    kill(Pid::from_raw(deliverd), Signal::SIGKILL).unwrap();
    wait_for("a new deliverd", || {
        (t.log("tambo").matches("started tambo-deliverd").count() == 2).then_some(())
    });
    assert!(alive(sidecar), "the sidecar was killed with deliverd");
    assert!(
        !t.log("tambo").contains("left running"),
        "{}",
        t.log("tambo")
    );
    let _ = kill(Pid::from_raw(sidecar), Signal::SIGKILL);
}
