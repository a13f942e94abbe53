//! STARTTLS for outgoing SMTP: every certificate is accepted, and whether
//! it is valid decides the connection's security level (REFERENCE §4.5).
//!
//! Many mail servers present self-signed or mismatched certificates, and
//! opportunistic TLS (RFC 7435) is still better than none; the verdict is
//! kept so domaininfo can refuse a later downgrade, and MTA-STS can demand
//! a valid one. The handshake signatures are always verified for real: a
//! connection must at least be with whoever holds the certificate's key.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

use tambo_proto::deliver::SecLevel;

/// What deliverd's TLS client needs, made once.
pub struct TlsClient {
    provider: Arc<CryptoProvider>,
    /// None when there are no roots at all: then nothing is TLS_SECURE.
    webpki: Option<Arc<WebPkiServerVerifier>>,
}

/// The verdict on one connection's certificate, written by the verifier
/// during the handshake.
#[derive(Debug, Default)]
pub struct Verdict(Mutex<Option<Result<(), String>>>);

impl Verdict {
    /// TLS_SECURE if the certificate verified, else TLS_INSECURE (also
    /// when no certificate was checked, which cannot happen with
    /// resumption disabled, but must not count as secure if it did).
    pub fn level(&self) -> (SecLevel, Option<String>) {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(())) => (SecLevel::TlsSecure, None),
            Some(Err(why)) => (SecLevel::TlsInsecure, Some(why.clone())),
            None => (SecLevel::TlsInsecure, Some("no certificate seen".into())),
        }
    }
}

impl TlsClient {
    pub fn new(roots: Arc<RootCertStore>) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .ok();
        TlsClient { provider, webpki }
    }

    /// A connector for one connection, and where its verdict will be.
    pub fn connector(&self) -> Result<(TlsConnector, Arc<Verdict>), rustls::Error> {
        let verdict = Arc::new(Verdict::default());
        let verifier = Recording {
            webpki: self.webpki.clone(),
            provider: self.provider.clone(),
            verdict: verdict.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // A resumed session skips the certificate, and with it the verdict.
        config.resumption = rustls::client::Resumption::disabled();
        Ok((TlsConnector::from(Arc::new(config)), verdict))
    }
}

/// Accepts any certificate after recording whether the WebPKI verifier
/// would have; delegates everything else to it.
#[derive(Debug)]
struct Recording {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    verdict: Arc<Verdict>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = match &self.webpki {
            Some(v) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => Err("no certificate roots to verify against".into()),
        };
        *self.verdict.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match &self.webpki {
            Some(v) => v.verify_tls12_signature(message, cert, dss),
            None => rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            ),
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match &self.webpki {
            Some(v) => v.verify_tls13_signature(message, cert, dss),
            None => rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            ),
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match &self.webpki {
            Some(v) => v.supported_verify_schemes(),
            None => self
                .provider
                .signature_verification_algorithms
                .supported_schemes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::testserver::pki;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Handshakes with `acceptor` as `name`; returns the level.
    async fn level(
        client: &TlsClient,
        acceptor: tokio_rustls::TlsAcceptor,
        name: &str,
    ) -> SecLevel {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut tls = acceptor.accept(s).await.unwrap();
            tls.write_all(b"x").await.unwrap();
            tls.flush().await.unwrap();
        });
        let (connector, verdict) = client.connector().unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let mut b = [0; 1];
        tls.read_exact(&mut b).await.unwrap();
        server.await.unwrap();
        verdict.level().0
    }

    #[tokio::test]
    async fn verdicts() {
        let p = pki();
        let client = TlsClient::new(p.roots.clone());
        assert_eq!(
            level(&client, p.ca_signed.clone(), "mx.test").await,
            SecLevel::TlsSecure
        );
        assert_eq!(
            level(&client, p.self_signed.clone(), "mx.test").await,
            SecLevel::TlsInsecure
        );
        // Valid, but for another name.
        assert_eq!(
            level(&client, p.ca_signed.clone(), "other.test").await,
            SecLevel::TlsInsecure
        );
        // No roots at all: everything works, nothing is secure.
        let bare = TlsClient::new(Arc::new(RootCertStore::empty()));
        assert_eq!(
            level(&bare, p.ca_signed.clone(), "mx.test").await,
            SecLevel::TlsInsecure
        );
    }
}
