use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(
        Path::new("/etc/tambo"),
        Path::new("/etc/tambo/tambo.conf"),
        text,
    )
}

#[test]
fn defaults_match_reference() {
    let c = load("").unwrap();
    assert_eq!(c.max_data_size_mb, 50);
    assert_eq!(c.max_queue_items, 200);
    assert_eq!(c.give_up_send_after, Duration::from_secs(72_000));
    assert_eq!(c.smtp_address, vec![ListenAddr::Systemd]);
    assert_eq!(c.monitoring_address, None);
    assert_eq!(
        c.mail_delivery_agent_args,
        ["-f", "%from%", "-d", "%to_user%"]
    );
    assert_eq!(c.suffix_separators, "+");
    assert_eq!(c.drop_characters, ".");
    assert_eq!(c.tambo.runtime_dir, PathBuf::from("/run/tambo"));
    assert_eq!(c.tambo.max_sessions, 1000);
    assert_eq!(c.tambo.max_sessions_per_client, 50);
    assert_eq!(c.tambo.max_data_in_flight_mb, 512);
    assert_eq!(c.tambo.max_tls_signatures_per_second, 1000);
}

#[test]
fn reads_every_key() {
    let c = load(
        r#"
hostname = "mx.example.org"
max_data_size_mb = 10
smtp_address = ["127.0.0.1:2525", ":25"]
submission_address = []
submission_over_tls_address = ["[::1]:465"]
monitoring_address = "127.0.0.1:1099"
mail_delivery_agent_bin = "procmail"
mail_delivery_agent_args = ["-d", "%to%"]
data_dir = "data"
suffix_separators = "-+"
drop_characters = ""
mail_log_path = "<stdout>"
dovecot_auth = true
dovecot_userdb_path = "/run/dovecot/auth-userdb"
dovecot_client_path = "/run/dovecot/auth-client"
haproxy_incoming = true
max_queue_items = 5
give_up_send_after = "1h30m"
[tambo]
runtime_dir = "run"
maildir = "/var/mail/%to_domain%/%to_user%"
delivery_slots = 4
max_sessions = 10
max_sessions_per_client = 2
max_data_in_flight_mb = 64
max_tls_signatures_per_second = 5
[testing]
retry_delays = ["1s", "2s", "3s", "4s"]
retry_jitter = "0s"
smtp_first_deadline = "2s"
"#,
    )
    .unwrap()
    .resolve_paths();
    assert_eq!(c.hostname, "mx.example.org");
    assert_eq!(c.max_data_size(), 10 * 1024 * 1024);
    assert_eq!(c.smtp_address.len(), 2);
    assert!(c.submission_address.is_empty());
    assert_eq!(c.data_dir, PathBuf::from("/etc/tambo/data"));
    assert_eq!(c.tambo.runtime_dir, PathBuf::from("/etc/tambo/run"));
    assert_eq!(c.give_up_send_after, Duration::from_secs(5400));
    assert_eq!(c.testing.retry_jitter, Some(Duration::ZERO));
    assert_eq!(c.testing.smtp_first_deadline, Some(Duration::from_secs(2)));
    assert!(c.haproxy_incoming);
    assert_eq!(c.tambo.delivery_slots, 4);
    assert_eq!(c.tambo.max_sessions, 10);
    assert_eq!(c.tambo.max_sessions_per_client, 2);
    assert_eq!(c.tambo.max_tls_signatures_per_second, 5);
    assert_eq!(c.max_data_in_flight(), 64 << 20);
}

#[test]
fn bad_configs_name_file_key_and_problem() {
    let cases = [
        ("max_data_size_mb = 0", "key max_data_size_mb: must be > 0"),
        (
            "max_data_size_mb = \"big\"",
            "key max_data_size_mb: must be an integer",
        ),
        ("give_up_send_after = \"2d\"", "key give_up_send_after: "),
        ("give_up_send_after = \"-1h\"", "key give_up_send_after: "),
        ("smtp_address = [\"\"]", "key smtp_address: contains \"\""),
        (
            "smtp_address = \"127.0.0.1:25\"",
            "key smtp_address: must be an array",
        ),
        (
            "smtp_address = [\"localhost:25\"]",
            "key smtp_address: \"localhost:25\" is not an address",
        ),
        ("monitoring_address = \"nope\"", "key monitoring_address:"),
        ("no_such_key = 1", "key no_such_key: unknown key"),
        ("[tambo]\nbogus = 1", "key tambo.bogus: unknown key"),
        (
            "[tambo]\ndelivery_slots = 5000",
            "key tambo.delivery_slots:",
        ),
        (
            "[tambo]\nmax_sessions = 0",
            "key tambo.max_sessions: must be > 0",
        ),
        (
            "max_data_size_mb = 100\n[tambo]\nmax_data_in_flight_mb = 99",
            "key tambo.max_data_in_flight_mb: is 99, smaller than max_data_size_mb",
        ),
        (
            "dovecot_auth = \"yes\"",
            "key dovecot_auth: must be true or false",
        ),
        ("hostname = \"\"", "key hostname:"),
        (
            "mail_delivery_agent_bin = \"\"",
            "key mail_delivery_agent_bin:",
        ),
        (
            "[testing]\nretry_delays = [\"1s\"]",
            "key testing.retry_delays: needs exactly 4",
        ),
    ];
    for (text, want) in cases {
        let e = load(text).unwrap_err().to_string();
        assert!(e.starts_with("/etc/tambo/tambo.conf: "), "{text}: {e}");
        assert!(e.contains(want), "{text}: got {e:?}, want {want:?}");
    }
}

#[test]
fn toml_syntax_errors_name_the_line() {
    let e = load("hostname = \"a\"\nmax_data_size_mb = = 3\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(
        e.to_string()
            .starts_with("/etc/tambo/tambo.conf:2: invalid TOML"),
        "{e}"
    );
    let e = load("hostname = \"a\"\nhostname = \"b\"\n").unwrap_err();
    assert!(e.to_string().contains("invalid TOML"), "{e}");
}

#[test]
fn overrides_replace_whatever_the_value() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(FILE_NAME),
        "smtp_address = [\"127.0.0.1:25\"]\n",
    )
    .unwrap();
    let c = Config::load(
        dir.path(),
        Some("smtp_address = []\nhaproxy_incoming = false"),
    )
    .unwrap();
    assert!(c.smtp_address.is_empty());
    let e = Config::load(dir.path(), Some("max_queue_items = 0")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--config_overrides: key max_queue_items"),
        "{e}"
    );
}

#[test]
fn missing_file_is_named() {
    let e = Config::load(Path::new("/nonexistent/dir"), None).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/dir/tambo.conf: cannot read"),
        "{e}"
    );
}

#[test]
fn remote_delivery_keys() {
    let c = load("").unwrap();
    assert_eq!(c.tambo.lmtp_address, None);
    assert!(c.tambo.outgoing_source_address.is_empty());
    assert_eq!(c.tambo.smtp_connection_cache_time, Duration::from_secs(2));
    assert!(c.tambo.relay_networks.is_empty());
    let c = load(
        r#"
mail_delivery_agent_bin = ""
[tambo]
lmtp_address = "/run/dovecot/lmtp"
outgoing_source_address = ["192.0.2.7", "2001:db8::7"]
smtp_connection_cache_time = "0s"
relay_networks = ["192.168.0.0/16", "2001:db8::/32", "10.0.0.1"]
deliverd_paths = ["/var/lib/greylist"]
[testing]
dns_server = "127.0.0.1:5353"
smtp_port = 2525
sts_https_port = 8443
tls_roots = "roots.pem"
smtp_out_timeout = "2s"
sts_refresh_period = "1s"
hook_timeout = "2s"
"#,
    )
    .unwrap();
    assert_eq!(c.tambo.lmtp_address.as_deref(), Some("/run/dovecot/lmtp"));
    assert_eq!(c.tambo.outgoing_source_address.len(), 2);
    assert_eq!(c.tambo.smtp_connection_cache_time, Duration::ZERO);
    assert_eq!(c.tambo.relay_networks.len(), 3);
    assert_eq!(c.tambo.deliverd_paths, [PathBuf::from("/var/lib/greylist")]);
    assert!(c.tambo.relay_networks[0].contains("192.168.1.1".parse().unwrap()));
    assert_eq!(c.testing.hook_timeout, Some(Duration::from_secs(2)));
    assert_eq!(c.testing.smtp_port, Some(2525));
    assert_eq!(
        c.testing.dns_server,
        Some("127.0.0.1:5353".parse().unwrap())
    );
    let c = c.resolve_paths();
    assert_eq!(
        c.testing.tls_roots,
        Some(PathBuf::from("/etc/tambo/roots.pem"))
    );
    assert_eq!(
        load("[tambo]\nlmtp_address = \"localhost:24\"")
            .unwrap()
            .tambo
            .lmtp_address
            .as_deref(),
        Some("localhost:24")
    );
    for (text, problem) in [
        ("[tambo]\nlmtp_address = \"lmtp\"", "neither a socket path"),
        (
            "[tambo]\noutgoing_source_address = [\"mx.example\"]",
            "not an IP address",
        ),
        (
            "[tambo]\noutgoing_source_address = [\"192.0.2.1\", \"192.0.2.2\"]",
            "at most one IPv4",
        ),
        (
            "[tambo]\nsmtp_connection_cache_time = \"soon\"",
            "smtp_connection_cache_time",
        ),
        (
            "[tambo]\nrelay_networks = [\"192.168.1.1/16\"]",
            "bits set after its /16",
        ),
        ("[tambo]\nrelay_networks = \"10.0.0.0/8\"", "relay_networks"),
        (
            "[tambo]\ndeliverd_paths = [\"greylist\"]",
            "not an absolute path",
        ),
        ("[testing]\nsmtp_port = 0", "testing.smtp_port"),
        ("[testing]\nsmtp_port = 70000", "port number"),
        ("[testing]\ndns_server = \"nowhere\"", "not an address"),
        (
            "mail_delivery_agent_bin = \"\"",
            "local mail could not be delivered",
        ),
    ] {
        let e = load(text).err().unwrap().to_string();
        assert!(e.contains(problem), "{text}: {e}");
    }
}
