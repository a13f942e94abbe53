//! TLS handshake load for `bench/handshake.sh`, run by hand.
//!
//! `load` makes full handshakes (no resumption) against an implicit-TLS
//! SMTP port as fast as it can over a number of connections at once, and
//! prints how many completed per second; a handshake counts once the
//! server's 220 greeting arrived over TLS. `serve` is the baseline: the
//! same rustls server configuration smtpd builds (ring, TLS 1.2 and 1.3, no
//! tickets) with the private key in the process, greeting like smtpd, so
//! the difference is what keeping the key in queued costs.
//!
//! The client does not check the server's signatures: it should cost as
//! little CPU as possible, since it shares the machine with the servers.
//! The end-to-end tests check every signature queued makes.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "TLS handshake load and an in-process baseline server")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Full handshakes per second against ADDR.
    Load {
        addr: SocketAddr,
        /// Connections at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Seconds to run (after a 1-second warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Offer TLS 1.2 only (ECDHE, the ServerKeyExchange signature).
        #[arg(long)]
        tls12: bool,
    },
    /// An implicit-TLS server with its key in process: handshake, 220, wait.
    Serve {
        addr: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<(), String> {
    match Args::parse().cmd {
        Cmd::Load {
            addr,
            concurrency,
            seconds,
            tls12,
        } => load(addr, concurrency, Duration::from_secs(seconds), tls12).await,
        Cmd::Serve { addr, cert, key } => serve(addr, &cert, &key).await,
    }
}

async fn load(
    addr: SocketAddr,
    concurrency: usize,
    run: Duration,
    tls12: bool,
) -> Result<(), String> {
    let connector = tokio_rustls::TlsConnector::from(client_config(tls12)?);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (connector, done, failed) = (connector.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match one(addr, &connector).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (d0, f0, t0) = (
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(run).await;
    let (d1, f1, secs) = (
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    for t in tasks {
        t.abort();
    }
    println!(
        "{:.1} handshakes/s ({} in {secs:.1} s, {} failed)",
        (d1 - d0) as f64 / secs,
        d1 - d0,
        f1 - f0
    );
    if d1 == d0 {
        return Err("no handshake completed".into());
    }
    Ok(())
}

/// One connection: handshake, read the greeting, close.
async fn one(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("bench.example.test").map_err(std::io::Error::other)?;
    let tls = connector.connect(name, tcp).await?;
    let mut r = BufReader::new(tls);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    if !line.starts_with("220") {
        return Err(std::io::Error::other(format!("greeting {line:?}")));
    }
    Ok(())
}

async fn serve(
    addr: SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| e.to_string())?;
    config.send_tls13_tickets = 0;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
    println!("listening on {addr}");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            if tls
                .write_all(b"220 bench.example.test ESMTP baseline\r\n")
                .await
                .is_err()
            {
                return;
            }
            // Until the client closes, as smtpd waits for a command.
            let mut r = BufReader::new(tls);
            let mut line = String::new();
            let _ = r.read_line(&mut line).await;
        });
    }
}

fn client_config(tls12: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    // Every connection a full handshake.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts any certificate and any signature (see the crate docs).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
