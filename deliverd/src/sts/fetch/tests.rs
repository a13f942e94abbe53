//! The TXT record rules, and the HTTPS half of a fetch against an
//! in-process server on loopback with certificates of a test CA.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::*;

const HOST: &str = "mta-sts.example.com";
const POLICY: &str = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\nmax_age: 86400\r\n";

fn txt(strings: &[&str]) -> TXT {
    TXT::new(strings.iter().map(|s| s.to_string()).collect())
}

fn records(texts: &[&str]) -> Result<(), FetchError> {
    let records: Vec<TXT> = texts.iter().map(|t| txt(&[t])).collect();
    check_records(&records)
}

#[test]
fn exactly_one_well_formed_sts_record() {
    for ok in [
        "v=STSv1; id=20190429T010101;",
        "v=STSv1;id=abc",
        "v=STSv1; id=abc ;ext-1.x=val ; ",
        "v=STSv1;\tid=ABCdef0123456789ABCdef0123456789",
    ] {
        assert_eq!(records(&[ok]), Ok(()), "{ok}");
    }
    // Others are discarded, even ones that look almost right.
    assert_eq!(
        records(&[
            "v=spf1 -all",
            "v=STSv1; id=1;",
            "V=STSv1; id=2;",
            "v=STSv1 ; id=3"
        ]),
        Ok(())
    );
    assert_eq!(records(&[]), Err(FetchError::NoRecord));
    assert_eq!(records(&["v=spf1 -all"]), Err(FetchError::NoRecord));
    // RFC 8461 §3.1: more than one means no policy.
    assert_eq!(
        records(&["v=STSv1; id=1;", "v=STSv1; id=2;"]),
        Err(FetchError::ManyRecords(2))
    );
    // A record's strings are concatenated.
    assert_eq!(check_records(&[txt(&["v=STS", "v1; id=", "1"])]), Ok(()));
    assert_eq!(
        check_records(&[txt(&["v=STSv1", "; id=1"]), txt(&["v=STSv1;", "id=2"])]),
        Err(FetchError::ManyRecords(2))
    );
    for bad in [
        "v=STSv1;",
        "v=STSv1; ",
        "v=STSv1; id=",
        "v=STSv1; id=2019-04-29",
        "v=STSv1; id=0123456789abcdef0123456789abcdef0",
        "v=STSv1; id=1; id=2",
        "v=STSv1; id=1;;",
        "v=STSv1; ;id=1",
        "v=STSv1; garbage",
        "v=STSv1; id=1; =x",
        "v=STSv1; id=1; x=a b",
        "v=STSv1; id=1; x=a=b",
        "v=STSv1; id=1; -x=1",
    ] {
        assert!(
            matches!(records(&[bad]), Err(FetchError::BadRecord(_))),
            "{bad}"
        );
    }
    let not_utf8 = TXT::from_bytes(vec![b"v=STSv1; id=\xff"]);
    assert!(matches!(
        check_records(&[not_utf8]),
        Err(FetchError::BadRecord(_))
    ));
}

/// A test CA, and the roots that trust it.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    roots: Arc<RootCertStore>,
}

fn pki() -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "tambo test CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    Pki {
        ca,
        roots: Arc::new(roots),
    }
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn leaf(name: &str, issuer: &Issuer<'_, KeyPair>) -> Identity {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    let key = PrivatePkcs8KeyDer::from(key.serialize_der()).into();
    (vec![cert.der().clone()], key)
}

fn self_signed(name: &str) -> Identity {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key = PrivatePkcs8KeyDer::from(key.serialize_der()).into();
    (vec![cert.der().clone()], key)
}

/// Serves one connection on loopback: reads the request head, answers
/// `response` verbatim, closes. The task returns the request head.
async fn serve(id: Identity, response: Vec<u8>) -> (SocketAddr, JoinHandle<String>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(id.0, id.1)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // The client may refuse the certificate: no request then.
        let Ok(mut tls) = acceptor.accept(tcp).await else {
            return String::new();
        };
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        // The client may hang up early (a body over the limit).
        let _ = tls.write_all(&response).await;
        let _ = tls.shutdown().await;
        String::from_utf8_lossy(&head).into_owned()
    });
    (addr, task)
}

fn response(status: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    if let Some(ct) = content_type {
        r.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    r.push_str("Connection: close\r\n\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// Serves `response` with a certificate for HOST from the test CA and
/// fetches from it.
async fn fetch_with(response: Vec<u8>) -> Result<Vec<u8>, FetchError> {
    let pki = pki();
    let (addr, server) = serve(leaf(HOST, &pki.ca), response).await;
    let got = get_from(addr, HOST, tls_config(pki.roots).unwrap()).await;
    server.abort();
    got
}

#[tokio::test]
async fn a_policy_is_fetched() {
    let pki = pki();
    let ok = response("200 OK", Some("text/plain"), POLICY.as_bytes());
    let (addr, server) = serve(leaf(HOST, &pki.ca), ok).await;
    let got = get_from(addr, HOST, tls_config(pki.roots).unwrap()).await;
    assert_eq!(got.unwrap(), POLICY.as_bytes());
    let head = server.await.unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("get /.well-known/mta-sts.txt http/1.1\r\n"),
        "{head}"
    );
    let host = format!("\r\nhost: {HOST}:{}\r\n", addr.port());
    assert!(head.contains(&host), "{head}");
    // What the cache does with it.
    assert!(crate::sts::policy::parse(POLICY.as_bytes()).is_ok());
}

#[tokio::test]
async fn media_type_parameters_and_case_are_allowed() {
    for ct in [
        "text/plain; charset=utf-8",
        "Text/Plain",
        "text/plain ;charset=\"us-ascii\"",
    ] {
        let ok = response("200 OK", Some(ct), POLICY.as_bytes());
        assert_eq!(fetch_with(ok).await.unwrap(), POLICY.as_bytes(), "{ct}");
    }
}

#[tokio::test]
async fn the_certificate_must_verify() {
    let pki = pki();
    let ok = || response("200 OK", Some("text/plain"), POLICY.as_bytes());
    // Self-signed: not from a trusted root.
    let (addr, server) = serve(self_signed(HOST), ok()).await;
    let got = get_from(addr, HOST, tls_config(pki.roots.clone()).unwrap()).await;
    assert!(matches!(got, Err(FetchError::Tls { .. })), "{got:?}");
    server.abort();
    // From the trusted CA, but for another name.
    let (addr, server) = serve(leaf("www.example.com", &pki.ca), ok()).await;
    let got = get_from(addr, HOST, tls_config(pki.roots).unwrap()).await;
    assert!(matches!(got, Err(FetchError::Tls { .. })), "{got:?}");
    server.abort();
    // No roots: nothing can be verified, so nothing is fetched.
    assert!(tls_config(Arc::new(RootCertStore::empty())).is_err());
}

#[tokio::test]
async fn only_200_is_accepted() {
    let not_found = response("404 Not Found", Some("text/plain"), b"no");
    assert_eq!(fetch_with(not_found).await, Err(FetchError::Status(404)));
    // Redirects are not followed (RFC 8461 §3.3).
    let mut moved =
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://elsewhere.example/\r\n".to_vec();
    moved.extend_from_slice(b"Content-Type: text/plain\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(fetch_with(moved).await, Err(FetchError::Status(301)));
    let no_content = response("204 No Content", Some("text/plain"), b"");
    assert_eq!(fetch_with(no_content).await, Err(FetchError::Status(204)));
}

#[tokio::test]
async fn only_text_plain_is_accepted() {
    let html = response("200 OK", Some("text/html"), POLICY.as_bytes());
    assert_eq!(
        fetch_with(html).await,
        Err(FetchError::MediaType("text/html".into()))
    );
    let plainer = response("200 OK", Some("text/plainer"), POLICY.as_bytes());
    assert!(matches!(
        fetch_with(plainer).await,
        Err(FetchError::MediaType(_))
    ));
    let none = response("200 OK", None, POLICY.as_bytes());
    assert_eq!(
        fetch_with(none).await,
        Err(FetchError::MediaType(String::new()))
    );
}

#[tokio::test]
async fn at_most_10_kib_is_read() {
    let full = vec![b'a'; MAX_BODY];
    let ok = response("200 OK", Some("text/plain"), &full);
    assert_eq!(fetch_with(ok).await.unwrap().len(), MAX_BODY);
    let over = vec![b'a'; MAX_BODY + 1];
    let big = response("200 OK", Some("text/plain"), &over);
    assert_eq!(fetch_with(big).await, Err(FetchError::TooLarge));
    // No Content-Length: the body ends when the server closes; the limit
    // holds all the same.
    let mut no_length =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n".to_vec();
    no_length.extend_from_slice(&vec![b'a'; 64 * 1024]);
    assert_eq!(fetch_with(no_length).await, Err(FetchError::TooLarge));
}

/// A DNS server on loopback that answers from `zone` (names are fully
/// qualified): NOERROR with no answer for a name it has under another
/// type, NXDOMAIN for names it does not have.
async fn dns_server(zone: Vec<(&'static str, RData)>) -> SocketAddr {
    use hickory_resolver::proto::op::{Message, ResponseCode};
    use hickory_resolver::proto::rr::{Name, Record};

    let zone: Vec<(Name, RData)> = zone
        .into_iter()
        .map(|(n, d)| (Name::from_ascii(n).unwrap(), d))
        .collect();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
            resp.metadata.recursion_desired = req.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            let mut known = false;
            for q in &req.queries {
                resp.add_query(q.clone());
                for (name, data) in &zone {
                    if *name == q.name {
                        known = true;
                        if data.record_type() == q.query_type {
                            resp.add_answer(Record::from_rdata(q.name.clone(), 60, data.clone()));
                        }
                    }
                }
            }
            if !known {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

/// A resolver that asks only `server` (as `[testing] dns_server` makes
/// deliverd's).
fn resolver(server: SocketAddr) -> TokioResolver {
    use hickory_resolver::Resolver;
    use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;

    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
    for c in &mut ns.connections {
        c.port = server.port();
    }
    let mut b = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    b.options_mut().use_hosts_file = ResolveHosts::Never;
    b.build().unwrap()
}

/// The whole real path: TXT and address through the given resolver, then
/// HTTPS on the given port, into the cache.
#[tokio::test]
async fn the_cache_fetches_through_dns_and_https() {
    use crate::sts::counters::Counter;
    use hickory_resolver::proto::rr::rdata::A;

    let pki = pki();
    let ok = response("200 OK", Some("text/plain"), POLICY.as_bytes());
    let (https, server) = serve(leaf(HOST, &pki.ca), ok).await;
    let dns = dns_server(vec![
        (
            "_mta-sts.example.com.",
            RData::TXT(txt(&["v=STSv1; id=20240101;"])),
        ),
        ("mta-sts.example.com.", RData::A(A::new(127, 0, 0, 1))),
        // TXT, but no policy host: a failed fetch.
        (
            "_mta-sts.example.net.",
            RData::TXT(txt(&["v=STSv1; id=1;"])),
        ),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sts = crate::sts::Sts::new(
        dir.path().join("sts-cache"),
        resolver(dns),
        pki.roots.clone(),
        https.port(),
    );
    let p = sts.policy("example.com").await.unwrap();
    assert_eq!(p.mx, ["mx.example.com"]);
    assert!(server.await.unwrap().contains("/.well-known/mta-sts.txt"));
    // No TXT record (NXDOMAIN), and no policy host.
    assert!(sts.policy("example.org").await.is_none());
    assert!(sts.policy("example.net").await.is_none());
    let stats = &sts.shared.stats;
    assert_eq!(stats.get(Counter::Fetches), 3);
    assert_eq!(stats.get(Counter::FailedFetch), 2);
    // Why each failed.
    let https = Https::new(resolver(dns), pki.roots, https.port());
    assert_eq!(https.fetch("example.org").await, Err(FetchError::NoRecord));
    assert_eq!(
        https.fetch("example.net").await,
        Err(FetchError::NoAddress("mta-sts.example.net".into()))
    );
}

/// `[tambo] outgoing_source_address` applies to policy fetches as to
/// remote SMTP (remote delivery hands it over).
#[tokio::test]
async fn fetches_leave_from_the_configured_source_address() {
    use hickory_resolver::proto::rr::rdata::A;

    // Takes one connection and notes where it came from; the handshake
    // then fails, which does not matter here.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = tokio::spawn(async move { listener.accept().await.unwrap().1.ip() });
    let dns = dns_server(vec![
        (
            "_mta-sts.example.com.",
            RData::TXT(txt(&["v=STSv1; id=20240101;"])),
        ),
        ("mta-sts.example.com.", RData::A(A::new(127, 0, 0, 1))),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sts = crate::sts::Sts::new(
        dir.path().join("sts-cache"),
        resolver(dns),
        pki().roots,
        port,
    );
    // Loopback is a /8: 127.0.0.2 is ours too. The IPv6 entry is for the
    // other family and must not be used here.
    sts.set_source_addresses(&["::1".parse().unwrap(), "127.0.0.2".parse().unwrap()]);
    assert!(sts.policy("example.com").await.is_none());
    assert_eq!(seen.await.unwrap().to_string(), "127.0.0.2");
}
