//! An MTA-STS policy server (RFC 8461 §3.3): HTTPS on a loopback address
//! with a certificate from the test CA, serving
//! `/.well-known/mta-sts.txt` with whatever the test sets, changeable while
//! it runs. deliverd fetches from `[testing] sts_https_port` at the address
//! the test DNS gives `mta-sts.<domain>`.
//!
//! HTTP/1.1 is hand-written (one request per connection, answered with
//! `Connection: close`): enough for a policy fetch, and every byte of the
//! response is the test's to choose.
//!
//! ```no_run
//! use tambo_e2e::{ca::TestCa, dns::{random_loopback, TestDns}, https::*};
//! let (ca, dns) = (TestCa::new(), TestDns::start());
//! let ip = random_loopback();
//! let sts = PolicyServer::start(ip.into(), &ca, "mta-sts.dest.test");
//! sts.set(PolicyResponse::policy("enforce", &["mx.dest.test"], 86400));
//! dns.add_a("mta-sts.dest.test", ip);
//! dns.add_txt("_mta-sts.dest.test", "v=STSv1; id=1");
//! // [testing] sts_https_port = sts.port(), tls_roots = ca.write_roots(…)
//! ```

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ca::TestCa;
use crate::dns::Background;

/// The path of an MTA-STS policy.
pub const POLICY_PATH: &str = "/.well-known/mta-sts.txt";

/// What the server answers for [`POLICY_PATH`].
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyResponse {
    pub status: u16,
    /// The `Content-Type` header; None leaves it out.
    pub content_type: Option<String>,
    /// More header lines, as (name, value).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl PolicyResponse {
    /// 200, `text/plain`, this body.
    pub fn ok(body: &str) -> Self {
        PolicyResponse {
            status: 200,
            content_type: Some("text/plain".into()),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    /// A well-formed policy: `version: STSv1`, `mode`, one `mx:` line per
    /// pattern, `max_age` (CRLF line ends, as RFC 8461 §3.2 writes them).
    pub fn policy(mode: &str, mx: &[&str], max_age: u64) -> Self {
        let mut body = format!("version: STSv1\r\nmode: {mode}\r\n");
        for m in mx {
            body.push_str(&format!("mx: {m}\r\n"));
        }
        body.push_str(&format!("max_age: {max_age}\r\n"));
        Self::ok(&body)
    }

    /// This status with a short text body (404, 500, a 301 with a
    /// `Location` added to `headers`…).
    pub fn status(status: u16) -> Self {
        PolicyResponse {
            status,
            content_type: Some("text/plain".into()),
            headers: Vec::new(),
            body: format!("status {status}\n").into_bytes(),
        }
    }
}

struct Shared {
    policy: Mutex<PolicyResponse>,
    hits: AtomicUsize,
    hang: AtomicBool,
    requests: Mutex<Vec<String>>,
}

/// The HTTPS server. Stops when dropped.
pub struct PolicyServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _bg: Background,
}

impl PolicyServer {
    /// Serves on `ip`, a port chosen by the kernel, with a leaf from `ca`
    /// for `host` (`mta-sts.<domain>`). Answers 404 until [`set`](Self::set).
    pub fn start(ip: IpAddr, ca: &TestCa, host: &str) -> PolicyServer {
        Self::start_at(SocketAddr::new(ip, 0), ca, &[host])
    }

    /// Serves on `addr` (a fixed port: a second policy server on another
    /// address and the port of the first) with a leaf from `ca` for
    /// `hosts`.
    pub fn start_at(addr: SocketAddr, ca: &TestCa, hosts: &[&str]) -> PolicyServer {
        let (cert, key) = ca.leaf(hosts);
        Self::start_with_cert(addr, &cert, &key)
    }

    /// Serves on `addr` with any certificate chain and key (PEM): a
    /// self-signed or expired one, one for another name.
    pub fn start_with_cert(addr: SocketAddr, cert_pem: &str, key_pem: &str) -> PolicyServer {
        assert!(addr.ip().is_loopback(), "test servers are loopback only");
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("policy server: cannot bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            policy: Mutex::new(PolicyResponse::status(404)),
            hits: AtomicUsize::new(0),
            hang: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let bg = Background::spawn("test-https", move || serve(listener, acceptor, s));
        PolicyServer {
            addr,
            shared,
            _bg: bg,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What [`POLICY_PATH`] answers from now on.
    pub fn set(&self, response: PolicyResponse) {
        *self.shared.policy.lock().unwrap() = response;
    }

    /// While set, requests are read (and counted) but never answered, for
    /// fetch timeouts. The TLS handshake still completes.
    pub fn set_hang(&self, hang: bool) {
        self.shared.hang.store(hang, Ordering::SeqCst);
    }

    /// How many requests for [`POLICY_PATH`] were received.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Every request received: its request line and `Host` header, as
    /// `"GET /path HTTP/1.1 host=<host>"`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }
}

async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, shared: Arc<Shared>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let timeout = crate::WAIT;
            let Ok(Ok(mut tls)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout(timeout, tls.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
                if head.len() > 64 * 1024 {
                    return;
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let mut lines = head.split("\r\n");
            let request_line = lines.next().unwrap_or("").to_string();
            let host = lines
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default();
            shared
                .requests
                .lock()
                .unwrap()
                .push(format!("{request_line} host={host}"));
            let mut parts = request_line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let response = if path == POLICY_PATH {
                shared.hits.fetch_add(1, Ordering::SeqCst);
                if shared.hang.load(Ordering::SeqCst) {
                    // Hold the connection until the client gives up.
                    let _ = tls.read(&mut buf).await;
                    return;
                }
                shared.policy.lock().unwrap().clone()
            } else {
                PolicyResponse::status(404)
            };
            let mut out = format!(
                "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                response.status,
                reason(response.status),
                response.body.len()
            );
            if let Some(ct) = &response.content_type {
                out.push_str(&format!("Content-Type: {ct}\r\n"));
            }
            for (k, v) in &response.headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let mut bytes = out.into_bytes();
            if method != "HEAD" {
                bytes.extend_from_slice(&response.body);
            }
            let _ = tls.write_all(&bytes).await;
            let _ = tls.shutdown().await;
        });
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
