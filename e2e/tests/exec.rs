//! What deliverd's children may do to it: MDAs and pipe commands that
//! leave processes behind, fail, or are still running when deliverd stops.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tambo_e2e::*;

/// Writes an executable shell script into the config dir.
fn script(t: &Tambo, name: &str, body: &str) -> PathBuf {
    let path = t.config_dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Makes `alias@example.test` pipe into `cmd`.
fn pipe_alias(t: &Tambo, alias: &str, cmd: &Path) {
    std::fs::write(
        t.config_dir.join("domains").join(DOMAIN).join("aliases"),
        format!("{alias}: | {}\n", cmd.display()),
    )
    .unwrap();
}

#[test]
fn a_background_child_does_not_hold_up_or_repeat_the_delivery() {
    let mut t = Tambo::default_setup();
    let (runs, bg) = (t.mail_dir.join("runs"), t.mail_dir.join("bg"));
    std::fs::create_dir_all(&t.mail_dir).unwrap();
    // The background sleep inherits the pipes deliverd reads the script's
    // output from, and holds them open long after the script exits.
    let cmd = script(
        &t,
        "leave-behind.sh",
        &format!(
            "cat >/dev/null
echo run >> {runs}
sleep 300 &
echo $! > {bg}.tmp; mv {bg}.tmp {bg}
exit 0\n",
            runs = runs.display(),
            bg = bg.display()
        ),
    );
    pipe_alias(&t, "counted", &cmd);
    t.start_all();
    let start = Instant::now();
    let r = t.send(
        "x@remote.example",
        &["counted@example.test"],
        &message("once", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_queue_empty();
    // Far below the 30 s MDA timeout: deliverd went on when the script
    // exited, not when its output pipes closed.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    t.wait_log("queued", "all done");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    let v = t.wait_var("one pipe attempt", |v| {
        v["chasquid/queue/deliverAttempts"]["pipe"] == 1
    });
    assert_eq!(v["chasquid/queue/dsnQueued"], 0);
    assert!(t.log("deliverd").contains("delivered (pipe)"));
    // Still running, and killed when deliverd stops.
    let bg = read_pid(&bg);
    assert!(!is_dead(bg));
    assert!(t.stop("deliverd").success());
    wait_dead("the background sleep", bg);
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "run\n",
        "run once only"
    );
}

#[test]
fn no_dsn_and_no_mailbox_for_a_local_sender_that_does_not_exist() {
    let mut t = Tambo::default_setup();
    let cmd = script(&t, "refuse.sh", "cat >/dev/null\necho refused\nexit 1\n");
    pipe_alias(&t, "refuser", &cmd);
    t.start_all();
    let r = t.send(
        "root@localhost",
        &["refuser@example.test"],
        &message("nodsn", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_log(
        "queued",
        "no DSN: the sender <root@localhost> is in a local domain but does not exist",
    );
    t.wait_queue_empty();
    let v = t.wait_var("the dropped DSN counted", |v| {
        v["tambo/queue/dsnDropped"] == 1
    });
    assert_eq!(v["chasquid/queue/dsnQueued"], 0);
    assert!(t.log("deliverd").contains("permanent failure (pipe)"));
    assert!(
        !t.mail_dir.join("localhost").exists(),
        "no mailbox is made up for root@localhost"
    );
}

#[test]
fn stopping_deliverd_kills_the_programs_it_runs() {
    let mut t = Tambo::new("", "maildir = \"\"", "");
    let d = t.dir.path().join("pids");
    std::fs::create_dir_all(&d).unwrap();
    let mda = script(
        &t,
        "mda.sh",
        &format!(
            "sleep 300 &
echo $! > {d}/bg.tmp; mv {d}/bg.tmp {d}/bg
echo $$ > {d}/mda.tmp; mv {d}/mda.tmp {d}/mda
sleep 300\n",
            d = d.display()
        ),
    );
    let conf = t.config_dir.join("tambo.conf");
    let text = std::fs::read_to_string(&conf).unwrap().replacen(
        "[tambo]",
        &format!(
            "mail_delivery_agent_bin = \"{}\"\nmail_delivery_agent_args = [\"%from%\", \"%to_user%\"]\n[tambo]",
            mda.display()
        ),
        1,
    );
    std::fs::write(&conf, text).unwrap();
    t.start_all();
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("stuck", "x\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let (mda, bg) = (read_pid(&d.join("mda")), read_pid(&d.join("bg")));
    assert!(t.stop("deliverd").success());
    wait_dead("the MDA", mda);
    wait_dead("its background child", bg);
    t.wait_log("deliverd", "killed 1 process group(s) still running");
}
