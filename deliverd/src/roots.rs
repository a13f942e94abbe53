//! The certificate roots deliverd verifies servers against: an MX for
//! TLS_SECURE (REFERENCE §4.5), an MTA-STS policy host (§4.7).
//!
//! The system's store, read once at startup (it honours `SSL_CERT_FILE`
//! and `SSL_CERT_DIR`, as OpenSSL does); `[testing] tls_roots` replaces it
//! with a file of the test's own CA.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use tambo_common::config::Config;

/// Loads the roots. No usable root is not an error (a machine without
/// ca-certificates): every certificate is then TLS_INSECURE, which is
/// logged once here.
pub fn load(cfg: &Config) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    match &cfg.testing.tls_roots {
        Some(path) => {
            let (added, _) = store.add_parsable_certificates(read_pem(path)?);
            if added == 0 {
                return Err(format!("{}: no certificate in it", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            if let Some(e) = found.errors.first() {
                tracing::warn!("reading the system's certificate roots: {e}");
            }
            store.add_parsable_certificates(found.certs);
        }
    }
    if store.is_empty() {
        tracing::warn!(
            "no certificate roots found (is ca-certificates installed?): no server will count as TLS_SECURE, and MTA-STS policies cannot be fetched"
        );
    } else {
        tracing::info!("{} certificate roots loaded", store.len());
    }
    Ok(Arc::new(store))
}

fn read_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))
}
