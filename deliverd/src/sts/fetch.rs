//! Fetching a domain's policy over the network (RFC 8461 §3.1, §3.3): the
//! `_mta-sts` TXT record, then one HTTPS GET of the policy file.
//!
//! Both go through deliverd's own resolver, never the system's: the
//! resolver is what tests point at their DNS server. The caller bounds the
//! whole fetch with a timeout and parses the body.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::proto::rr::rdata::TXT;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::policy::{PolicyError, excerpt};
use crate::remote::connect_from;

/// The most of a policy body read (RFC 8461 §3.3 leaves the limit to the
/// sender; REFERENCE §4.7 sets it). A larger body is a failed fetch.
pub const MAX_BODY: usize = 10 * 1024;

/// Where the policy lives on `mta-sts.<domain>` (RFC 8461 §3.3).
pub const PATH: &str = "/.well-known/mta-sts.txt";

/// How long one address of the policy host gets to accept the connection,
/// so a black-holed first address leaves time for the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest response head (and read buffer) taken from the policy
/// host; hyper's default is 400 KiB.
const MAX_HEAD: usize = 64 * 1024;

/// Why a domain has no usable policy. Texts that quote the peer use
/// `{:?}`, so nothing it sends reaches a log line unescaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The domain publishes no policy: the common case, not a fault.
    #[error("no _mta-sts TXT record starting with v=STSv1;")]
    NoRecord,
    #[error("{0} _mta-sts TXT records start with v=STSv1; (exactly one is allowed)")]
    ManyRecords(usize),
    #[error("malformed _mta-sts TXT record {0:?}")]
    BadRecord(String),
    #[error("DNS lookup of {name}: {error}")]
    Dns { name: String, error: String },
    #[error("{0} has no address")]
    NoAddress(String),
    #[error("connecting to {addr}: {error}")]
    Connect { addr: SocketAddr, error: String },
    #[error("TLS with {host}: {error}")]
    Tls { host: String, error: String },
    #[error("no certificate roots to verify the policy host with")]
    NoRoots,
    #[error("HTTP: {0}")]
    Http(String),
    #[error("HTTP status {0} (only 200 is accepted, redirects are not followed)")]
    Status(u16),
    #[error("media type {0:?} is not text/plain")]
    MediaType(String),
    #[error("policy larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("invalid policy: {0}")]
    Invalid(#[from] PolicyError),
    #[error("not a domain name")]
    BadDomain,
}

impl FetchError {
    /// Whether this only says the domain publishes no policy (worth no
    /// warning: most domains do not).
    pub fn is_absent(&self) -> bool {
        matches!(self, FetchError::NoRecord)
    }
}

/// Where policies come from: the network, or in tests a script.
pub enum Fetcher {
    Https(Box<Https>),
    #[cfg(test)]
    Fake(Arc<fake::Fake>),
}

impl Fetcher {
    /// The policy body `domain` (IDNA-ASCII, lower case) serves.
    pub async fn fetch(&self, domain: &str) -> Result<Vec<u8>, FetchError> {
        match self {
            Fetcher::Https(h) => h.fetch(domain).await,
            #[cfg(test)]
            Fetcher::Fake(f) => f.fetch(domain).await,
        }
    }
}

/// The real fetcher.
pub struct Https {
    resolver: TokioResolver,
    /// None when no verifier can be built (no roots): every fetch fails,
    /// as nothing could be verified.
    tls: Option<Arc<ClientConfig>>,
    port: u16,
    /// `[tambo] outgoing_source_address`, set once by remote delivery
    /// (see [`Https::set_sources`]); unset: the system picks.
    sources: OnceLock<Vec<IpAddr>>,
}

impl Https {
    pub fn new(resolver: TokioResolver, roots: Arc<RootCertStore>, port: u16) -> Self {
        // An empty store is the only way this fails; roots.rs has already
        // warned about it.
        let tls = tls_config(roots).ok();
        Self {
            resolver,
            tls,
            port,
            sources: OnceLock::new(),
        }
    }

    /// Fetches from now on leave from `sources` (at most one address per
    /// family), as remote SMTP does. Set once; a second call changes
    /// nothing (the configuration does not change while deliverd runs).
    pub fn set_sources(&self, sources: &[IpAddr]) {
        let _ = self.sources.set(sources.to_vec());
    }

    async fn fetch(&self, domain: &str) -> Result<Vec<u8>, FetchError> {
        check_txt(&self.resolver, domain).await?;
        let tls = self.tls.clone().ok_or(FetchError::NoRoots)?;
        let host = format!("mta-sts.{domain}");
        let ips = resolve(&self.resolver, &host).await?;
        let mut last = FetchError::NoAddress(host.clone());
        let sources = self.sources.get().map_or(&[][..], Vec::as_slice);
        for ip in ips {
            let addr = SocketAddr::new(ip, self.port);
            match connect(sources, addr).await {
                Ok(tcp) => return get(tcp, &host, self.port, tls).await,
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// The client TLS setup: full verification against `roots` (an invalid
/// certificate is a failed fetch; RFC 8461 §3.3), HTTP/1.1 by ALPN.
pub fn tls_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks `_mta-sts.<domain>` (RFC 8461 §3.1).
async fn check_txt(resolver: &TokioResolver, domain: &str) -> Result<(), FetchError> {
    // Fully qualified: no search domain of resolv.conf is ever appended.
    let name = format!("_mta-sts.{domain}.");
    let lookup = match resolver.txt_lookup(name.as_str()).await {
        Ok(l) => l,
        // NXDOMAIN included.
        Err(e) if e.is_no_records_found() => return Err(FetchError::NoRecord),
        Err(e) => {
            return Err(FetchError::Dns {
                name,
                error: e.to_string(),
            });
        }
    };
    // A CNAME chain leaves its CNAME records among the answers: only the
    // TXT data counts.
    check_records(lookup.answers().iter().filter_map(|r| match &r.data {
        RData::TXT(t) => Some(t),
        _ => None,
    }))
}

/// RFC 8461 §3.1: a record's strings make one text, concatenated; texts
/// not starting `v=STSv1;` are discarded; then exactly one must be left,
/// and it must be well formed.
pub fn check_records<'a>(records: impl IntoIterator<Item = &'a TXT>) -> Result<(), FetchError> {
    let sts: Vec<Vec<u8>> = records
        .into_iter()
        .map(|t| t.txt_data.concat())
        .filter(|r| r.starts_with(b"v=STSv1;"))
        .collect();
    match sts.as_slice() {
        [] => Err(FetchError::NoRecord),
        [one] => check_record(one),
        many => Err(FetchError::ManyRecords(many.len())),
    }
}

/// The record's ABNF: `v=STSv1` then `;`-separated `name=value` fields
/// (WSP around the `;`, one optional `;` at the end), one of them
/// `id=` with 1 to 32 letters or digits.
fn check_record(record: &[u8]) -> Result<(), FetchError> {
    let bad = || FetchError::BadRecord(excerpt(&String::from_utf8_lossy(record)));
    let text = std::str::from_utf8(record).map_err(|_| bad())?;
    let rest = text.strip_prefix("v=STSv1;").ok_or_else(bad)?;
    let mut fields: Vec<&str> = rest
        .split(';')
        .map(|f| f.trim_matches([' ', '\t']))
        .collect();
    if fields.last() == Some(&"") && fields.len() > 1 {
        fields.pop();
    }
    let mut ids = 0;
    for field in fields {
        let (name, value) = field.split_once('=').ok_or_else(bad)?;
        let name_ok = matches!(name.as_bytes().first(), Some(c) if c.is_ascii_alphanumeric())
            && name.len() <= 32
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
        let value_ok = !value.is_empty()
            && value
                .bytes()
                .all(|c| (0x21..=0x7e).contains(&c) && c != b'=' && c != b';');
        if !name_ok || !value_ok {
            return Err(bad());
        }
        if name == "id" {
            ids += 1;
            if value.len() > 32 || !value.bytes().all(|c| c.is_ascii_alphanumeric()) {
                return Err(bad());
            }
        }
    }
    if ids != 1 {
        return Err(bad());
    }
    Ok(())
}

async fn resolve(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, FetchError> {
    let fqdn = format!("{host}.");
    match resolver.lookup_ip(fqdn.as_str()).await {
        Ok(ips) => Ok(ips.iter().collect()),
        Err(e) if e.is_no_records_found() => Err(FetchError::NoAddress(host.to_string())),
        Err(e) => Err(FetchError::Dns {
            name: fqdn,
            error: e.to_string(),
        }),
    }
}

async fn connect(sources: &[IpAddr], addr: SocketAddr) -> Result<TcpStream, FetchError> {
    let error = match tokio::time::timeout(CONNECT_TIMEOUT, connect_from(sources, addr)).await {
        Ok(Ok(tcp)) => return Ok(tcp),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
    };
    Err(FetchError::Connect { addr, error })
}

/// Fetches the policy from `host` at `addr`, bypassing DNS: the HTTPS half
/// of a fetch, on its own for tests.
#[cfg(test)]
pub async fn get_from(
    addr: SocketAddr,
    host: &str,
    tls: Arc<ClientConfig>,
) -> Result<Vec<u8>, FetchError> {
    get(connect(&[], addr).await?, host, addr.port(), tls).await
}

/// TLS to `host` over `tcp`, then `GET` [`PATH`]: status 200 only (a 3xx
/// is a failure: RFC 8461 §3.3 forbids following redirects), media type
/// `text/plain`, at most [`MAX_BODY`] bytes.
async fn get(
    tcp: TcpStream,
    host: &str,
    port: u16,
    tls: Arc<ClientConfig>,
) -> Result<Vec<u8>, FetchError> {
    let name = ServerName::try_from(host.to_string()).map_err(|_| FetchError::BadDomain)?;
    let tls_err = |e: std::io::Error| FetchError::Tls {
        host: host.to_string(),
        error: e.to_string(),
    };
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(tls_err)?;
    let http = |e: hyper::Error| FetchError::Http(with_sources(&e));
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection runs as its own task, as hyper requires; aborting it
    // when this returns (or is dropped by the caller's timeout) closes the
    // socket, whatever state the server left it in.
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let authority = if port == 443 {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    let req = Request::get(PATH)
        .header(HOST, authority)
        .header(USER_AGENT, "tambo")
        .body(Empty::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(http)?;
    if resp.status() != StatusCode::OK {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    // text/plain keeps a site that lets users upload files (HTML, images)
    // at chosen paths from serving a policy it never meant (RFC 8461 §3.2).
    let media = resp
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let essence = media
        .split(';')
        .next()
        .unwrap_or("")
        .trim_matches([' ', '\t']);
    if !essence.eq_ignore_ascii_case("text/plain") {
        return Err(FetchError::MediaType(excerpt(&media)));
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                FetchError::TooLarge
            } else {
                FetchError::Http(with_sources(e.as_ref()))
            }
        })?;
    Ok(body.to_bytes().to_vec())
}

/// An error and its causes: hyper's own texts ("connection error") say
/// little without them.
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A scripted fetcher for the cache's tests: no DNS, no network.
#[cfg(test)]
pub mod fake {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use tokio::sync::Semaphore;

    use super::FetchError;

    #[derive(Default)]
    pub struct Fake {
        answers: Mutex<HashMap<String, Result<Vec<u8>, FetchError>>>,
        calls: Mutex<Vec<String>>,
        /// When set, fetches wait for a permit: a test holds them while
        /// it lines up concurrent lookups.
        gate: Option<Semaphore>,
    }

    impl Fake {
        pub fn new() -> Self {
            Self::default()
        }

        /// Fetches wait until [`Fake::open`].
        pub fn gated() -> Self {
            Self {
                gate: Some(Semaphore::new(0)),
                ..Self::default()
            }
        }

        pub fn open(&self) {
            if let Some(g) = &self.gate {
                g.add_permits(Semaphore::MAX_PERMITS / 2);
            }
        }

        /// What fetching `domain` gives from now on (NoRecord until set).
        pub fn set(&self, domain: &str, answer: Result<&str, FetchError>) {
            self.answers
                .lock()
                .unwrap()
                .insert(domain.into(), answer.map(|s| s.as_bytes().to_vec()));
        }

        /// The domains fetched so far, in order.
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        pub async fn fetch(&self, domain: &str) -> Result<Vec<u8>, FetchError> {
            self.calls.lock().unwrap().push(domain.into());
            if let Some(g) = &self.gate {
                let _permit = g.acquire().await;
            }
            let answers = self.answers.lock().unwrap();
            answers
                .get(domain)
                .cloned()
                .unwrap_or(Err(FetchError::NoRecord))
        }
    }
}

#[cfg(test)]
mod tests;
