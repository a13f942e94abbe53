//! `tambo dkim-keygen` and `tambo dkim-dns` (REFERENCE §9, as
//! chasquid-util's): make a domain's DKIM key, and print the DNS TXT record
//! that publishes its public half.
//!
//! Keys are what queued loads (REFERENCE §4.9): a PKCS#8 `PRIVATE KEY` PEM
//! holding RSA (RustCrypto's `rsa` makes them, as ring cannot) or Ed25519
//! (ring). Every record is computed from the PKCS#8 bytes through ring,
//! exactly as queued will parse them, so a key this prints a record for is
//! a key queued accepts; keygen prints the same record `dkim-dns` would.

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding, SecretDocument};

use tambo_common::dkimkey::{self, DkimKey};
use tambo_common::domains::scan_domain_dirs;
use tambo_common::{address, safeio};

/// The key `dkim-keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// RSA, 3072 bits (the default, as in chasquid).
    #[value(name = "rsa3072")]
    Rsa3072,
    /// RSA, 4096 bits.
    #[value(name = "rsa4096")]
    Rsa4096,
    /// Ed25519 (RFC 8463); not every verifier knows it yet, so it is best
    /// published beside an RSA key.
    #[value(name = "ed25519")]
    Ed25519,
}

/// What went wrong, for one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid domain {0:?}: {1}")]
    Domain(String, String),
    #[error("{0}")]
    Config(String),
    #[error("invalid selector {0:?}: use dot-separated labels of letters, digits, '-' and '_'")]
    Selector(String),
    #[error("{dir}: no directory for domain {domain}; add the domain first")]
    NoDomainDir { domain: String, dir: PathBuf },
    #[error("{0}: no DKIM keys (dkim:<selector>.pem)")]
    NoKeys(PathBuf),
    #[error("{0}: key already exists, not overwriting it")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("cannot generate the key: {0}")]
    Generate(String),
    #[error("{0}")]
    Message(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `dkim-keygen <domain> [<selector> [<key path>]] [--algo=…]`: makes a key,
/// writes it (mode 0660, never over an existing file) and returns what to
/// print: where it went and its DNS record.
pub fn keygen(
    config_dir: &Path,
    domain: &str,
    selector: Option<&str>,
    key_path: Option<&Path>,
    algorithm: Algorithm,
) -> Result<String, Error> {
    let domain = Domain::parse(domain)?;
    let selector = match selector {
        Some(s) => checked_selector(s)?,
        None => chrono::Utc::now().format("%Y%m%d").to_string(),
    };
    let path = match key_path {
        Some(p) => p.to_path_buf(),
        None => domain.dir(config_dir)?.join(format!("dkim:{selector}.pem")),
    };
    // Also checked when the key is put in place; this spares the wait for
    // an RSA key that could not be written anyway.
    if path.symlink_metadata().is_ok() {
        return Err(Error::Exists(path));
    }
    let pkcs8 = generate(algorithm)?;
    let record = dkimkey::parse_pkcs8(pkcs8.as_bytes())
        .and_then(|key| dns_record(&domain.ascii, &selector, &key))
        .map_err(|reason| {
            Error::Generate(format!(
                "the new key does not load as queued loads keys: {reason}"
            ))
        })?;
    let pem = pkcs8
        .to_pem("PRIVATE KEY", LineEnding::LF)
        .map_err(|e| Error::Generate(e.to_string()))?;
    write_new_key(&path, pem.as_bytes())?;
    Ok(format!(
        "Key written to \"{}\"\n\n{record}\n",
        path.display()
    ))
}

/// `dkim-dns <domain> [<selector> [<key path>]]`: the DNS record of a key,
/// by default the domain's first `dkim:*.pem` in name order.
pub fn dns(
    config_dir: &Path,
    domain: &str,
    selector: Option<&str>,
    key_path: Option<&Path>,
) -> Result<String, Error> {
    let domain = Domain::parse(domain)?;
    let (selector, path) = key_file(config_dir, &domain, selector, key_path)?;
    let pem = std::fs::read(&path).map_err(io_error(&path))?;
    let bad_key = |reason| Error::BadKey {
        path: path.clone(),
        reason,
    };
    let record = dkimkey::parse(&pem)
        .and_then(|key| dns_record(&domain.ascii, &selector, &key))
        .map_err(bad_key)?;
    Ok(format!("{record}\n"))
}

/// `dkim-sign [<domain> [<selector> [<key path>]]]`: the `DKIM-Signature`
/// field queued would add to `message` (read from standard input, line
/// ends made CRLF), signed with the domain's first key or the one named.
/// The domain defaults to the From: address's.
pub fn sign(
    config_dir: &Path,
    message: &[u8],
    domain: Option<&str>,
    selector: Option<&str>,
    key_path: Option<&Path>,
) -> Result<String, Error> {
    let message = crlf(message);
    let domain = match domain {
        Some(d) => d.to_string(),
        None => from_domain(&message).ok_or_else(|| {
            Error::Message("no From: address with a domain: give the domain".into())
        })?,
    };
    let domain = Domain::parse(&domain)?;
    let (selector, path) = key_file(config_dir, &domain, selector, key_path)?;
    let pem = std::fs::read(&path).map_err(io_error(&path))?;
    let key = dkimkey::parse(&pem).map_err(|reason| Error::BadKey {
        path: path.clone(),
        reason,
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rng = ring::rand::SystemRandom::new();
    tambo_common::dkimsign::Prepared::new(&message)
        .field(&domain.ascii, &selector, key.algorithm(), now, |tbs| {
            key.sign(tbs, &rng)
        })
        .map_err(|ring::error::Unspecified| {
            Error::Message(format!("{}: signing failed", path.display()))
        })
}

/// The selector and key file the commands use: both as given, the file
/// named by the selector in the domain's directory, or the domain's first
/// key.
fn key_file(
    config_dir: &Path,
    domain: &Domain,
    selector: Option<&str>,
    key_path: Option<&Path>,
) -> Result<(String, PathBuf), Error> {
    match (selector, key_path) {
        (Some(s), Some(p)) => Ok((checked_selector(s)?, p.to_path_buf())),
        (Some(s), None) => {
            let s = checked_selector(s)?;
            let path = domain.dir(config_dir)?.join(format!("dkim:{s}.pem"));
            Ok((s, path))
        }
        (None, _) => first_key(&domain.dir(config_dir)?),
    }
}

/// Line ends as CRLF, whatever the input used.
pub(crate) fn crlf(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + m.len() / 32);
    for line in m.split_inclusive(|&b| b == b'\n') {
        let body = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        out.extend_from_slice(body);
        if line.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// The domain of the message's From: address.
fn from_domain(m: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(m);
    let mut value: Option<String> = None;
    for line in text.split("\r\n") {
        if line.is_empty() {
            break;
        }
        match (&mut value, line.starts_with([' ', '\t'])) {
            (Some(v), true) => v.push_str(line),
            (Some(_), false) => break,
            (None, false) => {
                if let Some((n, v)) = line.split_once(':')
                    && n.trim().eq_ignore_ascii_case("from")
                {
                    value = Some(v.to_string());
                }
            }
            (None, true) => {}
        }
    }
    let v = value?;
    let addr = match (v.rfind('<'), v.rfind('>')) {
        (Some(a), Some(b)) if a < b => v[a + 1..b].to_string(),
        _ => v.trim().to_string(),
    };
    addr.rsplit_once('@').map(|(_, d)| d.trim().to_string())
}

/// A domain as given on the command line.
struct Domain {
    /// Normalised as domain directory names are (`Domains::load`).
    name: String,
    /// The A-label form, for DNS and `d=`.
    ascii: String,
}

impl Domain {
    fn parse(raw: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Domain(raw.to_string(), why.to_string());
        let name = address::normalize_domain(raw).map_err(|e| bad(&e.to_string()))?;
        if name.is_empty() {
            return Err(bad("empty"));
        }
        let ascii = idna::domain_to_ascii(&name).map_err(|e| bad(&e.to_string()))?;
        // Only what a DNS owner name can hold, so nothing odd lands in the
        // printed record.
        if !ascii
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(bad("not a DNS name"));
        }
        Ok(Self { name, ascii })
    }

    /// The domain's directory under `<config_dir>/domains`: the one whose
    /// name normalises to this domain, however it is spelt on disk.
    fn dir(&self, config_dir: &Path) -> Result<PathBuf, Error> {
        let domains = config_dir.join("domains");
        // Found as queued finds domains: the same names, the same refusal
        // of a domain with two directories.
        let dirs = scan_domain_dirs(&domains)
            .map_err(|e| Error::Config(e.to_string()))?
            .found;
        dirs.into_iter()
            .find(|(name, _)| *name == self.name)
            .map(|(_, path)| path)
            .ok_or(Error::NoDomainDir {
                domain: self.name.clone(),
                dir: domains,
            })
    }
}

/// queued's rule (`tambo_common::dkimkey::valid_selector`), as an error.
fn checked_selector(s: &str) -> Result<String, Error> {
    if dkimkey::valid_selector(s) {
        Ok(s.to_string())
    } else {
        Err(Error::Selector(s.to_string()))
    }
}

/// The first `dkim:<selector>.pem` of a domain directory, in name order
/// (as chasquid-util's glob), and its selector.
fn first_key(dir: &Path) -> Result<(String, PathBuf), Error> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        let selector = name.to_str().and_then(dkimkey::selector_of);
        if let Some(selector) = selector {
            found.push((selector.to_string(), entry.path()));
        }
    }
    found.sort();
    let (selector, path) = found
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoKeys(dir.to_path_buf()))?;
    Ok((checked_selector(&selector)?, path))
}

/// The PKCS#8 DER of a new key.
fn generate(algorithm: Algorithm) -> Result<SecretDocument, Error> {
    let bits = match algorithm {
        Algorithm::Rsa3072 => 3072,
        Algorithm::Rsa4096 => 4096,
        Algorithm::Ed25519 => {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|e| Error::Generate(format!("Ed25519: {e}")))?;
            return SecretDocument::try_from(pkcs8.as_ref())
                .map_err(|e| Error::Generate(e.to_string()));
        }
    };
    // Exponent 65537; the primes come from the operating system's RNG.
    let key = rsa::PrivateKey::new(&mut getrandom_sys_rng::SysRng, bits)
        .map_err(|e| Error::Generate(format!("RSA: {e}")))?;
    key.to_pkcs8_der()
        .map_err(|e| Error::Generate(e.to_string()))
}

/// `<selector>._domainkey.<domain>` TAB `TXT` TAB `"v=DKIM1; k=…; p=…"`,
/// with `p=` the SubjectPublicKeyInfo DER (RSA) or the raw 32-byte key
/// (Ed25519, RFC 8463 §4.2), in base64.
fn dns_record(domain: &str, selector: &str, key: &DkimKey) -> Result<String, String> {
    let (k, public) = match key {
        DkimKey::Ed25519(pair) => ("ed25519", pair.public_key().as_ref().to_vec()),
        DkimKey::Rsa(pair) => {
            // ring gives the public key as a PKCS#1 RSAPublicKey; DNS
            // carries it wrapped in a SubjectPublicKeyInfo, as everyone
            // publishes it.
            let public = rsa::PublicKey::from_pkcs1_der(pair.public_key().as_ref())
                .map_err(|e| format!("cannot read the RSA public key: {e}"))?;
            let spki = public
                .to_public_key_der()
                .map_err(|e| format!("cannot encode the RSA public key: {e}"))?;
            ("rsa", spki.as_bytes().to_vec())
        }
    };
    Ok(format!(
        "{selector}._domainkey.{domain}\tTXT\t\"v=DKIM1; k={k}; p={}\"",
        BASE64.encode(public)
    ))
}

/// Writes a new key file: mode 0660 whatever the umask, never over an
/// existing name (a symlink included), and never half-written under its
/// name. The key goes to a temporary file in the same directory first and
/// is then hard-linked into place, which fails if the name exists; a crash
/// leaves at worst a dot-file, which queued ignores.
fn write_new_key(path: &Path, pem: &[u8]) -> Result<(), Error> {
    // Mode 0660 set explicitly: tambo's umask (077) would take the group's
    // bits away, and the group is how queued gets to read the key.
    let tmp = safeio::write_temp(path, pem, 0o660).map_err(io_error(path))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::Exists(path.to_path_buf()));
        }
        Err(e) => return Err(io_error(path)(e)),
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    safeio::fsync_dir(dir).map_err(io_error(dir))
}
