//! A real full disk: the data directory on a small tmpfs, filled. Clients
//! get a 4xx, never a 250; nothing half-written is left in the queue; once
//! space is freed, mail flows again with the same processes. Needs root
//! for the mount (CI is root).

use std::io::Write;
use std::process::Command;

use tambo_e2e::*;

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with one file, until it is full.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // Byte by byte, the last partial chunk's worth.
    while f.write_all(&[0]).is_ok() {}
    path
}

/// Sends `body` to ann; the reply that decided it (to DATA, or to the
/// end of the data).
fn try_send(t: &Tambo, body: &[u8]) -> Reply {
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<a@remote.test>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    let r = c.cmd("DATA");
    if r.code != 354 {
        return r;
    }
    c.send_raw(body);
    c.send_raw(b".\r\n");
    let r = c.reply();
    c.cmd("QUIT");
    r
}

#[test]
fn a_full_disk_gets_4xx_leaves_nothing_half_written_and_recovers() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI is root)");
        return;
    }
    let mut t = Tambo::default_setup();
    std::fs::create_dir_all(&t.data_dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs"])
        .arg(&t.data_dir)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    let _mounted = Mounted(t.data_dir.clone());
    t.start_all();
    let pids: Vec<u32> = ["smtpd", "queued", "deliverd"]
        .iter()
        .map(|d| t.pid(d))
        .collect();
    // Delivery works before.
    assert_eq!(
        t.send(
            "a@remote.test",
            &["ann@example.test"],
            &message("before", "x\r\n")
        )
        .code,
        250
    );
    t.wait_maildir("ann", 1);
    t.wait_queue_empty();

    let filler = fill(&t.data_dir);
    // A message larger than anything left: refused for now, at DATA or
    // after it, never accepted.
    let big = message("full", &"0123456789abcdef\r\n".repeat(16 * 1024));
    for _ in 0..3 {
        let r = try_send(&t, &big);
        assert_eq!(r.code, 451, "{r:?}");
        assert!(r.lines[0].starts_with("4.3.0 "), "{r:?}");
    }
    assert!(
        t.queue_files().is_empty(),
        "nothing half-written: {:?}",
        t.queue_files()
    );

    // One clear line per refusal in queued's log, naming the cause.
    let log = t.wait_log("queued", "No space left on device");
    assert!(!log.contains("panicked"), "{log}");

    // Space again: the same processes take mail.
    std::fs::remove_file(filler).unwrap();
    let r = try_send(&t, &big);
    assert_eq!(r.code, 250, "{r:?}");
    t.wait_maildir("ann", 2);
    t.wait_queue_empty();
    let now: Vec<u32> = ["smtpd", "queued", "deliverd"]
        .iter()
        .map(|d| t.pid(d))
        .collect();
    assert_eq!(pids, now, "no daemon was restarted");
}
