//! TLS certificates and their private keys, from `certs/<name>/`
//! (`fullchain.pem` + `privkey.pem`, the Let's Encrypt layout, symlinks
//! followed). The keys are loaded here and never leave queued: smtpd gets
//! the chains, and asks for each handshake signature over its key link
//! (OpenSMTPD's "ca" process does the same).

use std::path::Path;
use std::sync::Arc;

use rustls::SignatureScheme;
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use tambo_common::config::ConfigError;
use tambo_proto::submit::{CertEntry, CertId};

use crate::handshake;

/// Every scheme a key may be able to make, in rustls' order of preference.
const SCHEMES: [SignatureScheme; 10] = [
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA512,
];

/// One certificate with its key.
pub struct Loaded {
    pub id: CertId,
    pub name: String,
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn SigningKey>,
    schemes: Vec<SignatureScheme>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Loaded")
            .field("name", &self.name)
            .field("schemes", &self.schemes)
            .finish_non_exhaustive()
    }
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("no certificate with that id")]
    UnknownCert,
    #[error("the key cannot make signature scheme {0:#06x}")]
    Scheme(u16),
    #[error("not a TLS handshake input: queued signs only ServerKeyExchange and CertificateVerify")]
    NotHandshake,
    #[error("signing failed: {0}")]
    Failed(String),
}

/// What the files under `certs/` look like now (names, sizes, change
/// times, symlinks followed): a new value means something changed, e.g. a
/// certbot renewal, and the certificates are worth loading again.
pub fn files_state(config_dir: &Path) -> FilesState {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(config_dir.join("certs")) else {
        return out;
    };
    for e in entries.flatten() {
        let dir = e.path();
        for f in ["fullchain.pem", "privkey.pem"] {
            if let Ok(m) = std::fs::metadata(dir.join(f)) {
                out.push((
                    format!("{}/{f}", e.file_name().to_string_lossy()),
                    (m.dev(), m.ino()),
                    m.size(),
                    (m.mtime(), m.mtime_nsec()),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Per certificate file: its name, device and inode (a certbot renewal
/// points the symlink at a new file), size and modification time.
pub type FilesState = Vec<(String, (u64, u64), u64, (i64, i64))>;

/// Every usable certificate, in `certs/` name order.
#[derive(Debug, Default)]
pub struct Certs {
    list: Vec<Loaded>,
}

impl Certs {
    /// Loads `<config_dir>/certs/`. Regular files in it are ignored, as is
    /// an entry without `privkey.pem` (logged); an unreadable or invalid
    /// chain or key, or a key that does not match its certificate, is an
    /// error naming the file. No usable pair at all is an error.
    pub fn load(config_dir: &Path) -> Result<Self, ConfigError> {
        let dir = config_dir.join("certs");
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            ConfigError::file(&dir, format!("cannot read the certificates directory: {e}"))
        })?;
        let mut names: Vec<(String, std::path::PathBuf)> = Vec::new();
        for e in entries {
            let e = e.map_err(|e| ConfigError::file(&dir, e.to_string()))?;
            let path = e.path();
            // A directory, or a symlink to one (Let's Encrypt's live/).
            if !path.is_dir() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            names.push((name, path));
        }
        names.sort();
        let mut list = Vec::new();
        for (name, path) in names {
            let key_path = path.join("privkey.pem");
            if !key_path.exists() {
                tracing::warn!("{}: no privkey.pem; certificate skipped", path.display());
                continue;
            }
            list.push(load_one(&name, &path.join("fullchain.pem"), &key_path)?);
        }
        if list.is_empty() {
            return Err(ConfigError::file(
                &dir,
                "no usable certificate: add certs/<name>/fullchain.pem and privkey.pem",
            ));
        }
        for c in &list {
            tracing::info!("certificate {}: {} in the chain", c.name, c.chain.len());
        }
        Ok(Self { list })
    }

    /// The certificates' ids, in order.
    pub fn ids(&self) -> Vec<CertId> {
        self.list.iter().map(|c| c.id).collect()
    }

    /// The chains, for smtpd.
    pub fn entries(&self) -> Vec<CertEntry> {
        self.list
            .iter()
            .map(|c| CertEntry {
                id: c.id,
                name: c.name.clone(),
                chain: c.chain.iter().map(|d| d.as_ref().to_vec()).collect(),
                schemes: c.schemes.iter().map(|s| u16::from(*s)).collect(),
                algorithm: u8::from(c.key.algorithm()),
            })
            .collect()
    }

    /// Signs a TLS handshake input with the key of certificate `id`,
    /// refusing anything that is not shaped like one.
    pub fn sign(&self, id: &CertId, scheme: u16, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let c = self
            .list
            .iter()
            .find(|c| &c.id == id)
            .ok_or(SignError::UnknownCert)?;
        if !handshake::is_signature_input(message) {
            return Err(SignError::NotHandshake);
        }
        let scheme = SignatureScheme::from(scheme);
        let signer = c
            .key
            .choose_scheme(&[scheme])
            .ok_or(SignError::Scheme(u16::from(scheme)))?;
        signer
            .sign(message)
            .map_err(|e| SignError::Failed(e.to_string()))
    }
}

fn load_one(name: &str, chain_path: &Path, key_path: &Path) -> Result<Loaded, ConfigError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain_path)
        .map_err(|e| ConfigError::file(chain_path, format!("cannot read: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError::file(chain_path, format!("invalid PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(ConfigError::file(chain_path, "no certificate in it"));
    };
    let key_der = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| ConfigError::file(key_path, format!("not a private key in PEM: {e}")))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| ConfigError::file(key_path, format!("unsupported key: {e}")))?;
    // A key that does not belong to the certificate would fail every
    // handshake: refuse it here, with the file named.
    CertifiedKey::new(chain.clone(), key.clone())
        .keys_match()
        .map_err(|e| {
            ConfigError::file(
                key_path,
                format!("does not match {}: {e}", chain_path.display()),
            )
        })?;
    let schemes = SCHEMES
        .iter()
        .copied()
        .filter(|s| key.choose_scheme(&[*s]).is_some())
        .collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
    let mut id = [0u8; 32];
    id.copy_from_slice(digest.as_ref());
    Ok(Loaded {
        id,
        name: name.to_string(),
        chain,
        key,
        schemes,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a self-signed certificate for `host` into `certs/<name>/`.
    pub fn write_cert(config_dir: &Path, name: &str, host: &str) {
        let dir = config_dir.join("certs").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("fullchain.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("privkey.pem"), key.serialize_pem()).unwrap();
    }

    #[test]
    fn loads_pairs_in_name_order_and_skips_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "b", "b.example");
        write_cert(dir.path(), "a", "a.example");
        std::fs::create_dir_all(dir.path().join("certs/nokey")).unwrap();
        std::fs::write(dir.path().join("certs/README"), "ignored").unwrap();
        let certs = Certs::load(dir.path()).unwrap();
        let names: Vec<_> = certs.entries().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a", "b"]);
        let e = &certs.entries()[0];
        assert!(
            e.schemes
                .contains(&u16::from(SignatureScheme::ECDSA_NISTP256_SHA256))
        );
        assert!(format!("{:?}", certs.list[0]).contains("\"a\""));
    }

    #[test]
    fn bad_certificates_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Certs::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("certs") && e.contains("cannot read"), "{e}");
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        let e = Certs::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no usable certificate"), "{e}");
        write_cert(dir.path(), "x", "x.example");
        std::fs::write(dir.path().join("certs/x/privkey.pem"), "not a key").unwrap();
        let e = Certs::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("x/privkey.pem"), "{e}");
        // A key of another certificate.
        write_cert(dir.path(), "y", "y.example");
        std::fs::copy(
            dir.path().join("certs/y/privkey.pem"),
            dir.path().join("certs/x/privkey.pem"),
        )
        .unwrap();
        write_cert(dir.path(), "z", "z.example");
        std::fs::copy(
            dir.path().join("certs/z/fullchain.pem"),
            dir.path().join("certs/y/fullchain.pem"),
        )
        .unwrap();
        let e = Certs::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
    }

    #[test]
    fn signs_handshake_inputs_only() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "a", "a.example");
        let certs = Certs::load(dir.path()).unwrap();
        let id = certs.entries()[0].id;
        let scheme = u16::from(SignatureScheme::ECDSA_NISTP256_SHA256);
        let cv = handshake::tests::tls13_certificate_verify(32);
        assert!(!certs.sign(&id, scheme, &cv).unwrap().is_empty());
        assert_eq!(
            certs.sign(&id, scheme, b"a DKIM header, a JWT, anything"),
            Err(SignError::NotHandshake)
        );
        assert_eq!(
            certs.sign(&[0; 32], scheme, &cv),
            Err(SignError::UnknownCert)
        );
        assert!(matches!(
            certs.sign(&id, u16::from(SignatureScheme::RSA_PSS_SHA256), &cv),
            Err(SignError::Scheme(_))
        ));
    }
}
