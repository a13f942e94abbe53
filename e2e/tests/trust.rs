//! Identity comes from the channel, not the claim: impostors on every IPC
//! socket, running as other users (the kernel tells the daemons their uid),
//! are refused in both directions, and no mail is lost or stolen.
//!
//! These need root, to run the impostor as another user; CI runs as root.
//! The test config (e2e/src/lib.rs) runs smtpd and monitord as `nobody`
//! (65534) and queued and deliverd as root, so:
//! - submit.sock is root:nogroup 0660 (queued serves, smtpd connects),
//! - deliver.sock is root:root 0660,
//! - monitor.sock is nobody 0666 (no `tambo` group on a test machine;
//!   monitord closes a stranger's connection as soon as it accepts it).

use std::os::unix::fs::PermissionsExt;

use tambo_e2e::*;

const NOBODY: u32 = 65534;
/// `daemon` (uid and gid 1) exists on every Debian system and plays no
/// role in the tests: a stranger.
const STRANGER: u32 = 1;

fn needs_root() -> bool {
    if !is_root() {
        eprintln!("skipped: impostors must run as other users, which needs root (CI is root)");
        return false;
    }
    true
}

#[test]
fn an_impostor_deliverd_gets_no_job_and_loses_no_mail() {
    if !needs_root() {
        return;
    }
    let mut t = Tambo::default_setup();
    t.start("monitord");
    t.start("queued");
    t.start("smtpd");
    // A message waits for a deliverd.
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("precious", "do not steal\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let sock = t.run_dir.join("deliver.sock");
    let sock = sock.to_str().unwrap();
    // smtpd's user cannot even open deliver.sock (root:root 0660).
    let out = peer_as(NOBODY, NOBODY, &["client", sock, "deliverd", "queued"]);
    assert!(out.starts_with("refused: Permission denied"), "{out}");
    // Past the file mode (in deliverd's group), the uid still gives it
    // away: queued refuses the claim, and hands out no job.
    let out = peer_as(NOBODY, 0, &["client", sock, "deliverd", "queued"]);
    assert!(out.starts_with("refused"), "{out}");
    assert!(out.contains("no job"), "{out}");
    t.wait_log(
        "queued",
        "deliver.sock: refused a connection: peer uid 65534 may not use this socket",
    );
    t.wait_var("the refusal counted", |v| {
        v["tambo/ipc/refused"]["deliver"].as_u64() >= Some(1)
    });
    // The real deliverd then delivers the message, once.
    t.start("deliverd");
    let msgs = t.wait_maildir("ann", 1);
    assert!(String::from_utf8_lossy(&msgs[0]).contains("do not steal"));
    t.wait_queue_empty();
    assert_eq!(t.maildir("ann").len(), 1);
}

#[test]
fn impostors_on_submit_and_monitor_sockets_are_refused() {
    if !needs_root() {
        return;
    }
    let mut t = Tambo::default_setup();
    t.start_all();
    let submit = t.run_dir.join("submit.sock");
    let submit = submit.to_str().unwrap();
    let monitor = t.run_dir.join("monitor.sock");
    let monitor = monitor.to_str().unwrap();
    // A stranger in smtpd's group passes the file mode, not the uid check.
    let out = peer_as(STRANGER, NOBODY, &["client", submit, "smtpd", "queued"]);
    assert!(out.starts_with("refused"), "{out}");
    t.wait_log(
        "queued",
        "submit.sock: refused a connection: peer uid 1 may not use this socket",
    );
    // smtpd's user may be smtpd (a compromised smtpd: queued still decides
    // every recipient, see ipc.rs), but not the admin CLI.
    let out = peer_as(NOBODY, NOBODY, &["client", submit, "ctl", "queued"]);
    assert!(out.starts_with("refused"), "{out}");
    t.wait_log("queued", "peer uid 65534 is not allowed to be Ctl");
    let out = peer_as(NOBODY, NOBODY, &["client", submit, "smtpd", "queued"]);
    assert_eq!(out.trim(), "accepted");
    // monitor.sock is open to all by mode; a stranger is closed before
    // its hello (whatever it claims), so it cannot forge counters.
    let out = peer_as(
        STRANGER,
        STRANGER,
        &["client", monitor, "queued", "monitord"],
    );
    assert!(out.starts_with("refused"), "{out}");
    t.wait_log(
        "monitord",
        "monitor.sock: refused a connection at once: uid 1 (pid",
    );
    // Through all of it, mail flows.
    let r = t.send(
        "x@remote.example",
        &["ann@example.test"],
        &message("after", "still served\r\n"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_maildir("ann", 1);
}

#[test]
fn clients_refuse_an_impostor_queued() {
    if !needs_root() {
        return;
    }
    let mut t = Tambo::default_setup();
    // A runtime dir anyone can write to: the impostor gets to bind queued's
    // socket paths before queued does.
    std::fs::create_dir_all(&t.run_dir).unwrap();
    std::fs::set_permissions(&t.run_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let marker = t.dir.path().join("pwned");
    let marker_s = marker.to_str().unwrap().to_string();
    let mut fakes = Vec::new();
    for name in ["submit", "deliver"] {
        let sock = t.run_dir.join(format!("{name}.sock"));
        let log = t.log_dir.join(format!("fake-{name}.log"));
        fakes.push(spawn_peer_as(
            STRANGER,
            STRANGER,
            &["serve", sock.to_str().unwrap(), "queued", &marker_s],
            &log,
        ));
        wait_for("the impostor to listen", || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("listening"))
        });
    }
    // (No monitord: root refuses to create sockets in a directory others
    // can write to, which is the point of this setup.)
    t.start("smtpd");
    // smtpd checks who listens on submit.sock before saying a word.
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    let r = c.expect("MAIL FROM:<x@remote.example>", 421);
    assert!(r.text().starts_with("4.3.0 "), "{r:?}");
    t.wait_log("smtpd", "peer uid 1 is not allowed to be Queued");
    // deliverd too: it would otherwise run the impostor's pipe command.
    t.start_until("deliverd", "cannot reach queued");
    let line = t.wait_log("deliverd", "cannot reach queued");
    assert!(
        line.contains("peer uid 1 is not allowed to be Queued"),
        "{line}"
    );
    let fake_log = t.log_dir.join("fake-deliver.log");
    wait_for("the impostor to see deliverd hang up", || {
        std::fs::read_to_string(&fake_log)
            .ok()
            .filter(|l| l.contains("client hung up"))
    });
    assert!(!marker.exists(), "deliverd ran the impostor's job");
    assert!(
        !t.log("deliverd").contains("pwned"),
        "deliverd took the impostor's job"
    );
    for mut f in fakes {
        let _ = f.kill();
        let _ = f.wait();
    }
}
