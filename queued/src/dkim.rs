//! DKIM signing (REFERENCE §4.9): the private keys under
//! `domains/<domain>/dkim:<selector>.pem`, loaded once at startup, and the
//! `DKIM-Signature` header fields made with them for authenticated mail.
//!
//! The keys never leave queued (DESIGN "Processes"). Signing is CPU work (an
//! RSA-3072 signature takes a few milliseconds optimised, far more in a
//! debug build), so callers run [`DkimKeys::sign`] on a blocking pool.
//!
//! Keys are PKCS#8 (`PRIVATE KEY` PEM), RSA of 2048 to 4096 bits or Ed25519;
//! ring parses them and makes the signatures. Anything else is refused at
//! startup with the file and the reason. How the header field is built is
//! in `sign`.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use ring::rand::SystemRandom;

use tambo_common::address;
use tambo_common::config::{Config, ConfigError};
use tambo_common::dkimkey::{self, DkimKey as KeyPair};
use tambo_common::domains::scan_domain_dirs;

/// Why a message could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DkimError {
    /// ring refused to sign. With a key it accepted at startup this only
    /// happens on an internal failure, such as the system RNG (RSA signing
    /// draws random numbers for blinding).
    #[error("signing with DKIM key {selector} of {domain} failed")]
    Sign { domain: String, selector: String },
}

/// Every domain's DKIM keys, by normalised domain name.
pub struct DkimKeys {
    domains: BTreeMap<String, DomainKeys>,
    /// For RSA blinding.
    rng: SystemRandom,
}

/// The keys of one domain.
struct DomainKeys {
    /// The domain as `d=` names it: the A-label (ASCII) form, which every
    /// verifier can look up.
    d: String,
    /// In selector order; every key signs each message.
    keys: Vec<Key>,
}

struct Key {
    selector: String,
    pair: KeyPair,
}

impl fmt::Debug for DkimKeys {
    /// Domains, selectors and algorithms; never key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, dk) in &self.domains {
            let keys: Vec<String> = dk
                .keys
                .iter()
                .map(|k| format!("{} ({})", k.selector, k.pair.algorithm()))
                .collect();
            map.entry(name, &keys);
        }
        map.finish()
    }
}

impl Default for DkimKeys {
    /// No keys: nothing gets signed.
    fn default() -> Self {
        Self {
            domains: BTreeMap::new(),
            rng: SystemRandom::new(),
        }
    }
}

impl DkimKeys {
    /// Reads `domains/<d>/dkim:<selector>.pem` for every domain directory.
    /// Domain directories are found and named as `Domains::load` does
    /// (directories only, names normalised). Any problem is fatal and names
    /// the file and the reason: an unreadable file, a bad PEM, a block that
    /// is not `PRIVATE KEY`, a key that is neither RSA (2048–4096 bits) nor
    /// Ed25519, a selector that cannot be one, or two directories that
    /// normalise to the same domain.
    pub fn load(cfg: &Config) -> Result<Self, ConfigError> {
        let dir = cfg.config_dir.join("domains");
        let mut domains = BTreeMap::new();
        for (name, path) in scan_domain_dirs(&dir)?.found {
            let keys = load_domain(&path)?;
            if keys.is_empty() {
                continue;
            }
            let d = idna::domain_to_ascii(&name).map_err(|e| {
                ConfigError::file(&path, format!("domain name has no ASCII form: {e}"))
            })?;
            // d= must be a DNS name: anything else could end the tag.
            if !d
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            {
                return Err(ConfigError::file(
                    &path,
                    format!("domain {d:?} cannot sign with DKIM: it is not a DNS name"),
                ));
            }
            domains.insert(name, DomainKeys { d, keys });
        }
        Ok(Self {
            domains,
            rng: SystemRandom::new(),
        })
    }

    /// How many keys sign for `domain` (any spelling that normalises to it).
    pub fn count(&self, domain: &str) -> usize {
        self.get(domain).map_or(0, |dk| dk.keys.len())
    }

    /// The `DKIM-Signature` header fields to put on top of `message`, one
    /// per key of `domain`, each folded and ending in CRLF; empty when the
    /// domain has no keys. `message` is the whole message: CRLF-terminated
    /// header lines, an empty line, the body.
    pub fn sign(&self, domain: &str, message: &[u8]) -> Result<Vec<u8>, DkimError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.sign_at(domain, message, now)
    }

    /// [`sign`](Self::sign) with the signing time `t=` given.
    fn sign_at(&self, domain: &str, message: &[u8], now: u64) -> Result<Vec<u8>, DkimError> {
        let Some(dk) = self.get(domain) else {
            return Ok(Vec::new());
        };
        let prepared = tambo_common::dkimsign::Prepared::new(message);
        let mut out = Vec::new();
        for key in &dk.keys {
            let field = prepared
                .field(&dk.d, &key.selector, key.pair.algorithm(), now, |tbs| {
                    key.pair.sign(tbs, &self.rng)
                })
                .map_err(|ring::error::Unspecified| DkimError::Sign {
                    domain: dk.d.clone(),
                    selector: key.selector.clone(),
                })?;
            out.extend_from_slice(field.as_bytes());
        }
        Ok(out)
    }

    fn get(&self, domain: &str) -> Option<&DomainKeys> {
        let name = address::normalize_domain(domain).ok()?;
        self.domains.get(&name)
    }
}

/// The keys in one domain directory, in selector order.
fn load_domain(dir: &Path) -> Result<Vec<Key>, ConfigError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigError::file(dir, format!("cannot read the domain directory: {e}")))?;
    let mut keys = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ConfigError::file(dir, e.to_string()))?;
        let path = entry.path();
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            use std::os::unix::ffi::OsStrExt;
            if entry.file_name().as_bytes().starts_with(b"dkim:") {
                return Err(ConfigError::file(&path, "DKIM key file name is not UTF-8"));
            }
            continue;
        };
        let Some(selector) = dkimkey::selector_of(file_name) else {
            continue;
        };
        if !dkimkey::valid_selector(selector) {
            return Err(ConfigError::file(
                &path,
                format!(
                    "invalid DKIM selector {selector:?}: use dot-separated labels of \
                     letters, digits, '-' and '_'"
                ),
            ));
        }
        let pair = read_key(&path)?;
        keys.push(Key {
            selector: selector.to_string(),
            pair,
        });
    }
    keys.sort_by(|a, b| a.selector.cmp(&b.selector));
    Ok(keys)
}

fn read_key(path: &Path) -> Result<KeyPair, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let unreadable =
        |e: std::io::Error| ConfigError::file(path, format!("cannot read the DKIM key: {e}"));
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(ConfigError::file(path, "a DKIM key must be a regular file"));
    }
    if meta.permissions().mode() & 0o007 != 0 {
        tracing::warn!(
            file = %path.display(),
            "DKIM private key is accessible to every user; chmod o-rwx it"
        );
    }
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(unreadable)?;
    dkimkey::parse(&pem).map_err(|reason| ConfigError::file(path, reason))
}
