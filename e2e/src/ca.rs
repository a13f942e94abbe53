//! A test certificate authority (rcgen): leaf certificates it signs verify
//! against its root, which deliverd is given instead of the system's with
//! `[testing] tls_roots = "<file>"` (see [`TestCa::write_roots`]). Servers
//! the tests run (the MTA-STS policy server, mx.py with STARTTLS) present
//! its leaves, so "verified TLS" can be tested without the internet.
//!
//! ```no_run
//! use tambo_e2e::ca::TestCa;
//! let dir = tempfile::tempdir().unwrap();
//! let ca = TestCa::new();
//! ca.write_roots(&dir.path().join("roots.pem"));
//! let (cert, key) = ca.write_leaf(dir.path(), "mx", &["mx.dest.test"]);
//! # let _ = (cert, key);
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// A CA: a self-signed root and its key.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A new CA with a fresh key (each test's CA is its own).
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        // A name of its own: a certificate from another test's CA is then
        // "unknown issuer", not a confusing bad signature.
        let id = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u8(0);
            h.finish()
        };
        dn.push(DnType::CommonName, format!("tambo test CA {id:016x}"));
        dn.push(DnType::OrganizationName, "tambo e2e");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn sign(&self, names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let mut dn = DistinguishedName::new();
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, *first);
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed
    /// by this CA: (certificate PEM, private key PEM in PKCS#8).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        self.sign(names, |_| {})
    }

    /// Like [`leaf`](Self::leaf) but expired (valid 2000-01-01 to
    /// 2001-01-01): verification fails on its dates alone.
    pub fn expired_leaf(&self, names: &[&str]) -> (String, String) {
        self.sign(names, |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        })
    }

    /// Writes a [`leaf`](Self::leaf) for `names` as `dir/<stem>.crt` and
    /// `dir/<stem>.key`; returns their paths (for mx.py's `--tls-cert` and
    /// `--tls-key`).
    pub fn write_leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(names);
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        (cert_path, key_path)
    }

    /// The root certificate, PEM.
    pub fn roots_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The root certificate, DER (for a rustls `RootCertStore`).
    pub fn root_der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// Writes [`roots_pem`](Self::roots_pem) to `path`: the file for
    /// `[testing] tls_roots`.
    pub fn write_roots(&self, path: &Path) {
        std::fs::write(path, self.roots_pem())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
