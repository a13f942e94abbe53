use super::*;
use ring::signature::Ed25519KeyPair;
use std::io::Write;
use std::process::{Command, Stdio};

// Test-only keys (testdata/README says how they were made).
const RSA2048: &str = include_str!("testdata/rsa2048.pem");
const RSA2048_SPKI: &str = include_str!("testdata/rsa2048.spki.b64");
const RSA2048_PKCS1: &str = include_str!("testdata/rsa2048-pkcs1.pem");
const RSA1024: &str = include_str!("testdata/rsa1024.pem");
const ED25519_V1: &str = include_str!("testdata/ed25519.pem");
const ED25519_RAW: &str = include_str!("testdata/ed25519.raw.b64");
const P256: &str = include_str!("testdata/p256.pem");

fn rsa_txt() -> String {
    format!("v=DKIM1; k=rsa; p={}", RSA2048_SPKI.trim())
}

fn ed25519_txt() -> String {
    format!("v=DKIM1; k=ed25519; p={}", ED25519_RAW.trim())
}

/// A config dir whose `domains/` holds `files` (paths relative to it).
fn config(files: &[(&str, &str)]) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let domains = dir.path().join("domains");
    std::fs::create_dir(&domains).unwrap();
    for (path, contents) in files {
        let path = domains.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
    }
    let cfg = Config::defaults(dir.path());
    (dir, cfg)
}

fn load(files: &[(&str, &str)]) -> Result<DkimKeys, ConfigError> {
    let (_dir, cfg) = config(files);
    DkimKeys::load(&cfg)
}

const MESSAGE: &[u8] = b"From: Ann <ann@example.org>\r\n\
To: bob@elsewhere.example,\r\n  carl@elsewhere.example\r\n\
Subject:   Hello\t there  \r\n\
Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\
Message-ID: <1@example.org>\r\n\
X-Unsigned: yes\r\n\
\r\n\
Hi Bob,\r\n\
\r\n\
  spaced   body \t\r\n\
\r\n\
\r\n";

/// The interpreter Debian's python3-dkim installs into; `python3` on PATH
/// may be another one (pyenv, a venv) without it.
const PYTHON: &str = "/usr/bin/python3";

/// Verifies every DKIM-Signature of the message on stdin with dkimpy (an
/// implementation independent of mail-auth and ring), answering TXT
/// lookups only from the arguments (name, record, name, record…). Prints
/// one "pass" or "fail" per signature, top to bottom; its debug log (what
/// it hashed) goes to stderr.
const DKIMPY: &str = r#"
import logging, sys
try:
    import dkim, nacl.signing
except ImportError as e:
    sys.stderr.write("cannot import %s: the DKIM tests need Debian's python3-dkim and "
                     "python3-nacl (apt-get install -y python3-dkim python3-nacl)\n" % e.name)
    sys.exit(3)
logging.basicConfig(stream=sys.stderr, level=logging.DEBUG)
args = sys.argv[1:]
records = {args[i].encode(): args[i + 1].encode() for i in range(0, len(args), 2)}
asked = []
def dnsfunc(name, timeout=5):
    name = name.rstrip(b".")
    asked.append(name)
    return records.get(name)
def verify(d, i):
    # dkimpy reports some failures (e.g. a body hash mismatch) by raising.
    try:
        return "pass" if d.verify(idx=i, dnsfunc=dnsfunc) else "fail"
    except dkim.DKIMException as e:
        sys.stderr.write("signature %d: %s\n" % (i, e))
        return "fail"
d = dkim.DKIM(sys.stdin.buffer.read(), logger=logging.getLogger("dkim"))
n = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
print(" ".join(verify(d, i) for i in range(n)))
unknown = [name for name in asked if name not in records]
if unknown:
    sys.stderr.write("unexpected TXT lookups: %r\n" % unknown)
    sys.exit(4)
"#;

/// dkimpy's verdicts on `message`, one per signature, and its log.
fn dkimpy(message: &[u8], records: &[(&str, &str)]) -> (String, String) {
    let mut cmd = Command::new(PYTHON);
    cmd.arg("-c").arg(DKIMPY);
    for (name, txt) in records {
        cmd.arg(name).arg(txt);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {PYTHON}: {e}; the DKIM tests need Debian's python3 with \
                 python3-dkim and python3-nacl"
            )
        });
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "dkimpy failed ({}):\n{log}",
        out.status
    );
    (
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
        log,
    )
}

fn assert_dkimpy(message: &[u8], records: &[(&str, &str)], want: &str) {
    let (got, log) = dkimpy(message, records);
    assert_eq!(
        got,
        want,
        "dkimpy's verdicts differ; message:\n{}\nlog:\n{log}",
        String::from_utf8_lossy(message)
    );
}

/// `message` with `fields` on top, as the caller of `sign` makes it.
fn signed(fields: &[u8], message: &[u8]) -> Vec<u8> {
    [fields, message].concat()
}

/// The tags of one field, unfolded: (name, value without whitespace).
fn tags(field: &str) -> Vec<(String, String)> {
    let value = field.strip_prefix("DKIM-Signature:").unwrap();
    value
        .split(';')
        .map(|t| t.chars().filter(|c| !c.is_whitespace()).collect::<String>())
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (k, v) = t.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn tag<'a>(tags: &'a [(String, String)], name: &str) -> &'a str {
    &tags.iter().find(|(k, _)| k == name).unwrap().1
}

/// One field per `DKIM-Signature:` line start.
fn fields(out: &[u8]) -> Vec<String> {
    let out = std::str::from_utf8(out).unwrap();
    out.split_inclusive("\r\n")
        .fold(Vec::<String>::new(), |mut acc, line| {
            if line.starts_with("DKIM-Signature:") {
                acc.push(line.to_string());
            } else {
                acc.last_mut().expect("continuation first").push_str(line);
            }
            acc
        })
}

#[test]
fn loads_rsa_and_ed25519_keys_in_selector_order() {
    let keys = load(&[
        ("Example.ORG/dkim:sel-b.pem", RSA2048),
        ("Example.ORG/dkim:sel-a.pem", ED25519_V1),
        ("Example.ORG/users", ""),
        ("Example.ORG/dkim-notes.txt", "not a key"),
        ("Example.ORG/dkim:old.pem.bak", "not a key"),
        ("other.example/aliases", ""),
        ("README", "regular files in domains/ are ignored"),
    ])
    .unwrap();
    assert_eq!(keys.count("example.org"), 2);
    assert_eq!(keys.count("EXAMPLE.org"), 2);
    assert_eq!(keys.count("other.example"), 0);
    assert_eq!(keys.count("nowhere.example"), 0);
    let debug = format!("{keys:?}");
    assert_eq!(
        debug,
        r#"{"example.org": ["sel-a (ed25519-sha256)", "sel-b (rsa-sha256)"]}"#
    );
}

#[test]
fn ed25519_v1_key_has_the_right_public_half() {
    let KeyPair::Ed25519(k) = dkimkey::parse(ED25519_V1.as_bytes()).unwrap() else {
        panic!("not Ed25519");
    };
    use base64::Engine;
    use ring::signature::KeyPair as _;
    let raw = base64::engine::general_purpose::STANDARD.encode(k.public_key().as_ref());
    assert_eq!(raw, ED25519_RAW.trim());
}

#[test]
fn refuses_bad_keys_naming_file_and_reason() {
    let garbage_der = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    let bad_base64 = "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n";
    let cases: &[(&str, &str, &str)] = &[
        ("dkim:s.pem", "no key here\n", "no PEM key block"),
        ("dkim:s.pem", "", "no PEM key block"),
        ("dkim:s.pem", bad_base64, "bad PEM"),
        ("dkim:s.pem", RSA2048_PKCS1, "\"RSA PRIVATE KEY\" (PKCS#1)"),
        ("dkim:s.pem", P256, "unsupported key type"),
        ("dkim:s.pem", RSA1024, "RSA key too small"),
        ("dkim:s.pem", garbage_der, "invalid PKCS#8 key"),
        (
            "dkim:bad;sel.pem",
            RSA2048,
            "invalid DKIM selector \"bad;sel\"",
        ),
        ("dkim:.pem", RSA2048, "invalid DKIM selector \"\""),
        ("dkim:a..b.pem", RSA2048, "invalid DKIM selector"),
    ];
    for (file, contents, reason) in cases {
        // A good key beside it changes nothing.
        let err = load(&[
            ("example.org/dkim:good.pem", RSA2048),
            (&format!("example.org/{file}"), contents),
        ])
        .err()
        .unwrap_or_else(|| panic!("{file} with {reason:?} loaded"));
        let text = err.to_string();
        assert!(
            text.contains(&format!("domains/example.org/{file}: ")) && text.contains(reason),
            "{text}"
        );
    }
}

#[test]
fn refuses_a_key_that_is_not_a_file() {
    let (dir, cfg) = config(&[("example.org/users", "")]);
    std::fs::create_dir(dir.path().join("domains/example.org/dkim:d.pem")).unwrap();
    let err = DkimKeys::load(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("dkim:d.pem: a DKIM key must be a regular file"),
        "{err}"
    );
}

#[test]
fn refuses_a_domain_that_cannot_be_a_d_tag() {
    let err = load(&[("exa;mple.org/dkim:a.pem", RSA2048)])
        .unwrap_err()
        .to_string();
    // Refused where domains are found, before any key is read.
    assert!(
        err.contains("exa;mple.org") && err.contains("not a domain name"),
        "{err}"
    );
}

#[test]
fn refuses_two_directories_for_one_domain() {
    let err = load(&[
        ("Example.ORG/dkim:a.pem", RSA2048),
        ("example.org/dkim:b.pem", ED25519_V1),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("names the same domain as"), "{err}");
}

#[test]
fn refuses_a_domain_name_that_does_not_normalise() {
    let err = load(&[("bad domain/dkim:a.pem", RSA2048)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid domain name"), "{err}");
}

#[test]
fn keys_can_be_shared_with_the_signing_pool() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DkimKeys>();
}

#[test]
fn a_domain_without_keys_gets_no_signature() {
    let keys = load(&[("example.org/users", "")]).unwrap();
    assert!(keys.sign("example.org", MESSAGE).unwrap().is_empty());
    assert!(keys.sign("", MESSAGE).unwrap().is_empty());
    assert!(
        DkimKeys::default()
            .sign("example.org", MESSAGE)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn field_has_exactly_the_tags_and_the_folding() {
    let keys = load(&[("example.org/dkim:sel.pem", ED25519_V1)]).unwrap();
    let out = keys.sign_at("example.org", MESSAGE, 1_700_000_000).unwrap();
    let out = String::from_utf8(out).unwrap();
    let expected_start = "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n\
        \td=example.org; s=sel; t=1700000000;\r\n\
        \th=from:subject:date:to:message-id:from:subject:date:to:cc:message-id;\r\n\
        \tbh=";
    assert!(out.starts_with(expected_start), "{out}");
    assert!(out.ends_with(";\r\n"), "{out}");
    assert_eq!(fields(out.as_bytes()).len(), 1);
    for line in out.strip_suffix("\r\n").unwrap().split("\r\n") {
        assert!(line.len() <= 70, "{line:?} is longer than 70");
        assert!(!line.contains(['\r', '\n']), "bare CR or LF in {line:?}");
    }
    let tags = tags(&out);
    let names: Vec<&str> = tags.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["v", "a", "c", "d", "s", "t", "h", "bh", "b"]);
    assert_eq!(
        tag(&tags, "b").len(),
        88,
        "an Ed25519 signature is 64 bytes"
    );
    // Ed25519 is deterministic: the same input, the same field.
    let again = keys.sign_at("example.org", MESSAGE, 1_700_000_000).unwrap();
    assert_eq!(out.as_bytes(), again);
}

#[test]
fn h_lists_each_instance_then_oversigns_and_folds() {
    let keys = load(&[("example.org/dkim:sel.pem", RSA2048)]).unwrap();
    let message = b"Received: from x\r\nTO: a@x\r\nFROM: ann@example.org\r\nCc: b@x\r\n\
        To: c@x\r\nReply-To: r@x\r\nIn-Reply-To: <0@x>\r\nReferences: <0@x>\r\n\
        List-Id: <l.x>\r\nList-Unsubscribe: <mailto:u@x>\r\nList-Post: <mailto:l@x>\r\n\
        Resent-From: rf@x\r\nResent-To: rt@x\r\nResent-Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\
        Resent-Cc: rc@x\r\nList-Help: <mailto:h@x>\r\nList-Subscribe: <mailto:s@x>\r\n\
        List-Owner: <mailto:o@x>\r\nList-Archive: <https://x/>\r\nX-Mailer: y\r\n\r\nbody\r\n";
    let out = keys.sign("example.org", message).unwrap();
    let fields = fields(&out);
    assert_eq!(fields.len(), 1);
    let tags = tags(&fields[0]);
    assert_eq!(
        tag(&tags, "h"),
        "from:reply-to:to:to:cc:resent-date:resent-from:resent-to:resent-cc:\
         in-reply-to:references:list-id:list-help:list-unsubscribe:list-subscribe:\
         list-post:list-owner:list-archive:from:subject:date:to:cc:message-id"
    );
    for name in ["x", "l", "i"] {
        assert!(tags.iter().all(|(k, _)| k != name), "{name}= in {tags:?}");
    }
    // h= spans several lines, each continuation indented.
    let h_lines = fields[0]
        .split("\r\n")
        .skip_while(|l| !l.starts_with("\th="))
        .take_while(|l| !l.starts_with("\tbh="))
        .collect::<Vec<_>>();
    assert!(h_lines.len() > 2, "{h_lines:?}");
    assert!(
        h_lines[1..].iter().all(|l| l.starts_with("\t  ")),
        "{h_lines:?}"
    );
    assert!(h_lines.iter().all(|l| l.len() <= 70), "{h_lines:?}");
    assert_dkimpy(
        &signed(&out, message),
        &[("sel._domainkey.example.org", &rsa_txt())],
        "pass",
    );
}

#[test]
fn dkimpy_verifies_rsa() {
    let keys = load(&[("example.org/dkim:sel.pem", RSA2048)]).unwrap();
    let out = keys.sign("example.org", MESSAGE).unwrap();
    let tags = tags(&fields(&out)[0]);
    assert_eq!(tag(&tags, "a"), "rsa-sha256");
    assert_eq!(
        tag(&tags, "b").len(),
        344,
        "an RSA-2048 signature is 256 bytes"
    );
    let txt = rsa_txt();
    let dns = [("sel._domainkey.example.org", txt.as_str())];
    assert_dkimpy(&signed(&out, MESSAGE), &dns, "pass");
}

#[test]
fn dkimpy_verifies_ed25519() {
    let keys = load(&[("example.org/dkim:sel.pem", ED25519_V1)]).unwrap();
    let out = keys.sign("example.org", MESSAGE).unwrap();
    let txt = ed25519_txt();
    let dns = [("sel._domainkey.example.org", txt.as_str())];
    assert_dkimpy(&signed(&out, MESSAGE), &dns, "pass");
}

#[test]
fn dkimpy_verifies_a_ring_generated_ed25519_v2_key() {
    use ring::signature::KeyPair as _;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let public = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        b64.encode(pkcs8.as_ref())
    );
    let keys = load(&[("example.org/dkim:v2.pem", &pem)]).unwrap();
    let out = keys.sign("example.org", MESSAGE).unwrap();
    let txt = format!(
        "v=DKIM1; k=ed25519; p={}",
        b64.encode(public.public_key().as_ref())
    );
    let dns = [("v2._domainkey.example.org", txt.as_str())];
    assert_dkimpy(&signed(&out, MESSAGE), &dns, "pass");
}

#[test]
fn every_key_of_the_domain_signs() {
    let keys = load(&[
        ("example.org/dkim:2-rsa.pem", RSA2048),
        ("example.org/dkim:1-ed.pem", ED25519_V1),
    ])
    .unwrap();
    let out = keys.sign("example.org", MESSAGE).unwrap();
    let fields = fields(&out);
    assert_eq!(fields.len(), 2);
    assert_eq!(tag(&tags(&fields[0]), "s"), "1-ed");
    assert_eq!(tag(&tags(&fields[1]), "s"), "2-rsa");
    let (rsa, ed) = (rsa_txt(), ed25519_txt());
    let dns = [
        ("2-rsa._domainkey.example.org", rsa.as_str()),
        ("1-ed._domainkey.example.org", ed.as_str()),
    ];
    assert_dkimpy(&signed(&out, MESSAGE), &dns, "pass pass");
}

#[test]
fn changes_after_signing_fail_verification() {
    let keys = load(&[
        ("example.org/dkim:r.pem", RSA2048),
        ("example.org/dkim:e.pem", ED25519_V1),
    ])
    .unwrap();
    let out = keys.sign("example.org", MESSAGE).unwrap();
    let (rsa, ed) = (rsa_txt(), ed25519_txt());
    let dns = [
        ("r._domainkey.example.org", rsa.as_str()),
        ("e._domainkey.example.org", ed.as_str()),
    ];
    let message = signed(&out, MESSAGE);
    let replace = |from: &str, to: &str| {
        let text = String::from_utf8(message.clone()).unwrap();
        assert!(text.contains(from));
        text.replacen(from, to, 1).into_bytes()
    };
    // Still good: an unsigned header added, whitespace changed (relaxed).
    let mut more = out.clone();
    more.extend_from_slice(b"X-Added: by a relay\r\n");
    more.extend_from_slice(MESSAGE);
    assert_dkimpy(&more, &dns, "pass pass");
    assert_dkimpy(&replace("Hi Bob,", "Hi  Bob,  "), &dns, "pass pass");
    // Broken: the body, a signed header, an over-signed header added.
    assert_dkimpy(&replace("Hi Bob,", "Hi Eve,"), &dns, "fail fail");
    assert_dkimpy(&replace("\r\n\r\n\r\n", "\r\nP.S.\r\n"), &dns, "fail fail");
    assert_dkimpy(&replace("Hello", "Hullo"), &dns, "fail fail");
    let mut added = out.clone();
    added.extend_from_slice(b"Subject: a second subject\r\n");
    added.extend_from_slice(MESSAGE);
    assert_dkimpy(&added, &dns, "fail fail");
    let mut added_cc = out.clone();
    added_cc.extend_from_slice(MESSAGE);
    let text = String::from_utf8(added_cc).unwrap();
    let added_cc = text.replacen("X-Unsigned", "Cc: eve@x\r\nX-Unsigned", 1);
    assert_dkimpy(added_cc.as_bytes(), &dns, "fail fail");
}

#[test]
fn dkimpy_verifies_odd_messages() {
    let keys = load(&[
        ("example.org/dkim:r.pem", RSA2048),
        ("example.org/dkim:e.pem", ED25519_V1),
    ])
    .unwrap();
    let (rsa, ed) = (rsa_txt(), ed25519_txt());
    let dns = [
        ("r._domainkey.example.org", rsa.as_str()),
        ("e._domainkey.example.org", ed.as_str()),
    ];
    let long_subject = format!("Subject: {}\r\n", "word ".repeat(60));
    let messages: Vec<Vec<u8>> = vec![
        // Empty body; no body at all.
        b"From: a@example.org\r\nSubject: empty\r\n\r\n".to_vec(),
        b"From: a@example.org\r\nSubject: no body\r\n".to_vec(),
        // Body of empty lines only; body without a final line end.
        b"From: a@example.org\r\n\r\n\r\n\r\n\r\n".to_vec(),
        b"From: a@example.org\r\n\r\nno final CRLF".to_vec(),
        // No From at all (still signed; h= over-signs it).
        b"Subject: x\r\n\r\nbody\r\n".to_vec(),
        // Repeated signed headers, folded and tab-laden values.
        b"From: a@example.org\r\nTo: one@x\r\nTo:\ttwo@x,\r\n\t three@x\r\n\
          Subject: =?UTF-8?Q?caf=C3=A9?=\r\nTo:    four@x   \r\n\r\nbody\r\n"
            .to_vec(),
        // A long header and 8-bit content.
        format!("From: a@example.org\r\n{long_subject}\r\nCaf\u{e9} \u{2603}\r\n").into_bytes(),
    ];
    for message in messages {
        let out = keys.sign("example.org", &message).unwrap();
        assert_dkimpy(&signed(&out, &message), &dns, "pass pass");
    }
}

#[test]
fn an_idn_domain_signs_with_its_a_label() {
    let keys = load(&[("Ñandú.example/dkim:sel.pem", ED25519_V1)]).unwrap();
    assert_eq!(keys.count("ñandú.example"), 1);
    assert_eq!(keys.count("xn--and-6ma2c.example"), 1);
    let out = keys.sign("ñandú.example", MESSAGE).unwrap();
    assert_eq!(tag(&tags(&fields(&out)[0]), "d"), "xn--and-6ma2c.example");
    let txt = ed25519_txt();
    let dns = [("sel._domainkey.xn--and-6ma2c.example", txt.as_str())];
    assert_dkimpy(&signed(&out, MESSAGE), &dns, "pass");
}
