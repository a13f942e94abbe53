//! The admin CLI (REFERENCE §9) run as an operator runs it: `tambo
//! user-add`, `user-remove`, `authenticate`, `check-userdb`,
//! `print-config`, `check-config` on a config directory, each command's
//! `--help`, and the reloads that make an edit live without a restart (a
//! user added by the CLI logs in; a broken aliases file keeps the old
//! aliases).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use tambo_e2e::tls::{TlsSmtp, plain};
use tambo_e2e::*;

/// Runs `tambo <args>` with `stdin` on its standard input: exit code,
/// stdout, stderr.
fn tambo(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(bin_dir().join("tambo"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails before it reads: a broken pipe here is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn c(t: &Tambo) -> String {
    format!("--config_dir={}", t.config_dir.display())
}

#[test]
fn every_command_has_help() {
    for cmd in [
        "run",
        "dev",
        "user-add",
        "user-remove",
        "authenticate",
        "check-userdb",
        "print-config",
        "check-config",
        "dkim-keygen",
        "dkim-dns",
        "dkim-sign",
        "dkim-verify",
        "aliases-resolve",
        "domaininfo-remove",
        "queue",
        "import-chasquid",
        "sendmail",
        "mailq",
    ] {
        let (code, out, err) = tambo(&[cmd, "--help"], "");
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(out.contains(&format!("Usage: tambo {cmd}")), "{cmd}: {out}");
    }
    for sub in ["list", "flush", "remove"] {
        let (code, out, err) = tambo(&["queue", sub, "--help"], "");
        assert_eq!(code, 0, "{sub}: {err}");
        assert!(
            out.contains(&format!("Usage: tambo queue {sub}")),
            "{sub}: {out}"
        );
    }
    let (code, _, err) = tambo(&["no-such-command"], "");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Usage: tambo"), "{err}");
}

#[test]
fn users_are_managed_as_with_chasquid_util() {
    let t = Tambo::default_setup();
    let users = t.config_dir.join("domains").join(DOMAIN).join("users");
    // The file as the package leaves it: a group the daemon reads it as,
    // mode 0640, and an operator's comment.
    std::fs::write(&users, format!("# staff\nann {TEST_HASH}\n")).unwrap();
    std::os::unix::fs::chown(&users, Some(0), Some(65534)).unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o640)).unwrap();

    let (code, out, err) = tambo(
        &[
            "user-add",
            &c(&t),
            "Dave@Example.TEST",
            "--password=s3cret pw",
        ],
        "",
    );
    assert_eq!((code, out.as_str()), (0, "Added user\n"), "{err}");
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(
        text.starts_with(&format!(
            "# staff\nann {TEST_HASH}\ndave $scrypt$ln=14,r=8,p=1$"
        )),
        "{text}"
    );
    let m = std::fs::metadata(&users).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, 65534, 0o640));

    // The same check queued makes, by name in any case; the password from
    // standard input as a script gives it.
    let (code, out, _) = tambo(
        &[
            "authenticate",
            &c(&t),
            "dave@example.test",
            "--password=s3cret pw",
        ],
        "",
    );
    assert_eq!((code, out.as_str()), (0, "Authentication succeeded\n"));
    let (code, out, _) = tambo(
        &["authenticate", &c(&t), "DAVE@example.test"],
        "s3cret pw\n",
    );
    assert_eq!((code, out.as_str()), (0, "Authentication succeeded\n"));
    let (code, _, err) = tambo(
        &[
            "authenticate",
            &c(&t),
            "dave@example.test",
            "--password=wrong",
        ],
        "",
    );
    assert_eq!((code, err.as_str()), (1, "tambo: authentication failed\n"));

    // Replacing keeps one line per user; a receive-only user never logs in.
    let (code, _, err) = tambo(&["user-add", &c(&t), "dave@example.test"], "other\n");
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = tambo(
        &["user-add", &c(&t), "erin@example.test", "--receive_only"],
        "",
    );
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&users).unwrap();
    assert_eq!(text.matches("dave ").count(), 1, "{text}");
    assert!(text.ends_with("erin !\n"), "{text}");
    let (code, _, _) = tambo(
        &[
            "authenticate",
            &c(&t),
            "dave@example.test",
            "--password=other",
        ],
        "",
    );
    assert_eq!(code, 0);
    let (code, _, _) = tambo(
        &["authenticate", &c(&t), "erin@example.test", "--password="],
        "",
    );
    assert_eq!(code, 1);
    let (code, out, _) = tambo(&["check-userdb", &c(&t), "example.test"], "");
    assert_eq!((code, out.as_str()), (0, "Database loaded (3 users)\n"));

    let (code, out, _) = tambo(&["user-remove", &c(&t), "dave@example.test"], "");
    assert_eq!((code, out.as_str()), (0, "Removed user\n"));
    assert!(!std::fs::read_to_string(&users).unwrap().contains("dave"));

    // A new domain gets its directory, made like domains/.
    let (code, out, err) = tambo(
        &["user-add", &c(&t), "zoe@new.example", "--password=pw"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("Created domain directory "), "{out}");
    assert!(t.config_dir.join("domains/new.example/users").is_file());

    // Errors: one line on stderr, exit 1, and the file untouched.
    let before = std::fs::read(&users).unwrap();
    for (args, stdin, needle) in [
        (vec!["user-add", "ann", "--password=x"], "", "user@domain"),
        (
            vec!["user-add", "a b@example.test", "--password=x"],
            "",
            "invalid user name",
        ),
        (
            vec![
                "user-add",
                "ann@example.test",
                "--password=x",
                "--receive_only",
            ],
            "",
            "both",
        ),
        (vec!["user-add", "ann@example.test"], "\n", "empty"),
        (
            vec!["user-remove", "nobody@example.test"],
            "",
            "unknown user",
        ),
        (vec!["check-userdb", "nowhere.example"], "", "no such file"),
    ] {
        let mut full = vec![args[0]];
        let dir = c(&t);
        full.push(&dir);
        full.extend(&args[1..]);
        let (code, out, err) = tambo(&full, stdin);
        assert_eq!(code, 1, "{args:?}: {out}");
        assert!(
            err.starts_with("tambo: ") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(&users).unwrap(), before);

    // A users file queued would refuse is not edited: fix it first.
    std::fs::write(&users, "ann notahash\n").unwrap();
    let (code, _, err) = tambo(
        &["user-add", &c(&t), "bob@example.test", "--password=x"],
        "",
    );
    assert_eq!(code, 1);
    assert!(err.contains("users:1") && err.contains("fix it"), "{err}");
    assert_eq!(std::fs::read_to_string(&users).unwrap(), "ann notahash\n");
}

#[test]
fn print_config_prints_every_setting_and_reads_back() {
    let t = Tambo::default_setup();
    let (code, out, err) = tambo(&["print-config", &c(&t)], "");
    assert_eq!(code, 0, "{err}");
    // Defaults included.
    assert!(out.contains("max_data_size_mb = 50"), "{out}");
    assert!(out.contains("give_up_send_after = \"20h0m0s\""), "{out}");
    let loaded = tambo_common::config::Config::load(&t.config_dir, None).unwrap();
    let back = tambo_common::config::Config::from_str(&t.config_dir, Path::new("printed"), &out)
        .unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(back, loaded);
}

#[test]
fn check_config_says_what_startup_would() {
    let t = Tambo::default_setup();
    let domains = t.config_dir.join("domains");
    let check = || tambo(&["check-config", &c(&t)], "");
    let (code, out, err) = check();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("domain {DOMAIN}: 2 users, 2 aliases, 0 DKIM keys")),
        "{out}"
    );
    assert!(out.ends_with(": OK\n"), "{out}");

    // Not domains: left out, with one warning each, and still OK.
    for d in ["example.test.bak", "_template"] {
        std::fs::create_dir_all(domains.join(d)).unwrap();
    }
    let (code, _, err) = check();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("example.test.bak: looks like a backup copy, not a domain: ignored"),
        "{err}"
    );
    assert!(
        err.contains("_template: a hidden or template directory, not a domain: ignored"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.ends_with(": ignored")).count(),
        2,
        "{err}"
    );

    // Each of these stops startup: exit 1, and the line says which file.
    let users = domains.join(DOMAIN).join("users");
    let good = std::fs::read(&users).unwrap();
    // Each: how to break the config, how to mend it, what the error says.
    type Step<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(Step, Step, &str)> = vec![
        (
            Box::new(|| std::fs::create_dir_all(domains.join("example.test.")).unwrap()),
            Box::new(|| std::fs::remove_dir(domains.join("example.test.")).unwrap()),
            "rename it to example.test",
        ),
        (
            Box::new(|| std::fs::create_dir_all(domains.join("EXAMPLE.TEST")).unwrap()),
            Box::new(|| std::fs::remove_dir(domains.join("EXAMPLE.TEST")).unwrap()),
            "names the same domain as",
        ),
        (
            Box::new(|| {
                std::fs::write(
                    &users,
                    "ann $scrypt$ln=40,r=8,p=1$c2FsdA$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4\n",
                )
                .unwrap()
            }),
            Box::new(|| std::fs::write(&users, &good).unwrap()),
            "users:1",
        ),
    ];
    for (break_it, mend, needle) in cases {
        break_it();
        let (code, _, err) = check();
        assert_eq!(code, 1, "{needle}: {err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(err.ends_with("not a working configuration\n"), "{err}");
        mend();
    }
    // The config file itself: the line the daemons print.
    let conf = t.config_dir.join("tambo.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("max_data_size_mb = \"lots\"\n{text}")).unwrap();
    let (code, _, err) = check();
    assert_eq!(code, 1);
    assert!(
        err.contains("tambo.conf") && err.contains("max_data_size_mb"),
        "{err}"
    );
    std::fs::write(&conf, &text).unwrap();
    assert_eq!(check().0, 0);
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Logs in on port 465: the reply code of AUTH PLAIN.
fn auth(t: &Tambo, user: &str, password: &str) -> u16 {
    let mut s = TlsSmtp::connect_tls(
        t.submission_tls_addr(),
        "mx.example.test",
        tambo_e2e::tls::Versions::Any,
    )
    .unwrap();
    s.expect("EHLO client.test", 250);
    s.cmd(&format!("AUTH PLAIN {}", plain(user, password))).code
}

#[test]
fn edits_go_live_at_the_next_reload_and_a_broken_file_keeps_the_old_data() {
    let mut t = Tambo::new("", "", "reload_period = \"200ms\"\n");
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");
    assert_eq!(auth(&t, "dave@example.test", "s3cret"), 535);

    // A user added by the CLI logs in, with no restart and no signal.
    let (code, _, err) = tambo(
        &["user-add", &c(&t), "dave@example.test", "--password=s3cret"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    wait_for("the reload", || {
        (count(&t.log("queued"), "users and aliases reloaded") >= 1).then_some(())
    });
    assert_eq!(auth(&t, "dave@example.test", "s3cret"), 235);

    // A broken aliases file: one line, the old aliases still deliver.
    let aliases = t.config_dir.join("domains").join(DOMAIN).join("aliases");
    let good = std::fs::read_to_string(&aliases).unwrap();
    std::fs::write(&aliases, format!("{good}sales bob\n")).unwrap();
    t.wait_log(
        "queued",
        "users and aliases not reloaded, keeping the previous ones",
    );
    assert!(t.log("queued").contains("aliases:3"), "{}", t.log("queued"));
    t.wait_var("reloadErrors", |v| {
        v["tambo/config/reloadErrors"]["domains"] == 1
    });
    assert_eq!(
        t.send(
            "a@remote.test",
            &["team@example.test"],
            &message("s", "b\r\n")
        )
        .code,
        250
    );
    t.wait_maildir("bob", 1);
    let reloaded = count(&t.log("queued"), "users and aliases reloaded");

    // Mended: the new alias is live.
    std::fs::write(&aliases, format!("{good}sales: bob\n")).unwrap();
    wait_for("the reload after the fix", || {
        (count(&t.log("queued"), "users and aliases reloaded") > reloaded).then_some(())
    });
    assert_eq!(
        t.send(
            "a@remote.test",
            &["sales@example.test"],
            &message("s", "b\r\n")
        )
        .code,
        250
    );
    t.wait_maildir("bob", 2);
    // The broken file was reported once, not once per period it stayed.
    assert_eq!(count(&t.log("queued"), "not reloaded"), 1);
}

#[test]
fn aliases_resolve_and_domaininfo_remove_ask_the_running_queued() {
    let mut t = Tambo::default_setup();
    // A domain information record, as queued keeps them.
    let info = t.data_dir.join("domaininfo");
    std::fs::create_dir_all(&info).unwrap();
    std::fs::write(
        info.join("s:secure.example"),
        "name: \"secure.example\"\noutgoing_sec_level: TLS_SECURE\n",
    )
    .unwrap();
    // Not running yet: one line saying so.
    let (code, _, err) = tambo(&["aliases-resolve", &c(&t), "team@example.test"], "");
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the running queued at "), "{err}");
    t.start("monitord");
    t.start("queued");

    let (code, out, err) = tambo(&["aliases-resolve", &c(&t), "Team@Example.TEST"], "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "(email)    ann@example.test\n(email)    bob@example.test\n"
    );
    let (code, out, _) = tambo(
        &["aliases-resolve", &c(&t), "someone@elsewhere.example"],
        "",
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "(email)    someone@elsewhere.example\n")
    );

    let (code, out, err) = tambo(&["domaininfo-remove", &c(&t), "Secure.Example"], "");
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    let record = std::fs::read_to_string(info.join("s:secure.example")).unwrap();
    assert!(!record.contains("sec_level"), "{record}");
    let (code, _, err) = tambo(&["domaininfo-remove", &c(&t), "unknown.example"], "");
    assert_eq!(code, 1);
    assert_eq!(err, "tambo: no domain information for unknown.example\n");
    // Every admin request is in queued's log, with who asked.
    t.wait_log("queued", "admin request: DomaininfoRemove");
}

#[test]
fn the_queue_is_listed_flushed_and_emptied_by_hand() {
    // Mail to hold@ stays: its delivery fails for now, every time.
    let (mut t, script) = Tambo::holding();
    t.start_all();
    t.wait_log("smtpd", "TLS ready with");

    let held = |subject: &str| {
        assert_eq!(
            t.send(
                "ann@example.test",
                &["hold@example.test"],
                &message(subject, "x\r\n")
            )
            .code,
            250
        );
    };
    held("first");
    held("second");
    let attempts = |t: &Tambo| count(&t.log("queued"), "failed (temporary)");
    wait_for("two first attempts", || (attempts(&t) >= 2).then_some(()));

    // The listing shows each item as of its last round: wait for both
    // first rounds to be in it.
    let list = wait_for("both items after their first round", || {
        let (code, list, _) = tambo(&["queue", &c(&t)], "");
        (code == 0 && list.matches("exited with 75").count() == 2).then_some(list)
    });
    assert!(list.starts_with("# Queue status\n\ndate: "), "{list}");
    assert!(list.contains("length: 2\n"), "{list}");
    let ids: Vec<String> = list
        .lines()
        .filter_map(|l| l.strip_prefix("## Item "))
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(
        list.contains("from: ann@example.test\nto: [hold@example.test]\n"),
        "{list}"
    );
    assert!(
        list.contains(&format!("PENDING {} (PIPE)\n", script.display())),
        "{list}"
    );
    assert!(
        list.contains("  original address: hold@example.test\n"),
        "{list}"
    );
    assert!(list.contains("exited with 75"), "{list}");

    // Flush: another attempt now, not in an hour.
    let (code, out, _) = tambo(&["queue", &c(&t), "flush", &ids[0]], "");
    assert_eq!((code, out), (0, format!("{}: trying now\n", ids[0])));
    wait_for("a third attempt", || (attempts(&t) >= 3).then_some(()));
    let (code, _, err) = tambo(&["queue", &c(&t), "flush", "noSuchItem"], "");
    assert_eq!(
        (code, err.as_str()),
        (1, "tambo: no item noSuchItem in the queue\n")
    );

    // Remove with a DSN: the sender hears of it.
    let (code, out, _) = tambo(&["queue", &c(&t), "remove", &ids[0]], "");
    assert_eq!(
        (code, out),
        (0, format!("{}: removing; the sender gets a DSN\n", ids[0]))
    );
    let dsn = t.wait_maildir("ann", 1);
    let dsn = String::from_utf8_lossy(&dsn[0]).into_owned();
    assert!(
        dsn.contains("removed from the queue by the administrator"),
        "{dsn}"
    );
    // Silently: gone, and no DSN.
    let (code, out, _) = tambo(&["queue", &c(&t), "remove", "--silent", &ids[1]], "");
    assert_eq!(
        (code, out),
        (0, format!("{}: removing, without a DSN\n", ids[1]))
    );
    t.wait_queue_empty();
    wait_for("an empty listing", || {
        let (_, list, _) = tambo(&["queue", &c(&t), "list"], "");
        list.contains("length: 0\n").then_some(())
    });
    assert!(!t.log("queued").contains(&format!("{} DSN queued", ids[1])));
    assert_eq!(t.maildir("ann").len(), 1);
}

/// `tambo dkim-sign` prints the field queued would add; an independent
/// verifier (dkimpy) accepts it, with the record `tambo dkim-dns` prints.
#[test]
fn dkim_sign_prints_a_signature_dkimpy_verifies() {
    let t = Tambo::default_setup();
    let (name, record) = dkim_key(&t, DOMAIN, "sel1");
    let msg = "From: Ann <ann@example.test>\nTo: bob@elsewhere.example\nSubject: signed by hand\nDate: Tue, 1 Dec 2026 12:00:00 +0000\n\nbody line\n";
    let (code, field, err) = tambo(&["dkim-sign", &c(&t)], msg);
    assert_eq!(code, 0, "{err}");
    assert!(
        field.starts_with("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;"),
        "{field}"
    );
    assert!(
        field.contains(&format!("d={DOMAIN};")) && field.contains("s=sel1;"),
        "{field}"
    );
    let signed = format!("{field}{}", msg.replace('\n', "\r\n"));
    assert!(dkimpy_verifies(
        signed.as_bytes(),
        &[(name.clone(), record.clone())]
    ));
    // Changed after signing: dkimpy says no.
    let tampered = signed.replace("body line", "body line!");
    assert!(!dkimpy_verifies(
        tampered.as_bytes(),
        &[(name, record.clone())]
    ));
    // dkim-verify, deliverd's verifier, with the record given: the same
    // verdicts, as the Authentication-Results header it would add.
    let txt = format!("--txt={record}");
    let (code, out, err) = tambo(&["dkim-verify", &c(&t), &txt], &signed);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("Authentication-Results: mx.example.test;\r\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!("dkim=pass header.d={DOMAIN}")),
        "{out}"
    );
    let (_, out, _) = tambo(&["dkim-verify", &c(&t), &txt], &tampered);
    assert!(out.contains("dkim=fail"), "{out}");
    let (_, out, _) = tambo(&["dkim-verify", &c(&t), &txt], msg);
    assert!(out.contains("dkim=none"), "{out}");
    // No From: domain and none given: one line saying so.
    let (code, _, err) = tambo(&["dkim-sign", &c(&t)], "Subject: x\n\nbody\n");
    assert_eq!(code, 1);
    assert!(err.contains("give the domain"), "{err}");
    // A domain without keys.
    let (code, _, err) = tambo(&["dkim-sign", &c(&t), DOMAIN, "nokey"], msg);
    assert_eq!(code, 1);
    assert!(err.contains("dkim:nokey.pem"), "{err}");
}
