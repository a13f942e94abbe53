//! A strict SMTP client that speaks TLS (rustls, the ring provider), for
//! the tests of STARTTLS, port 465 and AUTH. It accepts the server's
//! certificate whatever it is (the tests make their own), remembers it, and
//! verifies every handshake signature for real: those are made by queued,
//! through smtpd's key link, and a wrong one must fail the handshake.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

use crate::{Reply, WAIT};

/// Accepts any certificate, remembers the last one, verifies signatures.
#[derive(Debug)]
struct Trusting {
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Trusting {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.as_ref().to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Which TLS versions a client offers.
#[derive(Debug, Clone, Copy)]
pub enum Versions {
    Any,
    Tls12,
    Tls13,
}

fn client_config(versions: Versions, seen: Arc<Mutex<Option<Vec<u8>>>>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let v: &[&rustls::SupportedProtocolVersion] = match versions {
        Versions::Any => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Versions::Tls12 => &[&rustls::version::TLS12],
        Versions::Tls13 => &[&rustls::version::TLS13],
    };
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(v)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Trusting { seen, provider }))
        .with_no_client_auth();
    Arc::new(config)
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// During a handshake.
    Gone,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Gone => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Gone => Ok(()),
        }
    }
}

/// An SMTP client that can go TLS.
pub struct TlsSmtp {
    conn: BufReader<Stream>,
    /// The server certificate of the handshake, once there was one.
    pub seen: Arc<Mutex<Option<Vec<u8>>>>,
    /// The negotiated version and cipher suite.
    pub negotiated: Option<(rustls::ProtocolVersion, rustls::CipherSuite)>,
}

impl TlsSmtp {
    /// A plain connection; reads the greeting (which must be 220).
    pub fn connect(addr: SocketAddr) -> Self {
        Self::connect_after(addr, b"")
    }

    /// A plain connection that first sends `prefix` (a PROXY header, as a
    /// proxy would); then reads the greeting (which must be 220).
    pub fn connect_after(addr: SocketAddr, prefix: &[u8]) -> Self {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(prefix).unwrap();
        let mut c = Self {
            conn: BufReader::new(Stream::Plain(s)),
            seen: Arc::default(),
            negotiated: None,
        };
        let g = c.reply();
        assert_eq!(g.code, 220, "{g:?}");
        c
    }

    /// Implicit TLS (port 465): the handshake, then the greeting.
    pub fn connect_tls(addr: SocketAddr, sni: &str, versions: Versions) -> Result<Self, String> {
        Self::connect_tls_after(addr, b"", sni, versions)
    }

    /// Implicit TLS after `prefix`, sent in plain text first: a PROXY
    /// header, as HAProxy sends it in front of the client's handshake.
    pub fn connect_tls_after(
        addr: SocketAddr,
        prefix: &[u8],
        sni: &str,
        versions: Versions,
    ) -> Result<Self, String> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(prefix).unwrap();
        let mut c = Self {
            conn: BufReader::new(Stream::Plain(s)),
            seen: Arc::default(),
            negotiated: None,
        };
        c.handshake(sni, versions)?;
        let g = c.reply();
        assert_eq!(g.code, 220, "{g:?}");
        Ok(c)
    }

    /// Runs the handshake on the plain connection (after STARTTLS was
    /// answered 220). Anything the client buffered is a test bug.
    pub fn handshake(&mut self, sni: &str, versions: Versions) -> Result<(), String> {
        let old = std::mem::replace(&mut self.conn, BufReader::new(Stream::Gone));
        assert!(old.buffer().is_empty(), "the server sent more than its 220");
        let Stream::Plain(tcp) = old.into_inner() else {
            panic!("already on TLS")
        };
        let config = client_config(versions, self.seen.clone());
        let name = ServerName::try_from(sni.to_string()).unwrap();
        let conn = ClientConnection::new(config, name).unwrap();
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("handshake: {e}"))?;
        }
        self.negotiated = Some((
            tls.conn.protocol_version().unwrap(),
            tls.conn.negotiated_cipher_suite().unwrap().suite(),
        ));
        self.conn = BufReader::new(Stream::Tls(Box::new(tls)));
        Ok(())
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.conn.get_mut().write_all(bytes).unwrap();
        self.conn.get_mut().flush().unwrap();
    }

    /// Reads one reply; panics on EOF.
    pub fn reply(&mut self) -> Reply {
        self.try_reply()
            .expect("connection closed while waiting for a reply")
    }

    /// Reads one reply; None on EOF.
    pub fn try_reply(&mut self) -> Option<Reply> {
        crate::read_reply(&mut self.conn)
    }

    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line);
        assert_eq!(r.code, code, "{line:?} got {r:?}");
        r
    }

    /// STARTTLS and the handshake.
    pub fn starttls(&mut self, sni: &str) {
        self.expect("STARTTLS", 220);
        self.handshake(sni, Versions::Any).unwrap();
    }

    /// True if the server closed the connection.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.conn.read(&mut b), Ok(0) | Err(_))
    }
}

/// The base64 of an AUTH PLAIN response.
pub fn plain(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}").as_bytes())
}

/// Standard base64, padded.
pub fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A PHC scrypt hash of `password`, cheap (ln=10) so tests stay fast;
/// queued honours each hash's own parameters.
pub fn hash(password: &str) -> String {
    use password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"tambo-test-salt!").unwrap();
    let params = scrypt::Params::new(10, 8, 1, 32).unwrap();
    scrypt::Scrypt
        .hash_password_customized(password.as_bytes(), None, None, params, &salt)
        .unwrap()
        .to_string()
}

/// Submits `body` as the authenticated `user` (submission port, STARTTLS,
/// AUTH PLAIN), from `user` to `to`; the final reply's code.
pub fn submit_as(addr: SocketAddr, user: &str, password: &str, to: &[&str], body: &[u8]) -> u16 {
    let mut c = TlsSmtp::connect(addr);
    c.expect("EHLO client.test", 250);
    c.starttls("mx.example.test");
    c.expect("EHLO client.test", 250);
    c.expect(&format!("AUTH PLAIN {}", plain(user, password)), 235);
    c.expect(&format!("MAIL FROM:<{user}>"), 250);
    for r in to {
        c.expect(&format!("RCPT TO:<{r}>"), 250);
    }
    c.expect("DATA", 354);
    c.send_raw(body);
    c.send_raw(b".\r\n");
    c.reply().code
}
