//! packaging/: the systemd units, and the sysusers.d and tmpfiles.d files,
//! checked with systemd's own tools on the files: each unit's exposure
//! score, the names the sockets hand over, and each role's state made its
//! own; then the Debian package, installed on a copy of this system and
//! booted under a real systemd in a container, where mail flows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// `systemd-analyze security --offline=true` of a unit: its overall
/// exposure, 0.0 (best) to 10.0, and the whole report.
fn exposure(unit: &Path) -> (f64, String) {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score for {}: {text}", unit.display()));
    let score = line
        .split(": ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad score line {line:?}"));
    (score, text)
}

#[test]
fn each_service_keeps_its_exposure_score() {
    // queued and monitord have no network at all. smtpd resolves (SPF) and
    // deliverd sends mail out: both need the host's network, and make up
    // for it with PrivateUsers= (and deliverd an address allow list).
    for (unit, ceiling) in [
        ("tambo-queued.service", 0.4),
        ("tambo-monitord.service", 0.4),
        ("tambo-smtpd.service", 0.9),
        ("tambo-deliverd.service", 1.0),
    ] {
        let path = packaging().join("systemd").join(unit);
        let (score, report) = exposure(&path);
        assert!(score <= ceiling, "{unit}: {score} > {ceiling}");
        // The system call filter is an allow list: the first
        // SystemCallFilter= line sets the mode, and a deny line first
        // would have turned the rest upside down.
        assert!(
            report.contains("System call allow list defined"),
            "{unit}: {report}"
        );
        assert!(!report.contains("System call deny list defined"), "{unit}");
        let first = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("SystemCallFilter="))
            .map(str::to_string);
        assert!(
            first
                .as_deref()
                .is_some_and(|l| l.starts_with("SystemCallFilter=@system-service")),
            "{unit}: {first:?}"
        );
        // Each daemon locks itself down further once started, which needs
        // these calls (in no group); and systemd's filter is in place
        // before it executes the daemon, so it must allow execve.
        let first = first.unwrap_or_default();
        for call in [
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
            "seccomp",
        ] {
            assert!(
                first.split_whitespace().any(|w| w == call),
                "{unit}: {call}"
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().filter(|l| l.starts_with("SystemCallFilter=~")) {
            assert!(!line.contains("execve"), "{unit}: {line}");
        }
    }
}

/// `Key=value` lines of a unit file.
fn keys(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn systemd_reads_every_unit_without_a_complaint() {
    // `systemd-analyze verify` knows every key of this systemd: a key it
    // does not know would be ignored at boot without a word. Only the
    // daemons' binaries are missing here (they are not installed).
    let dir = packaging().join("systemd");
    let mut units: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    units.sort();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .current_dir(&dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let complaints: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("is not executable: No such file or directory"))
        .collect();
    assert!(complaints.is_empty(), "{}", complaints.join("\n"));
    assert!(units.len() >= 12, "{units:?}");
}

#[test]
fn sockets_hand_each_daemon_the_names_it_looks_for() {
    let dir = packaging().join("systemd");
    // The names the daemons take (tambo_common::sockets, config.rs).
    for (socket, name, service) in [
        ("tambo-smtp.socket", "smtp", "tambo-smtpd.service"),
        (
            "tambo-submission.socket",
            "submission",
            "tambo-smtpd.service",
        ),
        (
            "tambo-submission-tls.socket",
            "submission_tls",
            "tambo-smtpd.service",
        ),
        ("tambo-submit.socket", "submit", "tambo-queued.service"),
        ("tambo-deliver.socket", "deliver", "tambo-queued.service"),
        ("tambo-local.socket", "local", "tambo-queued.service"),
        ("tambo-monitor.socket", "monitor", "tambo-monitord.service"),
        (
            "tambo-monitoring.socket",
            "monitoring",
            "tambo-monitord.service",
        ),
    ] {
        let k = keys(&dir.join(socket));
        assert_eq!(k["FileDescriptorName"], name, "{socket}");
        assert_eq!(k["Service"], service, "{socket}");
        let svc = keys(&dir.join(service));
        let listed = svc["Sockets"].split_whitespace().any(|s| s == socket);
        if socket == "tambo-monitoring.socket" {
            // Opt-in: Sockets= would pull it in with monitord, and serve
            // monitoring on every install. Its Service= hands it over when
            // enabled; the ordering lets a restart free the port first.
            assert!(!listed, "{service} must not pull in {socket}");
            assert!(
                svc["After"].split_whitespace().any(|s| s == socket),
                "{service} after {socket}"
            );
        } else {
            assert!(listed, "{service} lists {socket}");
        }
    }
    for (n, ipc) in [
        ("submit", tambo_common::sockets::IpcSocket::Submit),
        ("deliver", tambo_common::sockets::IpcSocket::Deliver),
        ("monitor", tambo_common::sockets::IpcSocket::Monitor),
        ("local", tambo_common::sockets::IpcSocket::Local),
    ] {
        assert_eq!(ipc.name(), n);
    }
    // Every daemon reports readiness (sd_notify), as Type=notify expects.
    for service in [
        "tambo-smtpd",
        "tambo-queued",
        "tambo-deliverd",
        "tambo-monitord",
    ] {
        let k = keys(&dir.join(format!("{service}.service")));
        assert_eq!(k["Type"], "notify", "{service}");
        assert_eq!(
            k["ExecStart"].split_whitespace().next(),
            Some(format!("/usr/sbin/{service}").as_str())
        );
    }
}

#[test]
fn sysusers_and_tmpfiles_give_each_role_its_own_state() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let ok = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(packaging().join("sysusers.d/tambo.conf"))
        .status()
        .unwrap();
    assert!(ok.success());
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let uid = |name: &str| -> u32 {
        passwd
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .and_then(|l| l.split(':').nth(2))
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{name} not made: {passwd}"))
    };
    let users: HashMap<&str, u32> = [
        "tambo-smtpd",
        "tambo-queue",
        "tambo-deliver",
        "tambo-monitor",
    ]
    .iter()
    .map(|n| (*n, uid(n)))
    .collect();
    let mut distinct: Vec<u32> = users.values().copied().collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "one uid per role");
    let ok = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(packaging().join("tmpfiles.d/tambo.conf"))
        .status()
        .unwrap();
    assert!(ok.success());
    use std::os::unix::fs::MetadataExt;
    let lib = root.path().join("var/lib/tambo");
    for (dir, owner, mode) in [
        ("", None, 0o711),
        ("queue", Some("tambo-queue"), 0o700),
        ("domaininfo", Some("tambo-queue"), 0o700),
        ("sts-cache", Some("tambo-deliver"), 0o700),
        ("mail", Some("tambo-deliver"), 0o700),
    ] {
        let m = std::fs::metadata(lib.join(dir)).unwrap();
        assert_eq!(m.mode() & 0o777, mode, "{dir}");
        assert_eq!(m.uid(), owner.map_or(0, |o| users[o]), "{dir}");
    }
}

#[test]
fn the_deb_holds_everything_and_its_man_pages_render() {
    let out = Command::new("bash")
        .arg(packaging().join("deb/build.sh"))
        .arg(tambo_e2e::bin_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let pages = [
        "usr/share/man/man8/tambo.8.gz",
        "usr/share/man/man5/tambo.conf.5.gz",
        "usr/share/man/man8/tambo-smtpd.8.gz",
        "usr/share/man/man8/tambo-queued.8.gz",
        "usr/share/man/man8/tambo-deliverd.8.gz",
        "usr/share/man/man8/tambo-monitord.8.gz",
    ];
    let mut wanted = vec![
        "usr/sbin/tambo",
        "usr/sbin/tambo-smtpd",
        "usr/sbin/tambo-queued",
        "usr/sbin/tambo-deliverd",
        "usr/sbin/tambo-monitord",
        "lib/systemd/system/tambo.target",
        "lib/systemd/system/tambo-smtpd.service",
        "lib/systemd/system/tambo-queued.service",
        "lib/systemd/system/tambo-deliverd.service",
        "lib/systemd/system/tambo-monitord.service",
        "lib/systemd/system/tambo-smtp.socket",
        "lib/systemd/system/tambo-submit.socket",
        "usr/lib/sysusers.d/tambo.conf",
        "usr/lib/tmpfiles.d/tambo.conf",
        "etc/tambo/tambo.conf",
        "etc/fail2ban/filter.d/tambo.conf",
    ];
    wanted.extend(pages);
    for f in wanted {
        assert!(
            listing.contains(&format!("./{f}\n")),
            "{f} not in the package:\n{listing}"
        );
    }
    let field = |name: &str| {
        let o = Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg(name)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "tambo");
    assert!(field("Provides").contains("mail-transport-agent"));
    let root = tempfile::tempdir().unwrap();
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root.path())
        .status()
        .unwrap();
    assert!(ok.success());
    // Each page renders, with no warning from man or groff.
    for page in pages {
        let o = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(root.path().join(page))
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let warnings = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && warnings.is_empty(),
            "{page}: {warnings}"
        );
        assert!(
            text.contains("NAME") && text.contains("SEE ALSO"),
            "{page}: {text}"
        );
    }
    // The default configuration is one tambo accepts.
    let conf = tambo_common::config::Config::load(&root.path().join("etc/tambo"), None)
        .unwrap_or_else(|e| panic!("the packaged tambo.conf: {e}"));
    assert_eq!(conf.data_dir, PathBuf::from("/var/lib/tambo"));
    installs_on_a_copy_of_this_system(&deb);
    starts_under_systemd(&deb);
}

/// `dpkg -i` in a throwaway copy of this (Debian) system: an overlay of /
/// in a mount namespace of its own, so the host is never touched. The
/// maintainer scripts must create the users and the state directories.
fn installs_on_a_copy_of_this_system(deb: &Path) {
    if !tambo_e2e::is_root() {
        eprintln!("skipped the install: needs root for a mount namespace (CI is root)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let script = r#"
set -eu
S=$1; DEB=$2
mount -t tmpfs tmpfs "$S"
mkdir -p "$S/upper" "$S/work" "$S/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" "$S/root"
mount -t proc proc "$S/root/proc"
mount --rbind /dev "$S/root/dev"
cp "$DEB" "$S/root/tmp/tambo.deb"
# An MTA already there (the test machine may have one) is apt's business,
# not this test's: conflicts are forced.
chroot "$S/root" dpkg -i --force-conflicts /tmp/tambo.deb
chroot "$S/root" sh -c '
  getent passwd tambo-smtpd tambo-queue tambo-deliver tambo-monitor | cut -d: -f1 | tr "
" " "; echo
  stat -c "%U %a %n" /var/lib/tambo/queue /var/lib/tambo/domaininfo /var/lib/tambo/sts-cache /var/lib/tambo/mail
  stat -c "%U:%G %a %n" /etc/tambo/certs /etc/tambo/domains
  dpkg-query -W -f "\${Status}
" tambo
  test -f /lib/systemd/system/tambo.target && echo "units installed"
  echo "target $(systemctl is-enabled tambo.target 2>&1)"
  update-alternatives --query sendmail | grep -q "^Value: /usr/sbin/tambo" && echo "sendmail alternative"
  /usr/sbin/tambo --version >/dev/null && echo "tambo runs"
'
"#;
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            script,
            "install",
        ])
        .arg(scratch.path())
        .arg(deb)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(
        text.contains("tambo-smtpd tambo-queue tambo-deliver tambo-monitor"),
        "{text}"
    );
    for line in [
        "tambo-queue 700 /var/lib/tambo/queue",
        "tambo-queue 700 /var/lib/tambo/domaininfo",
        "tambo-deliver 700 /var/lib/tambo/sts-cache",
        "tambo-deliver 700 /var/lib/tambo/mail",
        "root:tambo-queue 750 /etc/tambo/certs",
        "root:tambo-queue 750 /etc/tambo/domains",
        "install ok installed",
        "units installed",
        "target enabled",
        "sendmail alternative",
        "tambo runs",
    ] {
        assert!(text.contains(line), "{line} not in:\n{text}\n{err}");
    }
    // The host saw none of it.
    assert!(
        nix::unistd::User::from_name("tambo-queue")
            .unwrap()
            .is_none()
    );
}

/// The package on a Debian that boots under a real systemd (nspawn over a
/// throwaway overlay of the root scripts/test.sh debootstraps): the
/// units start the four daemons, each as its own user with nothing left
/// and locked down; a message reaches the Maildir and monitord's
/// counters; a peer of the wrong uid is refused on each socket; a restart
/// brings everything back.
fn starts_under_systemd(deb: &Path) {
    if !tambo_e2e::is_root() {
        eprintln!("skipped the boot: needs root for a container (CI is root)");
        return;
    }
    let rootfs = tambo_e2e::bin_dir().join("../debian/rootfs");
    assert!(
        rootfs.join(".complete").exists(),
        "no Debian root at {}: scripts/test.sh makes it (debootstrap)",
        rootfs.display()
    );
    let stage = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("support/systemd-boot.sh"))
        .arg(&rootfs)
        .arg(deb)
        .arg(tambo_e2e::bin_dir().join("tambo-test-peer"))
        .arg(stage.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = format!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");
    let fact = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no {key:?} in:\n{all}"))
            .trim()
            .to_string()
    };
    assert_eq!(fact("booted"), "running", "{all}");
    assert_eq!(fact("enabled"), "enabled", "{all}");
    for d in ["smtpd", "queued", "deliverd", "monitord"] {
        assert_eq!(fact(&format!("{d} active")), "active", "{all}");
    }
    assert_eq!(fact("rcpt"), "250 2.1.5 Ok", "{all}");
    assert!(fact("data").starts_with("250 2.0.0"), "{all}");
    assert_eq!(
        fact("maildir"),
        "1 in /var/lib/tambo/mail/example.org/ann",
        "{all}"
    );
    assert_eq!(fact("sendmail link"), "/usr/sbin/tambo", "{all}");
    assert_eq!(fact("sendmail root"), "0", "{all}");
    assert_eq!(fact("sendmail nobody"), "0", "{all}");
    assert_eq!(fact("after sendmail"), "3", "{all}");
    assert_eq!(
        fact("sendmail received"),
        "from local user nobody (uid 65534) from local user root (uid 0)",
        "{all}"
    );
    assert_eq!(fact("putCount"), "3", "{all}");
    // The mail log's default, <syslog>: queued reaches the journal's
    // /dev/log from inside its unit.
    assert_eq!(fact("syslog queued lines"), "3", "{all}");
    for (d, user) in [
        ("smtpd", "tambo-smtpd"),
        ("queued", "tambo-queue"),
        ("deliverd", "tambo-deliver"),
        ("monitord", "tambo-monitor"),
    ] {
        let p = fact(&format!("{d} process"));
        assert!(p.starts_with(&format!("{user} ")), "{d}: {p}");
        for set in ["CapPrm", "CapEff", "CapBnd"] {
            assert!(p.contains(&format!("{set}: 0000000000000000")), "{d}: {p}");
        }
        assert!(p.contains("NoNewPrivs: 1"), "{d}: {p}");
        assert_eq!(
            fact(&format!("{d} lockdown")),
            "locked down (Landlock fully enforced, seccomp on)",
            "{d}: {all}"
        );
        // smtpd and deliverd in a user namespace of their own that maps
        // only root and their own uid; queued and monitord see every uid.
        let map = fact(&format!("{d} uid_map"));
        let lines: Vec<&str> = map.split_whitespace().collect();
        if d == "smtpd" || d == "deliverd" {
            assert_eq!(lines.len(), 2, "{d}: {map}");
            assert_eq!(lines[0], "0-0-1", "{d}: {map}");
            let own: Vec<&str> = lines[1].split('-').collect();
            assert!(
                own.len() == 3 && own[0] == own[1] && own[2] == "1",
                "{d}: {map}"
            );
        } else {
            assert_eq!(lines, ["0-0-4294967295"], "{d}: {map}");
        }
    }
    for peer in [
        "peer submit nobody",
        "peer deliver nobody",
        "peer deliver smtpd-user",
        "peer monitor nobody",
    ] {
        assert!(fact(peer).starts_with("refused"), "{peer}: {all}");
    }
    // The control: the right user is let in under the same units.
    assert_eq!(fact("peer submit smtpd-user"), "accepted", "{all}");
    // Refused by the uid check (the group let them past the mode), and
    // logged by the daemon that refused: nobody on submit.sock and
    // monitor.sock, smtpd's user claiming deliverd on deliver.sock.
    let smtpd_uid = fact("smtpd uid");
    for (socket, uid) in [
        ("submit.sock", "65534"),
        ("deliver.sock", smtpd_uid.as_str()),
        ("monitor.sock", "65534"),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with("refusal: ")
                && l.contains(socket)
                && l.contains(&format!("uid {uid} "))),
            "{socket}: {all}"
        );
    }
    assert_eq!(
        fact("after restart").split_whitespace().collect::<Vec<_>>(),
        vec!["active"; 8],
        "{all}"
    );
    assert_eq!(fact("failed units"), "0", "{all}");
}
