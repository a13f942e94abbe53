//! TLS for smtpd without its private keys (DESIGN: no key is ever in
//! smtpd's memory). The certificate chains come from queued over smtpd's
//! key link; each handshake signature is made by queued too: rustls calls
//! `RemoteSigner::sign`, which asks queued and waits (rustls signs
//! synchronously, so the wait runs under `block_in_place`, with a short
//! timeout). This is OpenSMTPD's "ca" process. The adapter to rustls'
//! `SigningKey`/`Signer` traits lives here alone: rustls 0.24 renames them.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{ServerConfig, SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use tambo_common::loglimit::{LogLimiter, skipped};
use tambo_proto::frame::{FrameReader, MAX_FRAME, encode};
use tambo_proto::identity::Identities;
use tambo_proto::submit::{CertEntry, CertId, SubmitReply, SubmitRequest};
use tambo_proto::{Error, Role, hello};

/// Longest a handshake waits for queued's signature.
pub const SIGN_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one request on a key link (or opening one) may take.
const LINK_TIMEOUT: Duration = SIGN_TIMEOUT;

/// Most handshakes waiting for a signature at once. Each waits on a thread
/// of tokio's blocking pool (`block_in_place`); past this many, handshakes
/// fail at once instead of piling up threads while queued is slow.
const MAX_SIGNING: usize = 64;

/// After a SIGHUP: how many times, and how often, smtpd asks queued for
/// its certificates while waiting for queued's reload to show.
const HUP_CHECKS: usize = 20;
const HUP_CHECK_EVERY: Duration = Duration::from_millis(250);

/// How long smtpd waits between attempts to get the certificates while
/// queued is not there yet.
const RETRY: Duration = Duration::from_millis(500);

/// smtpd's key links to queued: a few connections, each one request at a
/// time.
pub struct KeyClient {
    socket: PathBuf,
    ids: Identities,
    /// A few links, opened as needed: one link answers one request at a
    /// time, and concurrent handshakes should not wait in line for each
    /// other's signatures while queued has cores free.
    links: Vec<tokio::sync::Mutex<Option<Link>>>,
    next: std::sync::atomic::AtomicUsize,
    signing: tokio::sync::Semaphore,
    /// Failed signatures are logged at most once a second: a flood of
    /// handshakes must not become a flood of lines.
    failures: LogLimiter,
}

struct Link {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Link {
    async fn call(&mut self, req: &SubmitRequest) -> Result<SubmitReply, Error> {
        self.writer.write_all(&encode(req)?).await?;
        self.reader.read(MAX_FRAME).await?.ok_or(Error::Truncated {
            expected: 4,
            got: 0,
        })
    }
}

impl KeyClient {
    pub fn new(socket: PathBuf, ids: Identities) -> Self {
        let width = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        Self {
            socket,
            ids,
            links: (0..width).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
            signing: tokio::sync::Semaphore::new(MAX_SIGNING),
            failures: LogLimiter::new(),
        }
    }

    /// A free link if there is one, else the next in turn (waiting for it).
    async fn pick(&self) -> tokio::sync::MutexGuard<'_, Option<Link>> {
        if let Some(g) = self.links.iter().find_map(|l| l.try_lock().ok()) {
            return g;
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.links.len();
        self.links[i].lock().await
    }

    async fn connect(&self) -> Result<(Link, Vec<CertEntry>), Error> {
        let stream = hello::connect(&self.socket, Role::Smtpd, Role::Queued, &self.ids).await?;
        let (r, w) = stream.into_split();
        let mut link = Link {
            reader: FrameReader::new(r),
            writer: w,
        };
        match link.call(&SubmitRequest::KeyLink).await? {
            SubmitReply::Certificates(c) => Ok((link, c)),
            _ => Err(Error::Unexpected("reply to KeyLink")),
        }
    }

    /// One request on `slot`'s link, opened if needed. The link is out of
    /// its slot while the request is on it and goes back only after a
    /// whole reply: a call given up half-way (a timeout drops this future)
    /// leaves the slot empty, so no later request can read the reply that
    /// was meant for this one.
    async fn call(
        &self,
        slot: &mut Option<Link>,
        req: &SubmitRequest,
    ) -> Result<SubmitReply, Error> {
        let timed_out = || Error::Io(std::io::ErrorKind::TimedOut.into());
        let mut link = match slot.take() {
            Some(link) => link,
            None => {
                tokio::time::timeout(LINK_TIMEOUT, self.connect())
                    .await
                    .map_err(|_| timed_out())??
                    .0
            }
        };
        let reply = tokio::time::timeout(LINK_TIMEOUT, link.call(req))
            .await
            .map_err(|_| timed_out())??;
        *slot = Some(link);
        Ok(reply)
    }

    /// The certificates queued holds.
    pub async fn certificates(&self) -> Result<Vec<CertEntry>, Error> {
        let mut slot = self.pick().await;
        match self.call(&mut slot, &SubmitRequest::Certificates).await? {
            SubmitReply::Certificates(c) => Ok(c),
            _ => {
                *slot = None;
                Err(Error::Unexpected("reply to Certificates"))
            }
        }
    }

    /// Keeps the key links alive: queued closes links quiet for longer
    /// than its idle timeout, and a handshake should not wait for a
    /// reconnect. A link busy right now needs no ping; a closed one is not
    /// reopened here.
    pub async fn keep_alive(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            for l in &self.links {
                let Ok(mut slot) = l.try_lock() else {
                    continue;
                };
                if slot.is_some()
                    && !matches!(
                        self.call(&mut slot, &SubmitRequest::Ping).await,
                        Ok(SubmitReply::Ok)
                    )
                {
                    *slot = None;
                }
            }
        }
    }

    /// One handshake signature. A broken link (queued restarted) is
    /// reopened once.
    pub async fn sign(&self, cert: CertId, scheme: u16, message: &[u8]) -> Result<Vec<u8>, String> {
        let req = SubmitRequest::Sign {
            cert,
            scheme,
            message: message.to_vec(),
        };
        let mut slot = self.pick().await;
        let mut last = String::new();
        for _ in 0..2 {
            match self.call(&mut slot, &req).await {
                Ok(SubmitReply::Signature(sig)) => return Ok(sig),
                Ok(SubmitReply::SignRefused(why)) => return Err(format!("queued refused: {why}")),
                Ok(_) => {
                    *slot = None;
                    return Err("unexpected reply to Sign".into());
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("cannot get a signature from queued: {last}"))
    }

    /// A place among the handshakes waiting for a signature, if one is
    /// free (see [`MAX_SIGNING`]).
    fn signing_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.signing.try_acquire().ok()
    }
}

/// A private key that lives in queued.
#[derive(Debug)]
struct RemoteKey {
    cert: CertId,
    algorithm: SignatureAlgorithm,
    schemes: Vec<SignatureScheme>,
    client: Arc<KeyClientHandle>,
}

/// The key client and the runtime that runs it, for signers called from
/// inside rustls.
struct KeyClientHandle {
    client: Arc<KeyClient>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for KeyClientHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyClientHandle")
    }
}

impl SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.schemes.iter().find(|s| offered.contains(s))?;
        Some(Box::new(RemoteSigner {
            cert: self.cert,
            scheme: *scheme,
            client: self.client.clone(),
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }
}

#[derive(Debug)]
struct RemoteSigner {
    cert: CertId,
    scheme: SignatureScheme,
    client: Arc<KeyClientHandle>,
}

impl Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let h = &self.client;
        let fail = |why: String| {
            if let Some(n) = h.client.failures.allow() {
                tracing::warn!("TLS handshake signature failed: {why}{}", skipped(n));
            }
            Err(rustls::Error::General(why))
        };
        let Some(_slot) = h.client.signing_slot() else {
            return fail(format!(
                "{MAX_SIGNING} handshakes already wait for a signature"
            ));
        };
        let ask = h.client.sign(self.cert, u16::from(self.scheme), message);
        // rustls wants the signature now; the session's task is on a
        // worker thread of the multi-threaded runtime, which may block
        // here while another thread runs the rest.
        let signed = tokio::task::block_in_place(|| {
            h.runtime
                .block_on(async { tokio::time::timeout(SIGN_TIMEOUT, ask).await })
        });
        match signed {
            Ok(Ok(sig)) => Ok(sig),
            Ok(Err(e)) => fail(e),
            Err(_) => fail(format!("queued did not sign within {SIGN_TIMEOUT:?}")),
        }
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// One certificate, ready for handshakes.
#[derive(Debug)]
struct Cert {
    id: CertId,
    name: String,
    leaf: CertificateDer<'static>,
    key: Arc<CertifiedKey>,
}

impl Cert {
    /// Whether the certificate covers `host` (wildcards as RFC 6125 says).
    fn covers(&self, host: &str) -> bool {
        let Ok(name) = ServerName::try_from(host) else {
            return false;
        };
        webpki::EndEntityCert::try_from(&self.leaf)
            .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

/// Picks a certificate by SNI, else `hostname`'s, else the first.
#[derive(Debug)]
pub struct Resolver {
    certs: Vec<Cert>,
    default: usize,
}

impl Resolver {
    fn new(entries: Vec<CertEntry>, hostname: &str, client: Arc<KeyClientHandle>) -> Option<Self> {
        let certs: Vec<Cert> = entries
            .into_iter()
            .filter_map(|e| {
                let chain: Vec<CertificateDer<'static>> =
                    e.chain.into_iter().map(CertificateDer::from).collect();
                let leaf = chain.first()?.clone();
                let key = Arc::new(RemoteKey {
                    cert: e.id,
                    algorithm: SignatureAlgorithm::from(e.algorithm),
                    schemes: e.schemes.into_iter().map(SignatureScheme::from).collect(),
                    client: client.clone(),
                });
                Some(Cert {
                    id: e.id,
                    name: e.name,
                    leaf,
                    key: Arc::new(CertifiedKey::new(chain, key)),
                })
            })
            .collect();
        if certs.is_empty() {
            return None;
        }
        let default = certs.iter().position(|c| c.covers(hostname)).unwrap_or(0);
        Some(Self { certs, default })
    }

    /// Whether some certificate covers `host`: then a client's SNI of
    /// `host` replaces the configured host name for its session.
    pub fn covers(&self, host: &str) -> bool {
        self.certs.iter().any(|c| c.covers(host))
    }

    fn pick(&self, sni: Option<&str>) -> &Cert {
        sni.and_then(|s| self.certs.iter().find(|c| c.covers(s)))
            .unwrap_or(&self.certs[self.default])
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).key.clone())
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

/// What sessions need for TLS: an acceptor once the certificates are in.
pub struct Tls {
    hostname: String,
    client: Arc<KeyClient>,
    current: RwLock<Option<(tokio_rustls::TlsAcceptor, Arc<Resolver>)>>,
}

impl Tls {
    pub fn new(hostname: String, client: Arc<KeyClient>) -> Arc<Self> {
        Arc::new(Self {
            hostname,
            client,
            current: RwLock::new(None),
        })
    }

    /// The acceptor and the certificates, if they arrived.
    pub fn acceptor(&self) -> Option<(tokio_rustls::TlsAcceptor, Arc<Resolver>)> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Gets the certificates from queued and builds the TLS configuration;
    /// must run inside the runtime.
    pub async fn refresh(&self) -> Result<usize, String> {
        let entries = self
            .client
            .certificates()
            .await
            .map_err(|e| e.to_string())?;
        self.install(entries)
    }

    /// Asks queued for its certificates every `period` and rebuilds the
    /// TLS configuration when they changed (queued reloads them when their
    /// files do): new connections get the new certificate, sessions already
    /// on TLS keep theirs. A SIGHUP (`hup`) reaches queued at the same
    /// moment, so after one smtpd looks a few times over the next seconds,
    /// until queued's reload shows.
    pub async fn follow(self: Arc<Self>, period: Duration, hup: Arc<tokio::sync::Notify>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {
                    self.check().await;
                }
                _ = hup.notified() => {
                    for _ in 0..HUP_CHECKS {
                        if self.check().await {
                            break;
                        }
                        tokio::time::sleep(HUP_CHECK_EVERY).await;
                    }
                }
            }
        }
    }

    /// Installs queued's certificates if they changed; whether they did.
    async fn check(&self) -> bool {
        let Ok(entries) = self.client.certificates().await else {
            return false;
        };
        let ids: Vec<CertId> = entries.iter().map(|e| e.id).collect();
        let current: Vec<CertId> = self
            .acceptor()
            .map(|(_, r)| r.certs.iter().map(|c| c.id).collect())
            .unwrap_or_default();
        if ids == current {
            return false;
        }
        match self.install(entries) {
            Ok(n) => tracing::info!("TLS certificates changed: now {n}"),
            Err(e) => tracing::warn!("new TLS certificates not used: {e}"),
        }
        true
    }

    /// Builds and swaps in the TLS configuration for `entries`; must run
    /// inside the runtime (the signers wait on it).
    fn install(&self, entries: Vec<CertEntry>) -> Result<usize, String> {
        let handle = Arc::new(KeyClientHandle {
            client: self.client.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        let resolver = Arc::new(
            Resolver::new(entries, &self.hostname, handle)
                .ok_or_else(|| "queued has no certificate".to_string())?,
        );
        let n = resolver.certs.len();
        let names: Vec<&str> = resolver.certs.iter().map(|c| c.name.as_str()).collect();
        tracing::info!(
            "TLS ready with {n} certificate(s) from queued: {}",
            names.join(", ")
        );
        let config = server_config(resolver.clone()).map_err(|e| e.to_string())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Some((tokio_rustls::TlsAcceptor::from(Arc::new(config)), resolver));
        Ok(n)
    }

    /// Gets the certificates, retrying until queued answers.
    pub async fn refresh_until_ready(self: Arc<Self>) {
        let mut warned = false;
        loop {
            match self.refresh().await {
                Ok(_) => return,
                Err(e) => {
                    if !warned {
                        tracing::warn!("no TLS until queued sends the certificates: {e}");
                        warned = true;
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}

/// TLS 1.2 and 1.3 with the ring provider; no session tickets (a Microsoft
/// client bug, as chasquid works around).
fn server_config(resolver: Arc<Resolver>) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The names the Received header uses: `TLS-1.3`, `TLS-1.2`…, and the
/// IANA cipher suite name.
pub fn describe(conn: &rustls::ServerConnection) -> (String, String) {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS-1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS-1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "TLS".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown")
        .to_string();
    (version, cipher)
}
