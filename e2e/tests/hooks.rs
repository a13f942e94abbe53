//! Hooks (REFERENCE §6), run by deliverd on queued's behalf: post-data
//! (headers, exit codes, environment, output validation, timeouts),
//! alias-resolve and alias-exists, tambo's rcpt hook, and what happens
//! when deliverd is not there to run them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tambo_e2e::dns::TestDns;
use tambo_e2e::{DOMAIN, Tambo, message, wait_dead, wait_for};

/// A tambo whose every lookup goes to `dns`, where `sender.example`
/// passes SPF from loopback; hooks time out after `hook_timeout`.
fn setup(dns: &TestDns, hook_timeout: &str) -> Tambo {
    dns.add_txt("sender.example", "v=spf1 ip4:127.0.0.0/8 -all");
    let mut t = Tambo::new(
        "",
        "",
        &format!(
            "dns_server = \"{}\"\nhook_timeout = \"{hook_timeout}\"\n",
            dns.addr()
        ),
    );
    t.start_all();
    t
}

/// Installs `hooks/<name>` with this shell script body.
fn hook(t: &Tambo, name: &str, script: &str) {
    let dir = t.config_dir.join("hooks");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    // A new file each time: a running hook keeps its old text.
    let tmp = dir.join(format!(".{name}.new"));
    std::fs::write(&tmp, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// Opens a session as sender@sender.example up to the recipients; the
/// caller sends DATA.
fn session(t: &Tambo, to: &[&str]) -> tambo_e2e::Smtp {
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<sender@sender.example>", 250);
    for r in to {
        c.expect(&format!("RCPT TO:<{r}>"), 250);
    }
    c
}

/// Sends one message to ann; the final reply.
fn send(t: &Tambo, subject: &str) -> tambo_e2e::Reply {
    let mut c = session(t, &["ann@example.test"]);
    c.expect("DATA", 354);
    c.send_raw(&message(subject, "hello\r\n"));
    c.send_raw(b".\r\n");
    c.reply()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn wait_counter(t: &Tambo, var: &str, label: &str, n: u64) {
    t.wait_var(&format!("{var}[{label}] = {n}"), |v| {
        v[var][label].as_u64() == Some(n)
    });
}

#[test]
fn post_data_adds_its_headers_on_top_and_sees_exactly_its_environment() {
    let dns = TestDns::start();
    let t = setup(&dns, "10s");
    let out = t.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    hook(
        &t,
        "post-data",
        &format!(
            "env > {o}/env\ncat > {o}/stdin\npwd > {o}/pwd\nprintf 'X-Spam-Score: 0\\nX-Folded: a\\n\\tb\\n'",
            o = out.display()
        ),
    );
    let r = send(&t, "envcheck");
    assert_eq!(r.code, 250, "{r:?}");
    let m = text(&t.wait_maildir_in(DOMAIN, "ann", 1)[0]);
    // REFERENCE §2.8 step 4: hook output, Authentication-Results,
    // Received-SPF, Received, then the message.
    let names: Vec<&str> = m
        .split("\r\n")
        .take_while(|l| !l.is_empty())
        .filter(|l| !l.starts_with([' ', '\t']))
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(
        &names[..6],
        [
            "X-Spam-Score",
            "X-Folded",
            "Authentication-Results",
            "Received-SPF",
            "Received",
            "From"
        ],
        "{m}"
    );
    assert!(
        m.starts_with("X-Spam-Score: 0\r\nX-Folded: a\r\n\tb\r\n"),
        "{m}"
    );
    assert!(!m.contains("\n\n") && !m.contains("\r\r"), "{m:?}");
    // The environment, exactly.
    let env = std::fs::read_to_string(out.join("env")).unwrap();
    let mut keys: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    keys.sort();
    let mut want = [
        "AUTH_AS",
        "EHLO_DOMAIN",
        "EHLO_DOMAIN_RAW",
        "FROM_LOCAL_DOMAIN",
        "MAIL_FROM",
        "ON_TLS",
        "PATH",
        "PWD",
        "RCPT_TO",
        "REMOTE_ADDR",
        "SHELL",
        "SPF_PASS",
        "USER",
    ];
    want.sort();
    // `sh` itself may add these; nothing else may appear.
    keys.retain(|k| !["OLDPWD", "SHLVL", "_"].contains(k));
    assert_eq!(keys, want, "{env}");
    for line in [
        "MAIL_FROM=sender@sender.example",
        "RCPT_TO=ann@example.test",
        "EHLO_DOMAIN=client.test",
        "EHLO_DOMAIN_RAW=client.test",
        "AUTH_AS=",
        "ON_TLS=0",
        "FROM_LOCAL_DOMAIN=0",
        "SPF_PASS=1",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in {env}");
    }
    assert!(
        env.lines().any(|l| l.starts_with("REMOTE_ADDR=127.0.0.1:")),
        "{env}"
    );
    // It ran in the config dir, on the message with LF line ends and the
    // Authentication-Results header on top.
    let pwd = std::fs::read_to_string(out.join("pwd")).unwrap();
    assert_eq!(Path::new(pwd.trim()), t.config_dir.canonicalize().unwrap());
    let stdin = std::fs::read_to_string(out.join("stdin")).unwrap();
    assert!(stdin.starts_with("Authentication-Results: "), "{stdin}");
    assert!(!stdin.contains('\r'), "{stdin:?}");
    assert!(stdin.contains("\nSubject: envcheck\n"), "{stdin}");
    wait_counter(&t, "chasquid/smtpIn/hookResults", "post-data:success", 1);
}

#[test]
fn post_data_exit_codes_and_bad_output() {
    let dns = TestDns::start();
    let t = setup(&dns, "10s");
    // Exit 20: permanent, with the last complete line.
    hook(
        &t,
        "post-data",
        "echo first line\necho 'go away, spammer'\nexit 20",
    );
    let r = send(&t, "perm");
    assert_eq!((r.code, r.text()), (554, "5.7.1 go away, spammer".into()));
    // Any other status, 75 included: temporary.
    for status in [1, 75] {
        hook(&t, "post-data", &format!("echo 'try later'\nexit {status}"));
        let r = send(&t, "temp");
        assert_eq!((r.code, r.text()), (451, "4.7.1 try later".into()));
    }
    // A line that starts with an enhanced code of the same class is kept.
    hook(&t, "post-data", "echo '5.7.0 policy says no'\nexit 20");
    let r = send(&t, "own-code");
    assert_eq!((r.code, r.text()), (554, "5.7.0 policy says no".into()));
    // No line at all: a generic text.
    hook(&t, "post-data", "exit 20");
    let r = send(&t, "silent");
    assert_eq!(r.code, 554);
    assert!(r.text().starts_with("5.7.1 "), "{r:?}");
    // Nothing refused was queued or delivered.
    assert!(t.maildir_in(DOMAIN, "ann").is_empty());
    // Exit 0 with output that is not a header block: accepted, output
    // ignored, counted.
    hook(&t, "post-data", "echo 'this is not a header'");
    let r = send(&t, "badoutput");
    assert_eq!(r.code, 250, "{r:?}");
    let m = text(&t.wait_maildir_in(DOMAIN, "ann", 1)[0]);
    assert!(m.starts_with("Authentication-Results: "), "{m}");
    assert!(!m.contains("this is not a header"), "{m}");
    wait_counter(&t, "chasquid/smtpIn/hookResults", "post-data:badoutput", 1);
    wait_counter(&t, "chasquid/smtpIn/hookResults", "post-data:fail", 5);
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_its_children() {
    let dns = TestDns::start();
    let t = setup(&dns, "1s");
    let pidfile = t.dir.path().join("child.pid");
    hook(
        &t,
        "post-data",
        &format!(
            "sleep 1000 &\necho $! > {}\necho 'still thinking'\nsleep 1000",
            pidfile.display()
        ),
    );
    let r = send(&t, "slow");
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().starts_with("4.7.1"), "{r:?}");
    let pid: i32 = wait_for("the hook's child pid", || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    wait_dead("the hook's background child", pid);
}

#[test]
fn without_deliverd_hooks_refuse_for_now_and_plain_mail_still_flows() {
    let dns = TestDns::start();
    let mut t = setup(&dns, "10s");
    let ups = t.log("queued").matches("hook connection is up").count();
    t.stop("deliverd");
    // No hook: only the DKIM verification is lost; the mail is queued.
    let r = send(&t, "no-hooks");
    assert_eq!(r.code, 250, "{r:?}");
    // With a post-data hook: 451, never an accept.
    hook(&t, "post-data", "exit 0");
    let r = send(&t, "hook-no-deliverd");
    assert_eq!(r.code, 451, "{r:?}");
    std::fs::remove_file(t.config_dir.join("hooks/post-data")).unwrap();
    // With an rcpt hook: 451 at RCPT.
    hook(&t, "rcpt", "exit 0");
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<sender@sender.example>", 250);
    let r = c.cmd("RCPT TO:<ann@example.test>");
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().starts_with("4.7.1"), "{r:?}");
    // deliverd back: the rcpt hook runs, and the queued message is
    // delivered.
    t.start("deliverd");
    wait_for("the hook connection", || {
        (t.log("queued").matches("hook connection is up").count() > ups).then_some(())
    });
    c.expect("RCPT TO:<ann@example.test>", 250);
    t.wait_maildir_in(DOMAIN, "ann", 1);
}

#[test]
fn the_rcpt_hook_decides_each_recipient() {
    let dns = TestDns::start();
    let t = setup(&dns, "10s");
    let out = t.dir.path().join("rcpt-env");
    hook(
        &t,
        "rcpt",
        &format!(
            "env > {}\ncase \"$RCPT_TO\" in\n  ann@*) exit 0;;\n  bob@*) echo 'greylisted, come back later'; exit 75;;\n  *) echo 'not you'; exit 20;;\nesac",
            out.display()
        ),
    );
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<sender@sender.example>", 250);
    c.expect("RCPT TO:<ann@example.test>", 250);
    let env = std::fs::read_to_string(&out).unwrap();
    for line in [
        "RCPT_TO=ann@example.test",
        "MAIL_FROM=sender@sender.example",
        "EHLO_DOMAIN=client.test",
        "SPF_RESULT=pass",
        "SPF_PASS=1",
        "AUTH_AS=",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in {env}");
    }
    let r = c.cmd("RCPT TO:<bob@example.test>");
    assert_eq!(
        (r.code, r.text()),
        (451, "4.7.1 greylisted, come back later".into())
    );
    let r = c.cmd("RCPT TO:<team@example.test>");
    assert_eq!((r.code, r.text()), (550, "5.7.1 not you".into()));
    c.expect("DATA", 354);
    c.send_raw(&message("rcpt-hook", "hi\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    assert_eq!(t.wait_maildir_in(DOMAIN, "ann", 1).len(), 1);
    assert!(t.maildir_in(DOMAIN, "bob").is_empty());
}

#[test]
fn alias_hooks_extend_the_aliases_file() {
    let dns = TestDns::start();
    let t = setup(&dns, "10s");
    let log = t.dir.path().join("resolve.log");
    hook(
        &t,
        "alias-resolve",
        &format!(
            "echo \"$1\" >> {}\ncase \"$1\" in\n  list@example.test) echo 'ann, bob';;\n  broken@example.test) exit 1;;\n  garbage@example.test) echo 'a b c';;\nesac\nexit 0",
            log.display()
        ),
    );
    hook(
        &t,
        "alias-exists",
        "case \"$1\" in ghost@example.test) exit 0;; *) exit 1;; esac",
    );
    // Each refusal in a session of its own: smtpd closes a session at its
    // third error.
    let rcpt = |to: &str| {
        let mut c = t.smtp();
        c.expect("EHLO client.test", 250);
        c.expect("MAIL FROM:<sender@sender.example>", 250);
        c.cmd(&format!("RCPT TO:<{to}>"))
    };
    assert_eq!(rcpt("list@example.test").code, 250);
    let r = rcpt("broken@example.test");
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text().starts_with("4.4.3"), "{r:?}");
    let r = rcpt("garbage@example.test");
    assert_eq!(r.code, 451, "{r:?}");
    // alias-exists: only at RCPT.
    assert_eq!(rcpt("ghost@example.test").code, 250);
    let r = rcpt("nobody@example.test");
    assert_eq!(r.code, 550, "{r:?}");
    let mut c = t.smtp();
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<sender@sender.example>", 250);
    c.expect("RCPT TO:<list@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(&message("list", "hi\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    t.wait_maildir_in(DOMAIN, "ann", 1);
    t.wait_maildir_in(DOMAIN, "bob", 1);
    // Asked once for list@ in that transaction: at RCPT, not again at
    // queue time (the first transaction asked once too).
    let asked = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        asked.lines().filter(|l| *l == "list@example.test").count(),
        2,
        "{asked}"
    );
    assert!(
        !asked.contains('*'),
        "never asked about the catch-all: {asked}"
    );
    t.wait_var("resolve:parse_err and exists:true", |v| {
        let m = &v["chasquid/aliases/hookResults"];
        m["resolve:parse_err"].as_u64() == Some(1) && m["exists:true"].as_u64() == Some(1)
    });
}

#[test]
fn the_greylisting_example_in_the_docs_works() {
    let dns = TestDns::start();
    let t = setup(&dns, "10s");
    let state = t.dir.path().join("greylist");
    let script = include_str!("../../docs/hooks/rcpt-greylist")
        .replace(
            "DIR=/var/lib/tambo-greylist",
            &format!("DIR={}", state.display()),
        )
        .replace("DELAY=300", "DELAY=1");
    hook(&t, "rcpt", script.trim_start_matches("#!/bin/sh\n"));
    // Each attempt in its own session, as a retrying server makes them
    // (and since smtpd closes a session at its third error).
    let attempt = |to: &str| {
        let mut c = t.smtp();
        c.expect("EHLO client.test", 250);
        c.expect("MAIL FROM:<sender@sender.example>", 250);
        let r = c.cmd(&format!("RCPT TO:<{to}>"));
        (r, c)
    };
    let (r, _) = attempt("ann@example.test");
    assert_eq!(
        (r.code, r.text()),
        (
            451,
            "4.7.1 Greylisted, please try again in 1 seconds".into()
        )
    );
    // Another recipient is another triplet: greylisted on its own.
    assert_eq!(attempt("bob@example.test").0.code, 451);
    // The retry, once the delay passed, is accepted (as a real server's
    // would be, minutes later).
    let mut c = wait_for("the greylisting delay to pass", || {
        let (r, c) = attempt("ann@example.test");
        (r.code == 250).then_some(c)
    });
    c.expect("DATA", 354);
    c.send_raw(&message("greylisted", "hi\r\n"));
    c.send_raw(b".\r\n");
    assert_eq!(c.reply().code, 250);
    t.wait_maildir_in(DOMAIN, "ann", 1);
}
