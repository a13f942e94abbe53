//! Fake SMTP and LMTP servers for the tests: each accepted connection is
//! handed to the test's own async function, which plays the server's part
//! line by line and returns what it wants to check.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::ServerConfig;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

/// How long a fake server waits for the client before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The server's end of one connection.
pub struct Peer {
    io: BufReader<Box<dyn Io>>,
    /// The client's address (TCP only).
    pub client: Option<SocketAddr>,
}

impl Peer {
    fn new(io: Box<dyn Io>) -> Self {
        Peer {
            io: BufReader::new(io),
            client: None,
        }
    }

    /// Sends `text` (one or more lines separated by `\n`), each with CRLF.
    pub async fn send(&mut self, text: &str) {
        let mut out = String::new();
        for line in text.split('\n') {
            out.push_str(line);
            out.push_str("\r\n");
        }
        let io = self.io.get_mut();
        io.write_all(out.as_bytes()).await.expect("send");
        io.flush().await.expect("flush");
    }

    /// Sends raw bytes; the error if the client is gone.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let io = self.io.get_mut();
        io.write_all(bytes).await?;
        io.flush().await
    }

    /// The next line from the client, without its CRLF; None at EOF.
    pub async fn line(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(WAIT, self.io.read_until(b'\n', &mut buf))
            .await
            .expect("client too slow")
            .ok()?;
        if n == 0 {
            return None;
        }
        assert!(buf.ends_with(b"\r\n"), "the client sent a bare LF: {buf:?}");
        buf.truncate(buf.len() - 2);
        Some(String::from_utf8(buf).expect("UTF-8 command"))
    }

    /// Reads a line and checks it starts with `prefix`; returns it.
    pub async fn expect(&mut self, prefix: &str) -> String {
        let line = self
            .line()
            .await
            .unwrap_or_else(|| panic!("EOF, wanted {prefix}"));
        assert!(line.starts_with(prefix), "got {line:?}, wanted {prefix:?}");
        line
    }

    /// The raw bytes after DATA up to and including `CRLF.CRLF`.
    pub async fn data(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let n = tokio::time::timeout(WAIT, self.io.read_until(b'\n', &mut all))
                .await
                .expect("client too slow")
                .expect("read");
            assert!(n > 0, "EOF inside DATA");
            if all == b".\r\n" || all.ends_with(b"\r\n.\r\n") {
                return all;
            }
        }
    }

    /// Waits until the client closes the connection (or resets it).
    pub async fn closed(&mut self) {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, self.io.read_to_end(&mut rest))
            .await
            .expect("the client kept the connection open");
    }

    /// Starts TLS with `acceptor`; the client's handshake must follow.
    pub async fn starttls(self, acceptor: &TlsAcceptor) -> Result<Peer, std::io::Error> {
        assert!(self.io.buffer().is_empty(), "client data ahead of TLS");
        let client = self.client;
        let io = self.io.into_inner();
        let tls = acceptor.accept(io).await?;
        let mut peer = Peer::new(Box::new(tls));
        peer.client = client;
        Ok(peer)
    }

    /// The usual opening: greeting, then an EHLO answered with `ext`.
    pub async fn open(&mut self, ext: &[&str]) {
        self.send("220 fake.test ESMTP").await;
        self.expect("EHLO ").await;
        self.ehlo_reply(ext).await;
    }

    pub async fn ehlo_reply(&mut self, ext: &[&str]) {
        let mut lines = vec!["fake.test".to_string()];
        lines.extend(ext.iter().map(|e| e.to_string()));
        let n = lines.len();
        let text: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i + 1 == n { ' ' } else { '-' }))
            .collect();
        self.send(&text.join("\n")).await;
    }

    /// MAIL, `n` RCPTs, DATA, all accepted; returns the MAIL line and the
    /// data as received.
    pub async fn accept_mail(&mut self, n: usize) -> (String, Vec<u8>) {
        let mail = self.expect("MAIL FROM:").await;
        self.send("250 2.1.0 ok").await;
        for _ in 0..n {
            self.expect("RCPT TO:").await;
            self.send("250 2.1.5 ok").await;
        }
        (mail, self.accept_data().await)
    }

    /// DATA, accepted; returns the data as received.
    pub async fn accept_data(&mut self) -> Vec<u8> {
        self.expect("DATA").await;
        self.send("354 go on").await;
        let data = self.data().await;
        self.send("250 2.0.0 queued").await;
        data
    }

    /// Answers QUIT if it comes, then waits for the close.
    pub async fn quit(&mut self) {
        if let Some(l) = self.line().await {
            assert_eq!(l, "QUIT");
            self.send("221 2.0.0 bye").await;
        }
        self.closed().await;
    }
}

/// A fake server: the address it listens on, and what each connection's
/// handler returned, in the order they finished.
pub struct FakeServer<T> {
    pub addr: SocketAddr,
    results: mpsc::UnboundedReceiver<T>,
    task: tokio::task::JoinHandle<()>,
}

impl<T: Send + 'static> FakeServer<T> {
    /// Listens on 127.0.0.1 (a free port); `handler(n, peer)` serves the
    /// n-th connection (from 0).
    pub async fn tcp<F, Fut>(handler: F) -> Self
    where
        F: Fn(usize, Peer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, results) = mpsc::unbounded_channel();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            for n in 0.. {
                let Ok((s, client)) = listener.accept().await else {
                    return;
                };
                let (h, tx) = (handler.clone(), tx.clone());
                tokio::spawn(async move {
                    let mut peer = Peer::new(Box::new(s));
                    peer.client = Some(client);
                    let _ = tx.send(h(n, peer).await);
                });
            }
        });
        FakeServer {
            addr,
            results,
            task,
        }
    }

    /// Listens on a Unix socket at `path`.
    pub async fn unix<F, Fut>(path: &Path, handler: F) -> Self
    where
        F: Fn(usize, Peer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let listener = UnixListener::bind(path).expect("bind");
        let (tx, results) = mpsc::unbounded_channel();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            for n in 0.. {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (h, tx) = (handler.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(h(n, Peer::new(Box::new(s))).await);
                });
            }
        });
        FakeServer {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            results,
            task,
        }
    }

    /// What the next connection to finish returned.
    pub async fn next(&mut self) -> T {
        tokio::time::timeout(WAIT, self.results.recv())
            .await
            .expect("no connection finished in time")
            .expect("a handler panicked")
    }
}

impl<T> Drop for FakeServer<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Certificates for `mx.test`: the roots of a test CA, a server config
/// with a certificate that CA signed, and one with a self-signed one.
pub struct Pki {
    pub roots: Arc<RootCertStore>,
    pub ca_signed: TlsAcceptor,
    pub self_signed: TlsAcceptor,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["mx.test".to_string()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    let own_key = KeyPair::generate().expect("key");
    let own = CertificateParams::new(vec!["mx.test".to_string()])
        .expect("params")
        .self_signed(&own_key)
        .expect("self-signed");

    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).expect("root");
    let acceptor = |cert: &CertificateDer<'static>, key: &KeyPair| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        TlsAcceptor::from(Arc::new(config))
    };
    Pki {
        roots: Arc::new(roots),
        ca_signed: acceptor(leaf.der(), &leaf_key),
        self_signed: acceptor(own.der(), &own_key),
    }
}
