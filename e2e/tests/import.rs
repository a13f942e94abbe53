//! `tambo import-chasquid` on a config directory made the way a chasquid
//! operator makes one: users added by Debian's real `chasquid-util` (so
//! the salts and hashes are in the exact text Go's prototext writes),
//! aliases, certificates (one copied, one a link as to Let's Encrypt), a
//! DKIM key, a hook and a domaininfo record. After the import the users
//! log in to tambo with their chasquid passwords, `check-config` passes,
//! and chasquid's directory is exactly as it was.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tambo_e2e::tls::{TlsSmtp, Versions, plain};
use tambo_e2e::*;

/// Runs `tambo <args>`: exit code, stdout, stderr.
fn tambo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_dir().join("tambo"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a tool and panics with its output if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A self-signed certificate for `name` in `dir`, made with openssl as an
/// operator would; the key 0640, as a group-readable key is kept.
fn openssl_cert(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    run(Command::new(tool("openssl"))
        .args(["req", "-x509", "-nodes", "-days", "30"])
        .args([
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            &format!("subjectAltName=DNS:{name}"),
            "-keyout",
            &dir.join("privkey.pem").to_string_lossy(),
            "-out",
            &dir.join("fullchain.pem").to_string_lossy(),
        ]));
    std::fs::set_permissions(
        dir.join("privkey.pem"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
}

/// Every file under `dir` (links not followed): its mode, and its
/// contents or link target.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let data = if m.is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if m.is_dir() {
                todo.push(p.clone());
                Vec::new()
            } else {
                std::fs::read(&p).unwrap()
            };
            out.insert(p, (m.mode(), data));
        }
    }
    out
}

/// A chasquid config directory in `root/chasquid`, made with
/// chasquid-util where it can (Debian bookworm's is 1.11: no
/// `--receive_only`, no `dkim-keygen`).
fn chasquid_dir(root: &Path) -> PathBuf {
    let dir = root.join("chasquid");
    let domain = dir.join("domains").join(DOMAIN);
    std::fs::create_dir_all(&domain).unwrap();
    // A relative data_dir, so the domaininfo lands beside the new config
    // rather than in /var/lib/tambo.
    write(
        &dir.join("chasquid.conf"),
        "# chasquid's own comments stay behind.\n\
         hostname: \"mx.example.test\"\n\
         max_queue_items: 100\n\
         data_dir: \"data\"\n",
        0o644,
    );
    let util = tool("chasquid-util");
    let config = format!("-C={}", dir.display());
    for (user, pw) in [("ann", "secret"), ("dave", "pä$$ wörd")] {
        run(Command::new(&util).args([
            &config,
            "user-add",
            &format!("{user}@{DOMAIN}"),
            &format!("--password={pw}"),
        ]));
    }
    let users = domain.join("users");
    let help = Command::new(&util).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout) + String::from_utf8_lossy(&help.stderr);
    if help.contains("receive_only") {
        run(Command::new(&util).args([
            &config,
            "user-add",
            &format!("bob@{DOMAIN}"),
            "--receive_only",
        ]));
    } else {
        // What newer chasquid-util writes for --receive_only.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&users)
            .unwrap();
        writeln!(
            f,
            "users: {{\n  key: \"bob\"\n  value: {{\n    denied: {{}}\n  }}\n}}"
        )
        .unwrap();
    }
    // chasquid's test-only plain scheme: the one password that cannot be
    // carried over.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&users)
        .unwrap();
    writeln!(
        f,
        "users: {{ key: \"carol\" value: {{ plain: {{ password: \"x\" }} }} }}"
    )
    .unwrap();
    write(
        &domain.join("aliases"),
        "postmaster: ann\nteam: ann, bob\n",
        0o644,
    );
    run(Command::new(tool("openssl")).args([
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        &domain.join("dkim:sel1.pem").to_string_lossy(),
    ]));
    std::fs::set_permissions(
        domain.join("dkim:sel1.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    openssl_cert(
        &dir.join("certs").join("mx.example.test"),
        "mx.example.test",
    );
    // The other certificate lives where certbot keeps it, linked relatively.
    openssl_cert(
        &root.join("letsencrypt/live/smtp.example.test"),
        "smtp.example.test",
    );
    std::os::unix::fs::symlink(
        "../../letsencrypt/live/smtp.example.test",
        dir.join("certs/smtp.example.test"),
    )
    .unwrap();
    write(
        &dir.join("hooks/post-data"),
        "#!/bin/sh\necho X-Hooked: yes\n",
        0o750,
    );
    write(
        &dir.join("README"),
        "This directory contains chasquid's configuration.\n",
        0o644,
    );
    write(
        &dir.join("data/domaininfo/s:example.net"),
        "name:  \"example.net\"\noutgoing_sec_level:  TLS_SECURE\n",
        0o660,
    );
    write(&dir.join("data/queue/m:4f2a"), "a queued message\n", 0o600);
    dir
}

#[test]
fn a_chasquid_util_directory_imports_and_its_users_log_in() {
    let tmp = tempfile::tempdir().unwrap();
    let from = chasquid_dir(tmp.path());
    let before = snapshot(&from);
    let to = tmp.path().join("tambo");
    let to_s = to.to_string_lossy().into_owned();
    let (code, out, err) = tambo(&["import-chasquid", &from.to_string_lossy(), "--to", &to_s]);
    assert_eq!(code, 0, "{out}{err}");
    for needle in [
        "tambo.conf: hostname, max_queue_items, data_dir",
        "domain example.test: 2 aliases, 4 users (2 receive-only), 1 DKIM key",
        "certificate mx.example.test\n",
        "certificate smtp.example.test: a link to",
        "hooks: post-data",
        "domaininfo: 1 domain,",
        "not carried over: README (tambo does not read it)",
        "not carried over: the password of carol@example.test (chasquid's plain-text scheme",
        "not carried over: 1 message in chasquid's queue",
        "note: tambo lets an authenticated user send only as their own addresses",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    if is_root() {
        // The copies are root's, the daemons are not: modes that would
        // lock them out are named.
        for needle in [
            "dkim:sel1.pem is mode 0600: queued reads it as its own user",
            "hooks/post-data is mode 0750: deliverd reads it as its own user",
        ] {
            assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
        }
    }
    assert_eq!(snapshot(&from), before, "chasquid's directory was changed");

    // Passwords carried over: the users file's check, as queued makes it.
    let login = |user: &str, pw: &str| {
        tambo(&[
            "authenticate",
            "--config_dir",
            &to_s,
            &format!("{user}@{DOMAIN}"),
            &format!("--password={pw}"),
        ])
        .0
    };
    assert_eq!(login("ann", "secret"), 0);
    assert_eq!(login("dave", "pä$$ wörd"), 0);
    assert_eq!(login("ann", "Secret"), 1);
    assert_eq!(login("bob", "any"), 1);
    let domain = to.join("domains").join(DOMAIN);
    let users = std::fs::read_to_string(domain.join("users")).unwrap();
    assert!(users.contains("\nann $scrypt$ln=14,r=8,p=1$"), "{users}");
    assert!(
        users.contains("\nbob !\n") && users.contains("\ncarol !\n"),
        "{users}"
    );

    // Copied as they were, modes included; the link still points to
    // certbot's directory.
    let same = |a: &Path, b: &Path| {
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{}",
            b.display()
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(a), mode(b), "{}", b.display());
    };
    let src = from.join("domains").join(DOMAIN);
    same(&src.join("aliases"), &domain.join("aliases"));
    same(&src.join("dkim:sel1.pem"), &domain.join("dkim:sel1.pem"));
    for f in ["fullchain.pem", "privkey.pem"] {
        same(
            &from.join("certs/mx.example.test").join(f),
            &to.join("certs/mx.example.test").join(f),
        );
    }
    same(&from.join("hooks/post-data"), &to.join("hooks/post-data"));
    let link = std::fs::read_link(to.join("certs/smtp.example.test")).unwrap();
    assert!(link.is_absolute(), "{}", link.display());
    assert_eq!(
        std::fs::canonicalize(&link).unwrap(),
        std::fs::canonicalize(tmp.path().join("letsencrypt/live/smtp.example.test")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(to.join("data/domaininfo/s:example.net")).unwrap(),
        "name: \"example.net\"\noutgoing_sec_level: TLS_SECURE\n"
    );

    // It starts: check-config runs queued's own loading. The daemons'
    // users are the package's, which a test machine lacks: the tests' own.
    let conf = to.join("tambo.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{text}\n[tambo]\n{}", role_users())).unwrap();
    let (code, out, err) = tambo(&["check-config", "--config_dir", &to_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("domain example.test: 4 users, 2 aliases, 1 DKIM keys")
            && out.contains("certificates: 2"),
        "{out}"
    );

    // Nothing is overwritten by a second import.
    let (code, _, err) = tambo(&["import-chasquid", &from.to_string_lossy(), "--to", &to_s]);
    assert_eq!(code, 1);
    assert!(err.contains("exists; not overwriting it"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // And the real thing: AUTH on 465 against a running queued and smtpd
    // with the imported users file.
    let mut t = Tambo::default_setup();
    std::fs::copy(
        domain.join("users"),
        t.config_dir.join("domains").join(DOMAIN).join("users"),
    )
    .unwrap();
    t.start("queued");
    t.start("smtpd");
    let auth = |user: &str, pw: &str| {
        let mut s = TlsSmtp::connect_tls(t.submission_tls_addr(), "mx.example.test", Versions::Any)
            .unwrap();
        s.expect("EHLO client.test", 250);
        s.cmd(&format!("AUTH PLAIN {}", plain(user, pw))).code
    };
    assert_eq!(auth("ann@example.test", "secret"), 235);
    assert_eq!(auth("ann@example.test", "wrong"), 535);
    assert_eq!(auth("bob@example.test", "any"), 535);
}

#[test]
fn a_broken_chasquid_directory_is_refused_before_anything_is_written() {
    let (code, out, _) = tambo(&["import-chasquid", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage: tambo import-chasquid"), "{out}");

    let tmp = tempfile::tempdir().unwrap();
    let to = tmp.path().join("tambo");
    let import = |from: &Path| {
        tambo(&[
            "import-chasquid",
            &from.to_string_lossy(),
            "--to",
            &to.to_string_lossy(),
        ])
    };
    // Not a chasquid directory at all.
    let (code, _, err) = import(tmp.path());
    assert_eq!(code, 1);
    assert!(err.contains("chasquid.conf: cannot read"), "{err}");

    // A users file chasquid itself would refuse: one line naming it.
    let from = tmp.path().join("chasquid");
    write(
        &from.join("chasquid.conf"),
        "hostname: \"mx.example.test\"\n",
        0o644,
    );
    write(
        &from.join("domains").join(DOMAIN).join("users"),
        "users: {\n  key: \"ann\"\n  value: { scrypt: { salt: \"\\q\" } }\n}\n",
        0o640,
    );
    let (code, _, err) = import(&from);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("domains/{DOMAIN}/users:3: unknown escape")),
        "{err}"
    );
    assert!(!to.exists(), "nothing may be written");

    // A target inside chasquid's directory would change it.
    let (code, _, err) = tambo(&[
        "import-chasquid",
        &from.to_string_lossy(),
        "--to",
        &from.join("new").to_string_lossy(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("inside chasquid's directory"), "{err}");
}
