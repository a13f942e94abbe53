use super::*;
use password_hash::{PasswordHasher, SaltString};
use std::path::Path;

const SALT: &[u8] = b"0123456789abcdef";

fn salt() -> SaltString {
    SaltString::encode_b64(SALT).unwrap()
}

/// argon2 with the smallest parameters, so tests stay fast.
fn argon2_hash(algorithm: argon2::Algorithm, password: &[u8]) -> String {
    let params = argon2::Params::new(64, 1, 1, Some(32)).unwrap();
    argon2::Argon2::new(algorithm, argon2::Version::V0x13, params)
        .hash_password(password, &salt())
        .unwrap()
        .to_string()
}

fn scrypt_hash(log_n: u8, password: &[u8]) -> String {
    let params = scrypt::Params::new(log_n, 8, 1, 32).unwrap();
    scrypt::Scrypt
        .hash_password_customized(password, None, None, params, &salt())
        .unwrap()
        .to_string()
}

fn db(lines: &[(&str, &str)]) -> UserDb {
    let text: String = lines.iter().map(|(u, c)| format!("{u} {c}\n")).collect();
    UserDb::parse(&text, Path::new("users")).unwrap()
}

#[test]
fn scrypt_with_chasquid_parameters() {
    // The one N=2^14 hash (tens of ms): what chasquid and `tambo
    // user-add` write.
    let phc = scrypt_hash(14, b"s3cret");
    assert!(phc.starts_with("$scrypt$ln=14,r=8,p=1$"), "{phc}");
    assert_eq!(verify_phc(&phc, b"s3cret"), Ok(true));
    assert_eq!(verify_phc(&phc, b"s3cret "), Ok(false));
}

#[test]
fn scrypt_honours_stored_parameters() {
    let phc = scrypt_hash(4, "contraseña".as_bytes());
    assert!(phc.starts_with("$scrypt$ln=4,r=8,p=1$"), "{phc}");
    assert_eq!(verify_phc(&phc, "contraseña".as_bytes()), Ok(true));
    assert_eq!(verify_phc(&phc, b"contrasena"), Ok(false));
    // Same salt, same password, other cost: the stored ln is what counts,
    // so swapping it breaks the match instead of being ignored.
    let other = phc.replacen("ln=4", "ln=5", 1);
    assert_eq!(verify_phc(&other, "contraseña".as_bytes()), Ok(false));
}

#[test]
fn users_without_a_hash_cost_a_check_too() {
    // The decoy is a real scrypt hash at chasquid's cost, checked for
    // unknown and receive-only users alike.
    let decoy = decoy_hash();
    assert!(decoy.starts_with("$scrypt$ln=14,r=8,p=1$"), "{decoy}");
    assert_eq!(verify_phc(decoy, b"decoy"), Ok(true));
    assert_eq!(verify_phc(decoy, b""), Ok(false));
}

#[test]
fn attempts_side_by_side_cannot_overrun_the_budget() {
    let b = FailureBudget::new(3, WINDOW, 100);
    let ip: IpAddr = "198.51.100.7".parse().unwrap();
    let t0 = Instant::now();
    // Five attempts begun before any finished: three get a check.
    let begun: Vec<bool> = (0..5)
        .map(|i| b.try_begin(ip, t0 + Duration::from_millis(i)))
        .collect();
    assert_eq!(begun, [true, true, true, false, false]);
    // One of them succeeds: its provisional failure is taken back, and
    // one more attempt may run.
    b.forgive(ip, t0 + Duration::from_millis(1));
    assert!(b.try_begin(ip, t0 + Duration::from_millis(10)));
    assert!(!b.try_begin(ip, t0 + Duration::from_millis(11)));
    // Forgiving what was never counted changes nothing.
    b.forgive(ip, t0 + Duration::from_secs(5));
    b.forgive("203.0.113.1".parse().unwrap(), t0);
    assert!(!b.allows(ip, t0 + Duration::from_millis(12)));
    // All forgiven: the client is forgotten.
    for ms in [0, 2, 10] {
        b.forgive(ip, t0 + Duration::from_millis(ms));
    }
    assert_eq!(b.tracked_clients(), 0);
}

#[test]
fn argon2_variants() {
    for alg in [
        argon2::Algorithm::Argon2id,
        argon2::Algorithm::Argon2i,
        argon2::Algorithm::Argon2d,
    ] {
        let phc = argon2_hash(alg, b"s3cret");
        assert!(phc.starts_with(&format!("${}$v=19$m=64,t=1,p=1$", alg.as_str())));
        assert_eq!(verify_phc(&phc, b"s3cret"), Ok(true), "{phc}");
        assert_eq!(verify_phc(&phc, b"S3cret"), Ok(false), "{phc}");
        assert_eq!(verify_phc(&phc, b""), Ok(false), "{phc}");
    }
    // The variant is taken from the hash: an argon2i output relabelled
    // argon2id no longer matches.
    let i = argon2_hash(argon2::Algorithm::Argon2i, b"pw");
    let relabelled = i.replacen("$argon2i$", "$argon2id$", 1);
    assert_eq!(verify_phc(&relabelled, b"pw"), Ok(false));
}

#[test]
fn argon2_with_a_longer_output_and_older_version() {
    let params = argon2::Params::new(64, 2, 1, Some(48)).unwrap();
    let phc = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x10, params)
        .hash_password(b"pw", &salt())
        .unwrap()
        .to_string();
    assert!(phc.starts_with("$argon2id$v=16$m=64,t=2,p=1$"), "{phc}");
    assert_eq!(verify_phc(&phc, b"pw"), Ok(true));
    assert_eq!(verify_phc(&phc, b"pW"), Ok(false));
}

#[test]
fn broken_phc_strings_are_errors() {
    let good = argon2_hash(argon2::Algorithm::Argon2id, b"pw");
    let no_output = good.rsplit_once('$').unwrap().0.to_string();
    for phc in [
        "",
        "not a hash",
        "$md5$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
        "$scrypt$ln=14,r=8,p=1",
        no_output.as_str(),
        // An unknown parameter; parameters scrypt (N ≥ 2^(16·r)),
        // argon2 (m < 8·p) or the PHC version rule out.
        "$scrypt$ln=4,r=8,p=1,x=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
        "$scrypt$ln=16,r=1,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
        "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
        "$argon2id$v=99$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
    ] {
        let r = verify_phc(phc, b"pw");
        assert!(r.is_err(), "{phc}: {r:?}");
    }
}

#[test]
fn absurd_memory_costs_are_refused_before_hashing() {
    // ln=31, r=8: 256 GiB and 2^17 times chasquid's work. Refused at
    // once rather than aborting queued.
    let phc = "$scrypt$ln=31,r=8,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4";
    let e = verify_phc(phc, b"pw").unwrap_err();
    assert!(e.contains("× chasquid's"), "{e}");
    let phc = "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4";
    let e = verify_phc(phc, b"pw").unwrap_err();
    assert!(e.contains("4096 MiB"), "{e}");
}

#[test]
fn check_against_a_users_file() {
    let ann = scrypt_hash(4, b"ann's pw");
    let bob = argon2_hash(argon2::Algorithm::Argon2id, b"bob's pw");
    let db = db(&[("Ann", &ann), ("bob", &bob), ("carol", "!")]);
    assert_eq!(check(&db, "ann", b"ann's pw"), Ok(Some(Verdict::Accepted)));
    assert_eq!(check(&db, "ann", b"bob's pw"), Ok(Some(Verdict::Refused)));
    assert_eq!(check(&db, "bob", b"bob's pw"), Ok(Some(Verdict::Accepted)));
    assert_eq!(check(&db, "bob", b""), Ok(Some(Verdict::Refused)));
    // Receive-only: never authenticates, whatever is sent.
    assert_eq!(check(&db, "carol", b"!"), Ok(Some(Verdict::ReceiveOnly)));
    assert_eq!(check(&db, "carol", b""), Ok(Some(Verdict::ReceiveOnly)));
    // Unknown: no verdict, so Dovecot can be asked.
    assert_eq!(check(&db, "dave", b"ann's pw"), Ok(None));
    assert_eq!(check(&UserDb::default(), "ann", b"x"), Ok(None));
    // Keys are normalised users: the caller normalises first.
    assert_eq!(check(&db, "Ann", b"ann's pw"), Ok(None));
}

#[test]
fn check_refuses_oversized_passwords_without_hashing() {
    let mut long = vec![b'x'; MAX_PASSWORD_LEN];
    let db = db(&[("ann", &scrypt_hash(4, &long))]);
    assert_eq!(check(&db, "ann", &long), Ok(Some(Verdict::Accepted)));
    long.push(b'x');
    assert_eq!(check(&db, "ann", &long), Ok(Some(Verdict::Refused)));
}

#[test]
fn check_reports_unusable_hashes() {
    // The users file only checks PHC syntax; a hash without output
    // passes it and must surface as an error, not as "wrong password".
    let db = db(&[("ann", "$scrypt$ln=14,r=8,p=1")]);
    assert!(check(&db, "ann", b"pw").is_err());
}

#[test]
fn identities_split_at_the_first_at() {
    let ok = |id: &str, user: &str, domain: &str| {
        assert_eq!(
            split_identity(id),
            Ok((user.to_string(), domain.to_string())),
            "{id}"
        );
    };
    ok("Ann@Example.ORG", "ann", "example.org");
    ok("ann", "ann", "");
    ok("ＡＮＮ@xn--bcher-kva.example", "ann", "bücher.example");
    ok("Ñandú@EJEMPLO.ar", "ñandú", "ejemplo.ar");
    ok("ann+tag@example.org", "ann+tag", "example.org");
    for id in [
        "",
        "@example.org",
        "ann@",
        // First `@` splits; the rest is not a domain.
        "a@b@c",
        "ann@bad domain",
        "ann@exa\u{1}mple.org",
        "ann@exa\u{7f}mple.org",
        "an n@example.org",
        "an\tn",
        "ann@xn--zz",
    ] {
        assert!(split_identity(id).is_err(), "{id:?} should be refused");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn budget_refuses_after_max_failures() {
    let b = FailureBudget::default();
    let t0 = Instant::now();
    let client = ip("192.0.2.1");
    for i in 0..MAX_FAILURES {
        assert!(b.allows(client, t0), "attempt {i}");
        b.record_failure(client, t0 + Duration::from_secs(u64::from(i)));
    }
    assert!(!b.allows(client, t0 + Duration::from_secs(10)));
    // Others are unaffected.
    assert!(b.allows(ip("192.0.2.2"), t0));
    // A success does not clear it (a valid account must not reset the
    // budget between guesses at others): only the window does.
    assert!(b.allows(client, t0 + WINDOW + Duration::from_secs(10)));
}

#[test]
fn budget_window_slides() {
    let b = FailureBudget::new(3, Duration::from_secs(600), 100);
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let c = ip("198.51.100.7");
    b.record_failure(c, t0);
    b.record_failure(c, t0 + s(300));
    b.record_failure(c, t0 + s(500));
    assert!(!b.allows(c, t0 + s(599)));
    // The first failure ages out at 600 s: one more try.
    assert!(b.allows(c, t0 + s(600)));
    b.record_failure(c, t0 + s(600));
    // Now 300, 500 and 600 are within the window until 900.
    assert!(!b.allows(c, t0 + s(899)));
    assert!(b.allows(c, t0 + s(900)));
    // Everything aged out: the entry goes.
    assert!(b.allows(c, t0 + s(1200)));
    assert_eq!(b.tracked_clients(), 0);
}

#[test]
fn budget_has_no_fixed_window_edge() {
    // A fixed window starting at the first failure would let a client
    // fail 3 times just before its end and 3 more just after.
    let b = FailureBudget::new(3, Duration::from_secs(600), 100);
    let t0 = Instant::now();
    let c = ip("198.51.100.8");
    b.record_failure(c, t0);
    for _ in 0..2 {
        b.record_failure(c, t0 + Duration::from_secs(599));
    }
    assert!(b.allows(c, t0 + Duration::from_secs(600)));
    b.record_failure(c, t0 + Duration::from_secs(600));
    assert!(!b.allows(c, t0 + Duration::from_secs(601)));
}

#[test]
fn budget_groups_ipv6_by_64() {
    let b = FailureBudget::new(2, WINDOW, 100);
    let t0 = Instant::now();
    b.record_failure(ip("2001:db8:1:2::1"), t0);
    b.record_failure(ip("2001:db8:1:2:ffff::9"), t0);
    assert!(!b.allows(ip("2001:db8:1:2:1234::5"), t0));
    assert!(b.allows(ip("2001:db8:1:3::1"), t0));
    // IPv4-mapped addresses count as their IPv4 address.
    b.record_failure(ip("::ffff:192.0.2.9"), t0);
    b.record_failure(ip("192.0.2.9"), t0);
    assert!(!b.allows(ip("192.0.2.9"), t0));
    assert_eq!(b.tracked_clients(), 2);
}

#[test]
fn budget_memory_is_bounded() {
    let b = FailureBudget::new(2, WINDOW, 100);
    let t0 = Instant::now();
    let attacker = ip("203.0.113.1");
    b.record_failure(attacker, t0);
    b.record_failure(attacker, t0 + Duration::from_secs(1));
    assert!(!b.allows(attacker, t0 + Duration::from_secs(1)));
    // A flood of distinct /64s: the map never grows past its bound.
    for i in 0..10_000u32 {
        let flood = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i) << 64));
        b.record_failure(flood, t0 + Duration::from_secs(2));
        assert!(b.tracked_clients() <= 100);
    }
    assert_eq!(b.tracked_clients(), 100);
    // The oldest went first, the attacker with them (the bound's
    // price: an evicted client starts afresh).
    assert!(b.allows(attacker, t0 + Duration::from_secs(2)));
    let s = b.lock();
    assert_eq!(s.clients.len(), s.by_latest.len());
}

#[test]
fn budget_evicts_least_recent_failure_first() {
    let b = FailureBudget::new(2, WINDOW, 2);
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let (x, y, z) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
    b.record_failure(x, t0);
    b.record_failure(y, t0 + s(1));
    // x fails again later: now y is the one whose last failure is oldest.
    b.record_failure(x, t0 + s(2));
    b.record_failure(z, t0 + s(3));
    assert_eq!(b.tracked_clients(), 2);
    assert!(!b.allows(x, t0 + s(3)));
    let st = b.lock();
    assert!(st.clients.contains_key(&z));
    assert!(!st.clients.contains_key(&y));
    assert_eq!(st.by_latest.len(), 2);
}

#[test]
fn budget_zero_limits_mean_one() {
    let b = FailureBudget::new(0, WINDOW, 0);
    let t0 = Instant::now();
    assert!(b.allows(ip("192.0.2.1"), t0));
    b.record_failure(ip("192.0.2.1"), t0);
    assert!(!b.allows(ip("192.0.2.1"), t0));
    b.record_failure(ip("192.0.2.2"), t0);
    assert_eq!(b.tracked_clients(), 1);
}

#[test]
fn equalised_bounds() {
    assert_eq!(equalised_duration(|| 0.0), Duration::from_millis(100));
    assert_eq!(equalised_duration(|| 0.5), Duration::from_millis(110));
    assert_eq!(equalised_duration(|| 1.0), Duration::from_millis(120));
    // Out-of-range or broken randomness stays within the bounds.
    assert_eq!(equalised_duration(|| -3.0), Duration::from_millis(100));
    assert_eq!(equalised_duration(|| 7.0), Duration::from_millis(120));
    assert_eq!(equalised_duration(|| f64::NAN), Duration::from_millis(100));
    for _ in 0..1000 {
        let d = equalised_duration(crate::retry::random_unit);
        assert!(
            d >= MIN_DURATION && d <= Duration::from_millis(120),
            "{d:?}"
        );
    }
}

#[tokio::test]
async fn finish_at_pads_but_never_cuts_short() {
    let start = Instant::now();
    finish_at(start, Duration::from_millis(30)).await;
    assert!(start.elapsed() >= Duration::from_millis(30));
    // Padded from `start`, not from the call: 60 ms already spent of
    // 100 leaves about 40.
    let start = Instant::now() - Duration::from_millis(60);
    let before = Instant::now();
    finish_at(start, Duration::from_millis(100)).await;
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(before.elapsed() < Duration::from_millis(100));
    // Already past: returns at once.
    let past = Instant::now() - Duration::from_secs(1);
    finish_at(past, Duration::from_millis(100)).await;
    assert!(past.elapsed() < Duration::from_millis(1100));
    let start = Instant::now();
    equalise(start).await;
    assert!(start.elapsed() >= MIN_DURATION);
}
