//! `tambo dkim-keygen` and `tambo dkim-dns`, run as an admin runs them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TAMBO: &str = env!("CARGO_BIN_EXE_tambo");

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../queued/src/dkim/testdata")
        .join(name)
}

/// A config dir with domains/example.org/.
fn config() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("domains/example.org")).unwrap();
    dir
}

fn tambo(args: &[&str]) -> Output {
    Command::new(TAMBO).args(args).output().unwrap()
}

fn c_flag(dir: &tempfile::TempDir) -> String {
    format!("--config_dir={}", dir.path().display())
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[track_caller]
fn fails(out: &Output, reason: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(reason), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// The record line of keygen's output, which must be exactly:
/// `Key written to "<path>"`, an empty line, the record.
#[track_caller]
fn keygen_record(out: &str, path: &Path) -> String {
    let expected_head = format!("Key written to \"{}\"\n\n", path.display());
    let record = out
        .strip_prefix(&expected_head)
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(record.matches('\n').count(), 1, "{out}");
    record.to_string()
}

#[track_caller]
fn assert_private_key_file(path: &Path) {
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o660,
        "{}",
        path.display()
    );
    let pem = std::fs::read_to_string(path).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    assert!(pem.ends_with("-----END PRIVATE KEY-----\n"), "{pem}");
}

#[test]
fn keygen_default_rsa3072_at_the_dated_path_matches_dkim_dns() {
    let dir = config();
    let before = chrono::Utc::now().format("%Y%m%d").to_string();
    let out = ok(&tambo(&["dkim-keygen", &c_flag(&dir), "example.org"]));
    let after = chrono::Utc::now().format("%Y%m%d").to_string();
    // Midnight may pass while the key is made.
    let selector = [before, after]
        .into_iter()
        .find(|s| {
            dir.path()
                .join(format!("domains/example.org/dkim:{s}.pem"))
                .exists()
        })
        .expect("no key at domains/example.org/dkim:<today>.pem");
    let path = dir
        .path()
        .join(format!("domains/example.org/dkim:{selector}.pem"));
    assert_private_key_file(&path);
    let record = keygen_record(&out, &path);
    let prefix = format!("{selector}._domainkey.example.org\tTXT\t\"v=DKIM1; k=rsa; p=");
    assert!(record.starts_with(&prefix), "{record}");
    assert!(record.ends_with("\"\n"), "{record}");
    // A 3072-bit SubjectPublicKeyInfo is 422 bytes: 564 base64 characters.
    assert_eq!(record.len(), prefix.len() + 564 + 2, "{record}");

    // dkim-dns prints the same record, by default (the first key) and by
    // selector.
    let dns = ok(&tambo(&["dkim-dns", &c_flag(&dir), "example.org"]));
    assert_eq!(dns, record);
    let dns = ok(&tambo(&[
        "dkim-dns",
        &c_flag(&dir),
        "example.org",
        &selector,
    ]));
    assert_eq!(dns, record);

    // Never over an existing key.
    let before = std::fs::read(&path).unwrap();
    fails(
        &tambo(&["dkim-keygen", &c_flag(&dir), "example.org", &selector]),
        "already exists",
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn keygen_ed25519_with_selector_and_path() {
    let dir = config();
    // The option before or after the positionals, -C=, --algo value.
    let out = ok(&tambo(&[
        "dkim-keygen",
        "--algo=ed25519",
        &format!("-C={}", dir.path().display()),
        "Example.ORG",
        "sel",
    ]));
    let path = dir.path().join("domains/example.org/dkim:sel.pem");
    assert_private_key_file(&path);
    let record = keygen_record(&out, &path);
    assert!(
        record.starts_with("sel._domainkey.example.org\tTXT\t\"v=DKIM1; k=ed25519; p="),
        "{record}"
    );
    // 32 bytes: 44 base64 characters.
    assert_eq!(
        record.len(),
        "sel._domainkey.example.org\tTXT\t\"v=DKIM1; k=ed25519; p=\"\n".len() + 44
    );
    let dns = ok(&tambo(&["dkim-dns", &c_flag(&dir), "example.org", "sel"]));
    assert_eq!(dns, record);

    // An explicit key path, anywhere.
    let elsewhere = dir.path().join("elsewhere.pem");
    let out = ok(&tambo(&[
        "dkim-keygen",
        &c_flag(&dir),
        "example.org",
        "other",
        elsewhere.to_str().unwrap(),
        "--algo",
        "ed25519",
    ]));
    assert_private_key_file(&elsewhere);
    let record = keygen_record(&out, &elsewhere);
    assert!(
        record.starts_with("other._domainkey.example.org\t"),
        "{record}"
    );
    let dns = ok(&tambo(&[
        "dkim-dns",
        &c_flag(&dir),
        "example.org",
        "other",
        elsewhere.to_str().unwrap(),
    ]));
    assert_eq!(dns, record);
    fails(
        &tambo(&[
            "dkim-keygen",
            &c_flag(&dir),
            "example.org",
            "other",
            elsewhere.to_str().unwrap(),
            "--algo=ed25519",
        ]),
        "already exists",
    );
}

#[test]
fn dkim_dns_output_is_exact() {
    let dir = config();
    let domain = dir.path().join("domains/example.org");
    std::fs::copy(testdata("rsa2048.pem"), domain.join("dkim:b-rsa.pem")).unwrap();
    std::fs::copy(testdata("ed25519.pem"), domain.join("dkim:a-ed.pem")).unwrap();
    let spki = std::fs::read_to_string(testdata("rsa2048.spki.b64")).unwrap();
    let raw = std::fs::read_to_string(testdata("ed25519.raw.b64")).unwrap();
    assert_eq!(
        ok(&tambo(&["dkim-dns", &c_flag(&dir), "example.org", "b-rsa"])),
        format!(
            "b-rsa._domainkey.example.org\tTXT\t\"v=DKIM1; k=rsa; p={}\"\n",
            spki.trim()
        )
    );
    let ed = format!(
        "a-ed._domainkey.example.org\tTXT\t\"v=DKIM1; k=ed25519; p={}\"\n",
        raw.trim()
    );
    assert_eq!(
        ok(&tambo(&["dkim-dns", &c_flag(&dir), "example.org", "a-ed"])),
        ed
    );
    // Without a selector: the first key in name order.
    assert_eq!(ok(&tambo(&["dkim-dns", &c_flag(&dir), "example.org"])), ed);
}

#[test]
fn errors_go_to_stderr_with_exit_1() {
    let dir = config();
    let c = c_flag(&dir);
    fails(&tambo(&["dkim-dns", &c, "example.org"]), "no DKIM keys");
    fails(
        &tambo(&["dkim-dns", &c, "example.org", "missing"]),
        "No such file",
    );
    fails(
        &tambo(&["dkim-dns", &c, "unknown.example"]),
        "add the domain first",
    );
    fails(
        &tambo(&["dkim-keygen", &c, "unknown.example"]),
        "add the domain first",
    );
    fails(
        &tambo(&["dkim-keygen", &c, "example.org", "a;b"]),
        "invalid selector",
    );
    fails(
        &tambo(&["dkim-keygen", &c, "example.org", "--algo=dsa"]),
        "dsa",
    );
    fails(&tambo(&["dkim-keygen", &c]), "<DOMAIN>");
    fails(&tambo(&["dkim-dns", &c]), "<DOMAIN>");
    let domain = dir.path().join("domains/example.org");
    std::fs::copy(testdata("p256.pem"), domain.join("dkim:ec.pem")).unwrap();
    fails(
        &tambo(&["dkim-dns", &c, "example.org", "ec"]),
        "dkim:ec.pem: unsupported key type",
    );
    std::fs::copy(testdata("rsa2048-pkcs1.pem"), domain.join("dkim:p1.pem")).unwrap();
    fails(&tambo(&["dkim-dns", &c, "example.org", "p1"]), "(PKCS#1)");
}

#[test]
fn every_command_has_help() {
    for command in ["dkim-keygen", "dkim-dns"] {
        let out = ok(&tambo(&[command, "--help"]));
        assert!(out.contains("--config_dir"), "{out}");
        assert!(out.contains("<DOMAIN>"), "{out}");
    }
    let out = ok(&tambo(&["dkim-keygen", "--help"]));
    assert!(out.contains("rsa3072") && out.contains("ed25519"), "{out}");
}
