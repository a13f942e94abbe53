//! Privilege separation as `tambo run` does it when started as root
//! (DESIGN §1): each daemon under its own system user, with every
//! capability set empty (the bounding set included) and no_new_privs; mail
//! still flows end to end; and code running inside deliverd's role (a
//! hook) cannot read what only queued may.
//!
//! The test creates the four system users it needs and removes them.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tambo_e2e::*;

/// System users made for one test, removed when it ends.
struct SystemUsers(Vec<(String, u32, u32)>);

impl SystemUsers {
    fn create(names: &[String]) -> Self {
        let mut made = SystemUsers(Vec::new());
        for n in names {
            let ok = Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .args(["--shell", "/usr/sbin/nologin", n])
                .status()
                .expect("useradd");
            assert!(ok.success(), "useradd {n}");
            let u = nix::unistd::User::from_name(n).unwrap().unwrap();
            made.0.push((n.clone(), u.uid.as_raw(), u.gid.as_raw()));
        }
        made
    }

    fn get(&self, i: usize) -> (u32, u32) {
        (self.0[i].1, self.0[i].2)
    }
}

impl Drop for SystemUsers {
    fn drop(&mut self) {
        for (n, _, _) in &self.0 {
            let _ = Command::new("userdel").arg(n).status();
        }
    }
}

/// `tambo run`, stopped when the test ends.
struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let _ = wait_for("tambo run to stop", || self.0.try_wait().ok().flatten());
    }
}

/// The pid of `daemon` from the supervisor's `started <daemon> (pid N)`.
fn pid_of(t: &Tambo, daemon: &str) -> i32 {
    let marker = format!("started {daemon} (pid ");
    let line = t.wait_log("tambo", &marker);
    line[line.find(&marker).unwrap() + marker.len()..]
        .trim_end_matches(')')
        .parse()
        .unwrap()
}

/// The value of `field` in /proc/PID/status.
fn status(pid: i32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    if std::fs::symlink_metadata(path).unwrap().is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

#[test]
fn every_daemon_runs_as_its_own_user_with_nothing_more_and_mail_flows() {
    if !is_root() {
        eprintln!("skipped: needs root to create users and drop to them (CI is root)");
        return;
    }
    let tag = std::process::id() % 100_000;
    let names: Vec<String> = ["s", "q", "d", "m"]
        .iter()
        .map(|r| format!("tt{tag}{r}"))
        .collect();
    let users = SystemUsers::create(&names);
    let t = Tambo::new("", "", "");
    // The roles' users instead of the harness's.
    let conf = std::fs::read_to_string(t.config_dir.join("tambo.conf")).unwrap();
    let ours = format!(
        "smtpd_user = \"{}\"\nqueued_user = \"{}\"\ndeliverd_user = \"{}\"\nmonitord_user = \"{}\"\n",
        names[0], names[1], names[2], names[3]
    );
    std::fs::write(
        t.config_dir.join("tambo.conf"),
        conf.replace(&role_users(), &ours),
    )
    .unwrap();
    let (queue_uid, queue_gid) = users.get(1);
    let (deliver_uid, deliver_gid) = users.get(2);
    // As a package installs it: the config is queued's to read (keys and
    // users files only for it), tambo.conf for everyone; the Maildirs are
    // deliverd's.
    chown_tree(&t.config_dir, queue_uid, queue_gid);
    std::fs::set_permissions(
        t.config_dir.join("tambo.conf"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(&t.config_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        t.config_dir.join("certs/mx/privkey.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::create_dir_all(&t.mail_dir).unwrap();
    chown_tree(&t.mail_dir, deliver_uid, deliver_gid);
    // A hook runs inside deliverd's role: it plays the attacker, and says
    // what it could do in a directory of its own.
    let out = t.dir.path().join("attacker");
    std::fs::create_dir(&out).unwrap();
    chown_tree(&out, deliver_uid, deliver_gid);
    let hooks = t.config_dir.join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        hooks.join("post-data"),
        format!(
            "#!/bin/sh\nexec > {out}/report 2>&1\necho \"uid=$(id -u)\"\nls {queue} && echo 'read the queue: yes'\ncat {key} > /dev/null && echo 'read the TLS key: yes'\ntouch {queue}/planted && echo 'wrote the queue: yes'\necho done\n",
            out = out.display(),
            queue = t.data_dir.join("queue").display(),
            key = t.config_dir.join("certs/mx/privkey.pem").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        hooks.join("post-data"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    let log = std::fs::File::create(t.log_path("tambo")).unwrap();
    let _run = Run(Command::new(bin_dir().join("tambo"))
        .arg("run")
        .arg("--config_dir")
        .arg(&t.config_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .env("TAMBO_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .spawn()
        .unwrap());
    t.wait_log("tambo", "all daemons are ready");

    for (i, daemon) in [
        "tambo-smtpd",
        "tambo-queued",
        "tambo-deliverd",
        "tambo-monitord",
    ]
    .iter()
    .enumerate()
    {
        let pid = pid_of(&t, daemon);
        let (uid, gid) = users.get(i);
        let want_uid = format!("{uid}\t{uid}\t{uid}\t{uid}");
        let want_gid = format!("{gid}\t{gid}\t{gid}\t{gid}");
        assert_eq!(status(pid, "Uid"), want_uid, "{daemon}");
        assert_eq!(status(pid, "Gid"), want_gid, "{daemon}");
        assert_eq!(status(pid, "NoNewPrivs"), "1", "{daemon}");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status(pid, caps), "0000000000000000", "{daemon} {caps}");
        }
    }

    // And each locked itself down (this kernel has Landlock).
    for role in ["smtpd", "queued", "deliverd", "monitord"] {
        t.wait_log(
            "tambo",
            &format!("{role}: locked down (Landlock fully enforced, seccomp on)"),
        );
    }

    // Mail flows end to end with every daemon dropped.
    let mut c = Smtp::connect(t.listener("tambo", "SMTP"));
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<x@remote.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("privsep", "hello\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    let new = t.mail_dir.join(DOMAIN).join("ann").join("new");
    let file = wait_for("the message in ann's Maildir", || {
        std::fs::read_dir(&new).ok()?.next()?.ok().map(|e| e.path())
    });
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&file).unwrap().uid(), deliver_uid);
    // The queue and domaininfo are queued's alone, the MTA-STS cache
    // deliverd's.
    for (dir, uid) in [
        ("queue", queue_uid),
        ("domaininfo", queue_uid),
        ("sts-cache", deliver_uid),
    ] {
        let m = std::fs::metadata(t.data_dir.join(dir)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o700), "{dir}");
    }

    // Every socket refuses a peer that claims another role than its uid's.
    // Each attacker is given the socket's group, so the file's mode lets
    // it connect and the uid check behind it is what refuses; the right
    // uid, as a control, is accepted.
    let (smtpd_uid, smtpd_gid) = users.get(0);
    let (monitor_uid, _) = users.get(3);
    let sock = |n: &str| t.run_dir.join(n).display().to_string();
    for (uid, gid, socket, claim, server, verdict) in [
        (
            deliver_uid,
            deliver_gid,
            sock("deliver.sock"),
            "deliverd",
            "queued",
            "accepted",
        ),
        (
            smtpd_uid,
            deliver_gid,
            sock("deliver.sock"),
            "deliverd",
            "queued",
            "refused",
        ),
        (
            deliver_uid,
            smtpd_gid,
            sock("submit.sock"),
            "smtpd",
            "queued",
            "refused",
        ),
        (
            monitor_uid,
            smtpd_gid,
            sock("submit.sock"),
            "smtpd",
            "queued",
            "refused",
        ),
        (
            smtpd_uid,
            smtpd_gid,
            sock("monitor.sock"),
            "queued",
            "monitord",
            "refused",
        ),
        (
            65534,
            65534,
            sock("monitor.sock"),
            "smtpd",
            "monitord",
            "refused",
        ),
    ] {
        let said = peer_as(uid, gid, &["client", &socket, claim, server]);
        assert!(
            said.starts_with(verdict) && !said.contains("No such file"),
            "uid {uid} gid {gid} as {claim} on {socket}: {said}"
        );
    }

    // What the hook, inside deliverd's role, could do.
    let report = wait_for("the hook's report", || {
        std::fs::read_to_string(out.join("report"))
            .ok()
            .filter(|r| r.contains("done"))
    });
    assert!(report.contains(&format!("uid={deliver_uid}")), "{report}");
    assert!(!report.contains(": yes"), "{report}");
    assert!(report.matches("Permission denied").count() >= 3, "{report}");
    assert!(!t.data_dir.join("queue/planted").exists());

    // Counters reached monitord (which runs as a user of its own too).
    let http = {
        let marker = "monitoring listening on ";
        let line = t.wait_log("tambo", marker);
        line[line.find(marker).unwrap() + marker.len()..]
            .trim_start_matches("http://")
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    wait_for("chasquid/queue/putCount = 1 in monitord", || {
        let (_, _, body) = http_get(http, "/debug/vars");
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["chasquid/queue/putCount"].as_u64() == Some(1)).then_some(())
    });
}

/// Runs `tambo-test-peer attack`: locked down as `role` on `t`'s config,
/// it tries each attempt; what each gave, by attempt.
fn attack(t: &Tambo, role: &str, attempts: &[String]) -> std::collections::HashMap<String, String> {
    attack_in(&t.config_dir, role, attempts)
}

/// [`attack`] with the config directory `config`.
fn attack_in(
    config: &Path,
    role: &str,
    attempts: &[String],
) -> std::collections::HashMap<String, String> {
    let out = Command::new(bin_dir().join("tambo-test-peer"))
        .arg("attack")
        .arg(role)
        .arg(config)
        .args(attempts)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{role}: {text}");
    text.lines()
        .filter_map(|l| l.rsplit_once(": "))
        .map(|(a, r)| (a.to_string(), r.to_string()))
        .collect()
}

#[test]
fn a_program_handed_a_message_cannot_read_its_item() {
    if !is_root() {
        eprintln!("skipped: running the program as another user needs root (CI is root)");
        return;
    }
    // A message as queued keeps it: its file, mode 0600 and not the
    // reader's, with its item (every recipient, Bcc included) as an
    // attribute. deliverd passes the open file on, as an MDA's or a pipe
    // command's stdin; that program, like deliverd, runs as another user.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d:handedmsg01");
    std::fs::write(&path, b"Subject: x\r\n\r\nbody\r\n").unwrap();
    rustix::fs::setxattr(
        &path,
        "user.tambo.item",
        br#"{"rcpt_to":["bcc@example.test"]}"#,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(bin_dir().join("tambo-test-peer"))
        .arg("handed")
        .stdin(std::fs::File::open(&path).unwrap())
        // nobody: neither the file's owner nor root.
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // The message, yes; its item, no: the kernel checks the file's owner
    // and mode, not how the descriptor was opened.
    assert!(text.contains("read: 20\n"), "{text}");
    assert!(text.contains("item: EACCES"), "{text}");
}

#[test]
fn a_compromised_smtpd_queued_or_monitord_cannot_leave_its_role() {
    // The sandbox binds root too: no other user is needed to show it.
    let t = Tambo::default_setup();
    let queue = t.data_dir.join("queue");
    std::fs::create_dir_all(&queue).unwrap();
    std::fs::write(queue.join("m:item"), "{}").unwrap();
    // Something listening, so a refused connection is the sandbox's doing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = format!("tcp:{}", listener.local_addr().unwrap());
    // An abstract Unix socket outside every sandbox (D-Bus and the like
    // live there).
    let name = format!("tambo-test-{}", std::process::id());
    let abstract_addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
    };
    let _abstract = std::os::unix::net::UnixListener::bind_addr(&abstract_addr).unwrap();
    let abs = format!("abstract:{name}");
    let p = |what: &str, path: &Path| format!("{what}:{}", path.display());
    let key = t.config_dir.join("certs/mx/privkey.pem");
    let users = t.config_dir.join("domains").join(DOMAIN).join("users");
    let tmp = t.dir.path().join("planted");
    let attempts = vec![
        p("open", &key),
        p("open", &users),
        p("list", &queue),
        p("open", &queue.join("m:item")),
        p("write", &queue.join("m:planted")),
        p("write", &tmp),
        // queued reads /etc/passwd (local.sock's users): shadow it is.
        p("open", Path::new("/etc/shadow")),
        "exec:/bin/sh".to_string(),
        tcp.clone(),
        "udp".to_string(),
        "open:/etc/localtime".to_string(),
        "vsock".to_string(),
        abs.clone(),
    ];
    let denied = |r: &str| r == "EACCES" || r == "EPERM";

    // smtpd: no file but the time zone, no exec, TCP only to DNS.
    let r = attack(&t, "smtpd", &attempts);
    for a in &attempts[..8] {
        assert!(denied(&r[a]), "smtpd {a}: {}", r[a]);
    }
    assert_eq!(r[&tcp], "EACCES", "smtpd connects only to DNS servers");
    assert_eq!(r["udp"], "ok", "smtpd resolves (UDP)");
    assert_eq!(r["exec:/bin/sh"], "EPERM");
    assert_eq!(r["open:/etc/localtime"], "ok");
    assert_eq!(r["vsock"], "EPERM", "smtpd: Unix, TCP and UDP sockets only");
    assert_eq!(
        r[&abs], "EPERM",
        "no abstract Unix socket outside its domain"
    );

    // queued: its config and data, nothing else; no exec, no network.
    let r = attack(&t, "queued", &attempts);
    for a in &attempts[..5] {
        assert_eq!(r[a], "ok", "queued {a}");
    }
    for a in [
        &attempts[5],
        &attempts[6],
        &attempts[7],
        &tcp,
        &"udp".to_string(),
    ] {
        assert!(denied(&r[a]), "queued {a}: {}", r[a]);
    }
    assert_eq!(r[&tcp], "EPERM", "no internet socket at all");
    assert_eq!(r["vsock"], "EPERM", "Unix sockets only");
    assert_eq!(r[&abs], "EPERM");

    // monitord: nothing at all.
    let r = attack(&t, "monitord", &attempts);
    for a in attempts.iter().filter(|a| !a.ends_with("localtime")) {
        assert!(denied(&r[a]), "monitord {a}: {}", r[a]);
    }
    // Only queued, in its own data directory, could write.
    assert!(!tmp.exists());
}

/// Removes a directory tree when the test ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_compromised_deliverd_writes_only_mail_and_runs_only_installed_programs() {
    if !is_root() {
        eprintln!(
            "skipped: the tree must be outside /tmp, which deliverd may write: /var/lib needs root (CI is root)"
        );
        return;
    }
    // Outside /tmp and /var/tmp (deliverd's scratch space), as in production.
    let base = PathBuf::from(format!("/var/lib/tambo-attack-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(base.clone());
    let (config, data, mail, elsewhere) = (
        base.join("config"),
        base.join("data"),
        base.join("mail"),
        base.join("elsewhere"),
    );
    for d in [&config, &data.join("queue"), &mail, &elsewhere] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        config.join("tambo.conf"),
        format!(
            "hostname = \"mx.example.test\"\ndata_dir = \"{}\"\n[tambo]\nruntime_dir = \"{}\"\nmaildir = \"{}/%to_domain%/%to_user%\"\n{}",
            data.display(),
            base.join("run").display(),
            mail.display(),
            role_users()
        ),
    )
    .unwrap();
    std::fs::write(data.join("queue/m:item"), "{}").unwrap();
    let prog = elsewhere.join("dropped");
    std::fs::write(&prog, "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A program dropped where deliverd may write: not run by execve.
    std::fs::copy("/bin/true", "/tmp/tambo-attack-dropped").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = format!("tcp:{}", listener.local_addr().unwrap());
    let p = |what: &str, path: &Path| format!("{what}:{}", path.display());
    let attempts = vec![
        p("list", &data.join("queue")),
        p("open", &data.join("queue/m:item")),
        p("write", &data.join("queue/m:planted")),
        p("write", &elsewhere.join("planted")),
        p("exec", &prog),
        p("write", &mail.join("delivered")),
        "write:/tmp/tambo-attack-scratch".to_string(),
        "exec:/bin/true".to_string(),
        "exec:/tmp/tambo-attack-dropped".to_string(),
        tcp.clone(),
        "udp".to_string(),
        "vsock".to_string(),
    ];
    let r = attack_in(&config, "deliverd", &attempts);
    let text = format!("{r:?}");
    for a in &attempts[..5] {
        assert_eq!(r[a], "EACCES", "deliverd {a}: {text}");
    }
    for a in [
        &attempts[5],
        &attempts[6],
        &attempts[7],
        &tcp,
        &"udp".to_string(),
    ] {
        assert_eq!(r[a], "ok", "deliverd {a}: {text}");
    }
    assert_eq!(r["vsock"], "EPERM", "{text}");
    assert_eq!(r["exec:/tmp/tambo-attack-dropped"], "EACCES", "{text}");
    let _ = std::fs::remove_file("/tmp/tambo-attack-scratch");
    let _ = std::fs::remove_file("/tmp/tambo-attack-dropped");

    // A Maildir template above the queue would let deliverd reach it:
    // refused, with one line saying why.
    let conf = std::fs::read_to_string(config.join("tambo.conf")).unwrap();
    std::fs::write(
        config.join("tambo.conf"),
        conf.replace(
            &format!("maildir = \"{}/%to_domain%", mail.display()),
            &format!("maildir = \"{}/%to_domain%", base.display()),
        ),
    )
    .unwrap();
    let out = Command::new(bin_dir().join("tambo-test-peer"))
        .arg("attack")
        .arg("deliverd")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("contains the queue"), "{text}");
}
