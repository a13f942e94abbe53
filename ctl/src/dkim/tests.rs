use super::*;
use std::os::unix::fs::PermissionsExt;

// queued's test-only keys, with OpenSSL's view of their public halves
// (queued/src/dkim/testdata/README).
const RSA2048: &str = include_str!("../../../queued/src/dkim/testdata/rsa2048.pem");
const RSA2048_SPKI: &str = include_str!("../../../queued/src/dkim/testdata/rsa2048.spki.b64");
const RSA2048_PKCS1: &str = include_str!("../../../queued/src/dkim/testdata/rsa2048-pkcs1.pem");
const RSA1024: &str = include_str!("../../../queued/src/dkim/testdata/rsa1024.pem");
const ED25519: &str = include_str!("../../../queued/src/dkim/testdata/ed25519.pem");
const ED25519_RAW: &str = include_str!("../../../queued/src/dkim/testdata/ed25519.raw.b64");
const P256: &str = include_str!("../../../queued/src/dkim/testdata/p256.pem");

fn record(pem: &str) -> Result<String, String> {
    dns_record("example.org", "sel", &dkimkey::parse(pem.as_bytes())?)
}

#[test]
fn records_match_openssl() {
    assert_eq!(
        record(RSA2048).unwrap(),
        format!(
            "sel._domainkey.example.org\tTXT\t\"v=DKIM1; k=rsa; p={}\"",
            RSA2048_SPKI.trim()
        )
    );
    assert_eq!(
        record(ED25519).unwrap(),
        format!(
            "sel._domainkey.example.org\tTXT\t\"v=DKIM1; k=ed25519; p={}\"",
            ED25519_RAW.trim()
        )
    );
}

#[test]
fn refuses_keys_queued_refuses() {
    let cases = [
        (RSA2048_PKCS1, "\"RSA PRIVATE KEY\" (PKCS#1)"),
        (P256, "unsupported key type"),
        (RSA1024, "RSA key too small"),
        ("nothing\n", "no PEM key block"),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "invalid PKCS#8 key",
        ),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "the first PEM block is Certificate",
        ),
    ];
    for (pem, reason) in cases {
        let err = record(pem).unwrap_err();
        assert!(err.contains(reason), "{err}");
    }
}

#[test]
fn generated_keys_load_and_have_records() {
    let pkcs8 = generate(Algorithm::Ed25519).unwrap();
    let key = dkimkey::parse_pkcs8(pkcs8.as_bytes()).unwrap();
    let record = dns_record("example.org", "s", &key).unwrap();
    assert!(record.starts_with("s._domainkey.example.org\tTXT\t\"v=DKIM1; k=ed25519; p="));
    // RSA generation is slow unoptimised; ctl/tests/dkim.rs makes one.
}

#[test]
fn domains_and_selectors() {
    let d = Domain::parse("Ñandú.Example").unwrap();
    assert_eq!(
        (d.name.as_str(), d.ascii.as_str()),
        ("ñandú.example", "xn--and-6ma2c.example")
    );
    for bad in ["", "two words.example", "a/b.example"] {
        assert!(Domain::parse(bad).is_err(), "{bad:?}");
    }
    for good in ["20240131", "s1.mail", "my_key", "a-b"] {
        checked_selector(good).unwrap();
    }
    for bad in ["", "a..b", ".a", "a b", "a;b", "a=b", "../x", "sél"] {
        assert!(checked_selector(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn finds_the_domain_directory_however_spelt() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("domains/Example.ORG")).unwrap();
    std::fs::write(dir.path().join("domains/other.example"), "a file").unwrap();
    let d = Domain::parse("example.org").unwrap();
    assert_eq!(
        d.dir(dir.path()).unwrap(),
        dir.path().join("domains/Example.ORG")
    );
    let other = Domain::parse("other.example").unwrap();
    assert!(matches!(
        other.dir(dir.path()),
        Err(Error::NoDomainDir { .. })
    ));
}

#[test]
fn first_key_is_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dkim:b.pem", "dkim:a.pem", "users", "dkim:c.pem.old"] {
        std::fs::write(dir.path().join(name), "").unwrap();
    }
    let (selector, path) = first_key(dir.path()).unwrap();
    assert_eq!(selector, "a");
    assert_eq!(path, dir.path().join("dkim:a.pem"));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(first_key(empty.path()), Err(Error::NoKeys(_))));
}

#[test]
fn new_key_files_are_0660_and_never_replace_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dkim:s.pem");
    write_new_key(&path, b"first").unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert!(matches!(
        write_new_key(&path, b"second"),
        Err(Error::Exists(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"first");
    // Not through a symlink either, even a dangling one.
    let link = dir.path().join("dkim:link.pem");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
    assert!(matches!(write_new_key(&link, b"x"), Err(Error::Exists(_))));
    assert!(!dir.path().join("elsewhere").exists());
    // No temporary file is left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["dkim:link.pem", "dkim:s.pem"]);
}
