//! Bad configurations are refused at startup with one line naming the
//! file, the key (or line) and the problem.

use std::process::Command;

use tambo_e2e::*;

/// Runs a binary against the test config; returns (success, stderr).
fn run(t: &Tambo, bin: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_dir().join(bin))
        .args(args)
        .arg("--config_dir")
        .arg(&t.config_dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Replaces (or adds) a top-level line of tambo.conf.
fn set_conf(t: &Tambo, line: &str) {
    let path = t.config_dir.join("tambo.conf");
    let text = std::fs::read_to_string(&path).unwrap();
    let key = line.split('=').next().unwrap().trim();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.split('=').next().unwrap().trim() != key)
        .collect();
    // Top-level keys go before the first table.
    let text = kept
        .join("\n")
        .replacen("[tambo]", &format!("{line}\n[tambo]"), 1);
    std::fs::write(&path, text).unwrap();
}

#[test]
fn each_kind_of_bad_config_is_refused_with_one_clear_line() {
    let cases: &[(&str, &str)] = &[
        (
            "max_data_size_mb = 0",
            "tambo.conf: key max_data_size_mb: must be > 0",
        ),
        (
            "max_data_size_mb = \"ten\"",
            "tambo.conf: key max_data_size_mb: must be an integer",
        ),
        (
            "give_up_send_after = \"3d\"",
            "tambo.conf: key give_up_send_after:",
        ),
        (
            "no_such_key = true",
            "tambo.conf: key no_such_key: unknown key",
        ),
        ("smtp_address = [\"\"]", "tambo.conf: key smtp_address:"),
        (
            "smtp_address = [\"nonsense\"]",
            "tambo.conf: key smtp_address:",
        ),
        (
            "hostname = [1]",
            "tambo.conf: key hostname: must be a string",
        ),
        ("max_queue_items = = 1", "tambo.conf:"),
    ];
    for (extra, want) in cases {
        let t = Tambo::default_setup();
        set_conf(&t, extra);
        for bin in [
            "tambo-smtpd",
            "tambo-queued",
            "tambo-deliverd",
            "tambo-monitord",
        ] {
            let (ok, err) = run(&t, bin, &[]);
            assert!(!ok, "{bin} started with {extra:?}");
            let errors: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
            assert_eq!(
                errors.len(),
                1,
                "{bin} with {extra:?}: one error line, got {err}"
            );
            assert!(errors[0].contains(want), "{bin} with {extra:?}: {err}");
            assert!(
                errors[0].contains(&t.config_dir.display().to_string()),
                "names the file: {err}"
            );
        }
        let (ok, err) = run(&t, "tambo", &["run"]);
        assert!(!ok && err.contains(want), "tambo run with {extra:?}: {err}");
    }
}

#[test]
fn bad_domain_files_are_refused() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "aliases",
            "ok: ann\nthis line has no colon\n",
            "example.test/aliases:2:",
        ),
        ("aliases", "a@b: ann\n", "example.test/aliases:1:"),
        ("users", "ann not-a-phc-hash\n", "example.test/users:1:"),
    ];
    for (file, text, want) in cases {
        let t = Tambo::default_setup();
        std::fs::write(t.config_dir.join("domains").join(DOMAIN).join(file), text).unwrap();
        let (ok, err) = run(&t, "tambo-queued", &[]);
        assert!(!ok, "queued started with a bad {file}");
        assert!(err.contains(want), "{err}");
    }
    let t = Tambo::default_setup();
    std::fs::remove_dir_all(t.config_dir.join("domains")).unwrap();
    let (ok, err) = run(&t, "tambo-queued", &[]);
    assert!(
        !ok && err.contains("domains: cannot read the domains directory"),
        "{err}"
    );
    std::fs::create_dir(t.config_dir.join("domains")).unwrap();
    let (ok, err) = run(&t, "tambo-queued", &[]);
    assert!(!ok && err.contains("no domain directories"), "{err}");
}

#[test]
fn missing_config_and_busy_port_are_refused() {
    let t = Tambo::default_setup();
    std::fs::remove_file(t.config_dir.join("tambo.conf")).unwrap();
    let (ok, err) = run(&t, "tambo-smtpd", &[]);
    assert!(!ok && err.contains("tambo.conf: cannot read"), "{err}");

    let t = Tambo::default_setup();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    set_conf(
        &t,
        &format!("smtp_address = [\"{}\"]", busy.local_addr().unwrap()),
    );
    let (ok, err) = run(&t, "tambo-smtpd", &[]);
    assert!(
        !ok && err.contains("key smtp_address: cannot listen on"),
        "{err}"
    );
}

#[test]
fn every_binary_prints_its_version() {
    let t = Tambo::default_setup();
    for bin in [
        "tambo-smtpd",
        "tambo-queued",
        "tambo-deliverd",
        "tambo-monitord",
    ] {
        let out = Command::new(bin_dir().join(bin))
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success());
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            s.starts_with(&format!("{bin} {}", env!("CARGO_PKG_VERSION"))),
            "{s}"
        );
    }
    drop(t);
}
