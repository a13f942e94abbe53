//! Against a real Dovecot (Debian's `dovecot-core` and `dovecot-lmtpd`,
//! which scripts/test.sh installs): Dovecot as the fallback for
//! authentication and user existence (REFERENCE §5.5), and as the LMTP
//! server local mail is delivered to (§4.3, `lmtp_address`). Each test
//! starts its own `dovecot -F` with a passwd-file in a temp dir, and tambo
//! points at its sockets.
//!
//! What is pinned down: a user only Dovecot knows logs in over TLS and
//! gets mail; the users file is asked first and its "no" for a known user
//! is final; wrong passwords and unknown users are refused like any
//! others; a stopped Dovecot gives quick temporary errors (454 4.7.0,
//! 451 4.4.3), never a hang or a permanent refusal. Over LMTP: one
//! transaction lands in each Dovecot mailbox, a recipient Dovecot refuses
//! is bounced with Dovecot's own words, and a stopped Dovecot only delays
//! the mail.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tambo_e2e::tls::{TlsSmtp, Versions, hash, plain};
use tambo_e2e::*;

/// ann's password in tambo's users file.
const ANN_PASSWORD: &str = "ann's file password";
/// dave is only in Dovecot ({PLAIN}).
const DAVE_PASSWORD: &str = "dave's dovecot password";
/// `erin` (a bare name, no domain) is only in Dovecot, as SHA512-CRYPT of
/// "erin password" (made with `doveadm pw -s SHA512-CRYPT`).
const ERIN_PASSWORD: &str = "erin password";
const ERIN_HASH: &str = "{SHA512-CRYPT}$6$rArYPqHJVh/r2h4I$BAi8wfgkFeuZZ4wL40xovhntBiVGldbj9xkchGxmdmt8DHG2MXLFTp8ZkSuNnIQLdbpP5YwZ2MT07/TtNutTm0";
/// carol is in both: tambo's file (receive-only) wins, so this Dovecot
/// password must not log her in.
const CAROL_DOVECOT_PASSWORD: &str = "carol's dovecot password";

/// The users Dovecot's LMTP server delivers to (passwd-file lines); not
/// in the auth-only setup, where "only Dovecot knows dave" must stay true.
const LMTP_USERS: &str = "ann@example.test:{PLAIN}unused::::::\n\
                          bob@example.test:{PLAIN}unused::::::\n";

/// One `dovecot -F`, in its own process group, with everything (config,
/// sockets, state, logs, and with LMTP the mailboxes) under `dir`.
struct Dovecot {
    dir: PathBuf,
    master: Option<Child>,
    pgid: i32,
}

impl Dovecot {
    /// Dovecot's LMTP socket (with [`Dovecot::start_lmtp`]).
    fn lmtp(&self) -> PathBuf {
        self.dir.join("lmtp")
    }

    /// The messages in `user@example.test`'s Dovecot Maildir `new/`, by
    /// file name (not strictly by arrival: find them by content).
    fn maildir(&self, user: &str) -> Vec<String> {
        let new = self.dir.join("mail").join(DOMAIN).join(user).join("new");
        let mut files: Vec<PathBuf> = std::fs::read_dir(new)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }

    /// Waits until `user`'s Dovecot Maildir holds `count` messages.
    fn wait_maildir(&self, user: &str, count: usize) -> Vec<String> {
        wait_for(
            &format!("{count} message(s) in Dovecot's mailbox of {user}"),
            || {
                let m = self.maildir(user);
                (m.len() >= count).then_some(m)
            },
        )
    }

    fn userdb(&self) -> PathBuf {
        self.dir.join("auth-userdb")
    }

    fn client(&self) -> PathBuf {
        self.dir.join("auth-client")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }

    /// Writes the config and users under `dir` and starts Dovecot (auth
    /// only), waiting until both auth sockets answer.
    fn start(dir: &Path) -> Self {
        Self::launch(dir, false)
    }

    /// As [`Dovecot::start`], plus Dovecot's LMTP server on `dir/lmtp`
    /// for ann@ and bob@example.test, who get Maildirs under
    /// `dir/mail/example.test/`; waits until it answers too.
    fn start_lmtp(dir: &Path) -> Self {
        Self::launch(dir, true)
    }

    fn launch(dir: &Path, lmtp: bool) -> Self {
        let bin = dovecot_bin();
        assert!(
            Command::new(&bin)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "these tests need Dovecot: apt-get install dovecot-core (scripts/test.sh does)"
        );
        assert!(
            !lmtp || Path::new("/usr/lib/dovecot/lmtp").is_file(),
            "this test needs Dovecot's LMTP server: apt-get install dovecot-lmtpd (scripts/test.sh does)"
        );
        std::fs::create_dir_all(dir).unwrap();
        // The auth process runs as Dovecot's internal user: it must be
        // able to read the passwd-file.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let passwd = dir.join("passwd");
        std::fs::write(
            &passwd,
            format!(
                "dave@example.test:{{PLAIN}}{DAVE_PASSWORD}::::::\n\
                 erin:{ERIN_HASH}::::::\n\
                 carol@example.test:{{PLAIN}}{CAROL_DOVECOT_PASSWORD}::::::\n{}",
                if lmtp { LMTP_USERS } else { "" }
            ),
        )
        .unwrap();
        std::fs::set_permissions(&passwd, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .expect("the current user has a name")
            .name;
        // As root (CI), Dovecot's own unprivileged users run its auth
        // process, as in production; otherwise everything runs as us,
        // which also rules out anvil's chroot.
        let rootless = if is_root() {
            String::new()
        } else {
            let group = nix::unistd::Group::from_gid(nix::unistd::getegid())
                .ok()
                .flatten()
                .expect("the current group has a name")
                .name;
            format!(
                "default_internal_user = {me}\ndefault_login_user = {me}\n\
                 default_internal_group = {group}\nservice anvil {{\n  chroot =\n}}\n"
            )
        };
        let lmtp_conf = if lmtp {
            lmtp_conf(dir, &me)
        } else {
            String::new()
        };
        let protocols = if lmtp { "lmtp" } else { "" };
        let d = dir.display();
        // Nothing outside `dir`: no /etc/dovecot include, no /var/run, no
        // protocols but LMTP when asked (else only the auth service runs),
        // no TLS.
        let conf = format!(
            "protocols = {protocols}
ssl = no
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
auth_mechanisms = plain
{rootless}passdb {{
  driver = passwd-file
  args = {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = {d}/passwd
}}
service auth {{
  unix_listener {d}/auth-client {{
    mode = 0660
    user = {me}
  }}
  unix_listener {d}/auth-userdb {{
    mode = 0660
    user = {me}
  }}
}}
{lmtp_conf}"
        );
        let conf_path = dir.join("dovecot.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let out = std::fs::File::create(dir.join("dovecot.out")).unwrap();
        let master = Command::new(&bin)
            .arg("-F")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own group, so stopping it reaches every process it
            // forked.
            .process_group(0)
            .spawn()
            .expect("start dovecot");
        let pgid = master.id() as i32;
        let mut dc = Dovecot {
            dir: dir.to_path_buf(),
            master: Some(master),
            pgid,
        };
        wait_for("Dovecot's sockets", || {
            if let Some(Ok(Some(status))) = dc.master.as_mut().map(Child::try_wait) {
                panic!(
                    "dovecot exited ({status}): {}{}",
                    std::fs::read_to_string(dc.dir.join("dovecot.out")).unwrap_or_default(),
                    dc.log()
                );
            }
            let answers = |p: PathBuf| std::os::unix::net::UnixStream::connect(p).is_ok();
            (answers(dc.userdb()) && answers(dc.client()) && (!lmtp || answers(dc.lmtp())))
                .then_some(())
        });
        dc
    }

    /// Stops Dovecot and everything it started, and waits until none of
    /// it is left.
    fn stop(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        let group = Pid::from_raw(-self.pgid);
        let _ = kill(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while master.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever did not stop in time, and the master if it hung.
        let _ = kill(group, Signal::SIGKILL);
        let _ = master.wait();
        wait_for("Dovecot's processes to be gone", || {
            (!group_has_live_processes(self.pgid)).then_some(())
        });
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- dovecot log ----\n{}", self.log());
        }
        self.stop();
    }
}

/// The LMTP part of the config, with `dir/mail` made ready for it: the
/// mail is written as `nobody` when we are root (Dovecot will not write
/// mail as root: `first_valid_uid` is 500), else as us.
fn lmtp_conf(dir: &Path, me: &str) -> String {
    let (uid, gid) = if is_root() {
        let nobody = nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .expect("a user nobody");
        (nobody.uid.as_raw(), nobody.gid.as_raw())
    } else {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    };
    let mail = dir.join("mail");
    std::fs::create_dir_all(&mail).unwrap();
    std::os::unix::fs::chown(&mail, Some(uid), Some(gid)).unwrap();
    let d = dir.display();
    // mail_uid/mail_gid: the passwd-file has no uid fields. first_valid_uid
    // down to that uid, for a developer's uid below 500.
    // lmtp_save_to_detail_mailbox = no: ann+x@ goes to INBOX (tambo sends
    // the clean form anyway). The listener: deliverd connects as root in
    // CI, as us otherwise.
    format!(
        "mail_location = maildir:{d}/mail/%d/%n
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
lmtp_save_to_detail_mailbox = no
service lmtp {{
  unix_listener {d}/lmtp {{
    mode = 0660
    user = {me}
  }}
}}
"
    )
}

/// `dovecot` from PATH, else /usr/sbin's (a normal user's PATH may lack
/// it).
fn dovecot_bin() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("dovecot"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/dovecot"))
}

/// Whether any process in group `pgid` is still running (zombies of
/// orphans that a container's init never reaps do not count).
fn group_has_live_processes(pgid: i32) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| {
            // pid (comm) state ppid pgrp …; comm may hold spaces.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str())
        })
}

/// tambo with `dovecot_auth` on and Dovecot's two sockets, ann (who can
/// log in) and carol (receive-only) in the users file. Dovecot itself is
/// started by the caller, before or after.
fn setup(dovecot_dir: &Path) -> Tambo {
    let extra = format!(
        "dovecot_auth = true\ndovecot_userdb_path = \"{}\"\ndovecot_client_path = \"{}\"\n",
        dovecot_dir.join("auth-userdb").display(),
        dovecot_dir.join("auth-client").display()
    );
    let t = Tambo::new(&extra, "", "");
    std::fs::write(
        t.config_dir.join("domains").join(DOMAIN).join("users"),
        format!("ann {}\ncarol !\n", hash(ANN_PASSWORD)),
    )
    .unwrap();
    t
}

fn start(t: &mut Tambo) {
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
}

/// A fresh TLS session on the submission+TLS port, after EHLO.
fn tls(t: &Tambo) -> TlsSmtp {
    let mut c = TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Any)
        .expect("TLS handshake");
    c.expect("EHLO client.test", 250);
    c
}

fn auth(t: &Tambo, user: &str, password: &str) -> Reply {
    let mut c = tls(t);
    c.cmd(&format!("AUTH PLAIN {}", plain(user, password)))
}

#[test]
fn a_user_only_dovecot_knows_logs_in_and_gets_mail() {
    let root = tempfile::tempdir().unwrap();
    let dc = Dovecot::start(&root.path().join("dovecot"));
    let mut t = setup(&dc.dir);
    start(&mut t);
    t.wait_log("queued", "Dovecot fallback on");

    let mut c = tls(&t);
    let r = c.expect(
        &format!("AUTH PLAIN {}", plain("Dave@Example.TEST", DAVE_PASSWORD)),
        235,
    );
    assert!(r.text().starts_with("2.7.0 "), "{r:?}");
    // The sender bound to the login works for a Dovecot user too; the
    // RCPT is accepted because Dovecot's userdb knows dave (the clean
    // form: drops and suffix go).
    c.expect("MAIL FROM:<dave@example.test>", 250);
    c.expect("RCPT TO:<D.ave+box@example.test>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    c.expect("RCPT TO:<someone@elsewhere.example>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("from-dovecot", "hello from dave\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    // Delivered into dave's Maildir: the delivery-time "is a user" check
    // asked Dovecot too.
    let got = t.wait_maildir("dave", 1);
    assert!(
        String::from_utf8_lossy(&got[0]).contains("hello from dave"),
        "{:?}",
        String::from_utf8_lossy(&got[0])
    );
    t.wait_maildir("ann", 1);
    assert!(
        t.log("queued")
            .contains("authenticated as dave@example.test (checked by Dovecot)")
    );

    // A bare user name, with a SHA512-CRYPT password.
    let r = auth(&t, "erin", ERIN_PASSWORD);
    assert_eq!(r.code, 235, "{r:?}");
    // tambo's own users still log in from the file.
    let r = auth(&t, "ann@example.test", ANN_PASSWORD);
    assert_eq!(r.code, 235, "{r:?}");
    assert!(
        t.log("queued")
            .contains("authenticated as ann@example.test (checked by the users file)")
    );
    // carol is in the file (receive-only): the file's "no" is final, and
    // her Dovecot password is never tried.
    let r = auth(&t, "carol@example.test", CAROL_DOVECOT_PASSWORD);
    assert_eq!(r.code, 535, "{r:?}");

    // Passwords never reach a log.
    for name in ["queued", "smtpd", "deliverd"] {
        let log = t.log(name);
        for pw in [DAVE_PASSWORD, ERIN_PASSWORD, CAROL_DOVECOT_PASSWORD] {
            assert!(!log.contains(pw), "{name}'s log holds a password");
        }
    }
}

#[test]
fn wrong_passwords_and_unknown_users_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dc = Dovecot::start(&root.path().join("dovecot"));
    let mut t = setup(&dc.dir);
    start(&mut t);
    for (user, password) in [
        ("dave@example.test", "wrong"),
        ("nobody@example.test", DAVE_PASSWORD),
        ("nobody", DAVE_PASSWORD),
        // A domain with no directory at all: Dovecot is the only one to ask.
        ("dave@elsewhere.example", DAVE_PASSWORD),
    ] {
        let r = auth(&t, user, password);
        assert_eq!(r.code, 535, "{user}: {r:?}");
        assert!(r.text().starts_with("5.7.8 "), "{r:?}");
    }
    // Unknown to the files and to Dovecot: 550, on the plain SMTP port.
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<someone@elsewhere.example>", 250);
    let r = c.expect("RCPT TO:<nobody@example.test>", 550);
    assert!(r.text().starts_with("5.1.1 "), "{r:?}");
    // A bare name Dovecot knows logs in (above), but a domain-less
    // recipient stays unknown: no mailbox without a domain.
    c.expect("RCPT TO:<erin>", 550);
    c.expect("RCPT TO:<dave@example.test>", 250);
    assert!(!dc.log().contains("Fatal"), "{}", dc.log());
}

#[test]
fn a_stopped_dovecot_gives_quick_temporary_errors() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dovecot");
    std::fs::create_dir_all(&dir).unwrap();
    // tambo first: an unreachable Dovecot at startup is only a warning.
    let mut t = setup(&dir);
    start(&mut t);
    t.wait_log("queued", "Dovecot cannot be reached now");
    // Dovecot comes up later and is used from the next lookup on.
    let mut dc = Dovecot::start(&dir);
    let r = auth(&t, "dave@example.test", DAVE_PASSWORD);
    assert_eq!(r.code, 235, "{r:?}");

    dc.stop();
    let started = Instant::now();
    let r = auth(&t, "dave@example.test", DAVE_PASSWORD);
    assert_eq!(r.code, 454, "{r:?}");
    assert!(r.text().starts_with("4.7.0 "), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "AUTH took {:?} with Dovecot down",
        started.elapsed()
    );
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<someone@elsewhere.example>", 250);
    let r = c.expect("RCPT TO:<dave@example.test>", 451);
    assert!(r.text().starts_with("4.4.3 "), "{r:?}");
    // What the files know needs no Dovecot.
    c.expect("RCPT TO:<ann@example.test>", 250);
    let r = auth(&t, "ann@example.test", ANN_PASSWORD);
    assert_eq!(r.code, 235, "{r:?}");
    assert!(
        t.log("queued")
            .contains("cannot check a password for dave@example.test: Dovecot")
    );
}

/// tambo delivering local mail to Dovecot's LMTP socket (no Maildir of its
/// own), with users ann, bob and zed; zed is unknown to Dovecot.
fn setup_lmtp(dc: &Dovecot) -> Tambo {
    let t = Tambo::new(
        "",
        &format!(
            "lmtp_address = \"{}\"\nmaildir = \"\"\n",
            dc.lmtp().display()
        ),
        "",
    );
    std::fs::write(
        t.config_dir.join("domains").join(DOMAIN).join("users"),
        format!("ann {TEST_HASH}\nbob {TEST_HASH}\nzed {TEST_HASH}\n"),
    )
    .unwrap();
    t
}

/// Waits until a queued recipient's last failure contains `needle`.
fn wait_failure(t: &Tambo, needle: &str) -> String {
    wait_for(&format!("a queued failure mentioning {needle:?}"), || {
        t.queue_items().into_iter().find_map(|item| {
            item["recipients"].as_array()?.iter().find_map(|r| {
                let f = r["last_failure"].as_str()?;
                f.contains(needle).then(|| f.to_string())
            })
        })
    })
}

#[test]
fn lmtp_delivers_into_dovecots_mailboxes_with_per_recipient_replies() {
    let root = tempfile::tempdir().unwrap();
    let dc = Dovecot::start_lmtp(&root.path().join("dovecot"));
    let mut t = setup_lmtp(&dc);
    t.start_all();

    let r = t.send(
        "ann@example.test",
        &["ann@example.test", "bob@example.test", "zed@example.test"],
        &message("to-dovecot", "hello over LMTP\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");

    // bob's copy, as Dovecot stored it (with LF line ends, as Maildir
    // files have): its own headers on top of tambo's.
    let bob = dc.wait_maildir("bob", 1);
    let m = &bob[0];
    for want in [
        "Return-Path: <ann@example.test>\n",
        "Received: from mx.example.test\n\tby ",
        " with LMTP\n",
        "Received: from client.test ([127.0.0.1])\n\tby mx.example.test (tambo) with ESMTP",
        "Subject: to-dovecot\n",
        "\n\nhello over LMTP\n",
    ] {
        assert!(m.contains(want), "no {want:?} in {m}");
    }
    // ann gets the message and, from <>, the DSN for zed, whom Dovecot
    // refused at RCPT (a 5xx: bounced at once, not retried).
    let ann = dc.wait_maildir("ann", 2);
    let copy = ann
        .iter()
        .find(|m| m.contains("Subject: to-dovecot\n"))
        .expect("ann's copy");
    assert!(copy.contains("\n\nhello over LMTP\n"), "{copy}");
    let dsn = ann
        .iter()
        .find(|m| m.contains("Return-Path: <>\n"))
        .expect("a DSN in ann's mailbox");
    for want in [
        "Delivered-To: ann@example.test\n",
        "To: <ann@example.test>\n",
        "X-Failed-Recipients: zed@example.test\n",
        "Final-Recipient: rfc822; zed@example.test\n",
        "Status: 5.1.1\n",
        // Dovecot's own reply to RCPT, quoted.
        "Diagnostic-Code: smtp; RCPT TO: 550 5.1.1 <zed@example.test> User doesn't exist",
        "Subject: to-dovecot\n",
    ] {
        assert!(dsn.contains(want), "no {want:?} in the DSN: {dsn}");
    }
    // Nothing more comes: no retry, no second DSN.
    t.wait_queue_empty();
    assert_eq!(dc.maildir("ann").len(), 2);
    assert_eq!(dc.maildir("bob").len(), 1);
    assert!(dc.maildir("zed").is_empty());

    // Dovecot's side: ann's and bob's copies saved in one LMTP
    // transaction (Dovecot logs a recipient after the first with the
    // transaction's id and ":R<n>"), the DSN in another one.
    let log = dc.log();
    let saved = |user: &str, msgid: &str| -> String {
        log.lines()
            .find(|l| {
                l.contains(&format!("lmtp({user})<"))
                    && l.contains(&format!("msgid=<{msgid}>: saved mail to INBOX"))
            })
            .unwrap_or_else(|| panic!("no {user} {msgid} in Dovecot's log:\n{log}"))
            .to_string()
    };
    let transaction = |line: &str| -> String {
        // lmtp(user)<pid><id[:Rn]>: Info: …
        let id = line.split('<').nth(2).and_then(|r| r.split('>').next());
        let id = id.unwrap_or_else(|| panic!("no session id in {line:?}"));
        id.split(':').next().unwrap().to_string()
    };
    let ann_line = saved("ann@example.test", "to-dovecot@client.test");
    let bob_line = saved("bob@example.test", "to-dovecot@client.test");
    let dsn_id = dsn
        .lines()
        .find_map(|l| l.strip_prefix("Message-ID: <"))
        .and_then(|r| r.strip_suffix('>'))
        .unwrap_or_else(|| panic!("no Message-ID in the DSN: {dsn}"));
    let dsn_line = saved("ann@example.test", dsn_id);
    assert_eq!(transaction(&ann_line), transaction(&bob_line), "{log}");
    assert_ne!(transaction(&ann_line), transaction(&dsn_line), "{log}");
    assert!(!log.contains("Fatal") && !log.contains("Error"), "{log}");
}

#[test]
fn a_stopped_dovecot_only_delays_lmtp_delivery() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dovecot");
    let mut dc = Dovecot::start_lmtp(&dir);
    let mut t = setup_lmtp(&dc);
    t.start_all();
    dc.stop();

    let r = t.send(
        "ann@example.test",
        &["bob@example.test"],
        &message("while-down", "wait for me\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    // A connection error is temporary: bob stays queued, with the reason.
    let failure = wait_failure(&t, "connect: ");
    assert!(
        failure.ends_with("(LMTP)") && !failure.contains(&dc.lmtp().display().to_string()),
        "{failure}"
    );
    assert!(dc.maildir("bob").is_empty());

    // Dovecot back (same config, same mailboxes): the next retry delivers.
    dc = Dovecot::start_lmtp(&dir);
    let bob = dc.wait_maildir("bob", 1);
    assert!(bob[0].contains("Subject: while-down\n"), "{}", bob[0]);
    t.wait_queue_empty();
    // No bounce: ann got nothing.
    assert!(dc.maildir("ann").is_empty());
}
