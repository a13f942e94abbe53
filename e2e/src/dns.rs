//! A test DNS server: UDP and TCP on one loopback port, answering from a
//! zone the test edits while it runs. deliverd is pointed at it with
//! `[testing] dns_server = "<addr>"`, so no test asks the real DNS.
//!
//! It is a small hand-written responder on hickory-proto's message codec
//! (not hickory-server's authorities): it answers exactly what the zone
//! holds, authoritatively, with TTL 0 so a resolver's cache never hides an
//! edit. Unknown names are NXDOMAIN; a name that exists (or has names under
//! it) without records of the asked type is NOERROR with no answer; CNAMEs
//! are followed. [`TestDns::servfail`] and [`TestDns::set_down`] break it
//! on purpose.
//!
//! ```no_run
//! use tambo_e2e::dns::TestDns;
//! let dns = TestDns::start();
//! dns.add_mx("dest.test", 10, "mx.dest.test");
//! dns.add_a("mx.dest.test", "127.3.4.5".parse().unwrap());
//! let testing = format!("dns_server = \"{}\"\n", dns.addr());
//! # let _ = testing;
//! ```

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How many CNAMEs are followed before giving up (SERVFAIL).
const MAX_CNAME_CHAIN: usize = 8;

/// A random address in 127.0.0.0/8 other than 127.0.0.1 (never a network
/// or broadcast-looking one), for a server that needs a port of its own
/// choosing: several test MXs or policy servers can then share one port
/// (deliverd dials one `[testing] smtp_port` / `sts_https_port` for every
/// host) on distinct addresses, and parallel tests don't collide.
pub fn random_loopback() -> Ipv4Addr {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let r = h.finish();
    let a = 1 + (r % 254) as u8; // 1..=254
    let b = ((r >> 8) & 0xff) as u8;
    let c = 1 + ((r >> 16) % 254) as u8; // 1..=254
    Ipv4Addr::new(127, a, b, c)
}

/// The zone key of a name: lower case, no trailing dot.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A fully qualified name for a record.
fn fqdn(name: &str) -> Name {
    if name.trim_end_matches('.').is_empty() {
        return Name::root();
    }
    let mut n = Name::from_str_relaxed(name.trim_end_matches('.'))
        .unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

#[derive(Default)]
struct Zone {
    records: HashMap<String, Vec<RData>>,
    servfail: HashSet<String>,
    down: bool,
    queries: Vec<(String, RecordType)>,
}

impl Zone {
    /// Whether `name` exists: it has records, or names under it do (an
    /// "empty non-terminal", which answers NOERROR too).
    fn exists(&self, name: &str) -> bool {
        self.records.get(name).is_some_and(|v| !v.is_empty()) || {
            let suffix = format!(".{name}");
            self.records
                .iter()
                .any(|(k, v)| !v.is_empty() && k.ends_with(&suffix))
        }
    }

    /// The response to one query message; None to drop it.
    fn respond(&mut self, req: &Message) -> Option<Message> {
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata = Metadata::response_from_request(&req.metadata);
        resp.metadata.authoritative = true;
        resp.add_queries(req.queries.iter().cloned());
        if req.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            resp.set_edns(edns);
        }
        if let [q] = req.queries.as_slice() {
            let name = key(&q.name().to_ascii());
            self.queries.push((name.clone(), q.query_type()));
            if self.down {
                return None;
            }
            if req.metadata.op_code != OpCode::Query {
                resp.metadata.response_code = ResponseCode::NotImp;
                return Some(resp);
            }
            resp.metadata.response_code = self.answer(&name, q.query_type(), &mut resp);
        } else {
            if self.down {
                return None;
            }
            resp.metadata.response_code = ResponseCode::FormErr;
        }
        Some(resp)
    }

    /// Adds the answers for `name`/`qtype` (following CNAMEs) to `resp`;
    /// returns the response code.
    fn answer(&self, name: &str, qtype: RecordType, resp: &mut Message) -> ResponseCode {
        let mut name = name.to_string();
        for _ in 0..MAX_CNAME_CHAIN {
            if self.servfail.contains(&name) {
                resp.answers.clear();
                return ResponseCode::ServFail;
            }
            if !self.exists(&name) {
                return ResponseCode::NXDomain;
            }
            let rdatas = self.records.get(&name).map(Vec::as_slice).unwrap_or(&[]);
            let owner = fqdn(&name);
            let cname = rdatas.iter().find_map(|r| match r {
                RData::CNAME(c) if qtype != RecordType::CNAME && qtype != RecordType::ANY => {
                    Some(c.0.clone())
                }
                _ => None,
            });
            if let Some(target) = cname {
                resp.add_answer(Record::from_rdata(
                    owner,
                    0,
                    RData::CNAME(CNAME(target.clone())),
                ));
                name = key(&target.to_ascii());
                continue;
            }
            for r in rdatas {
                if qtype == RecordType::ANY || r.record_type() == qtype {
                    resp.add_answer(Record::from_rdata(owner.clone(), 0, r.clone()));
                }
            }
            return ResponseCode::NoError;
        }
        resp.answers.clear();
        ResponseCode::ServFail
    }
}

/// Encodes a response; over UDP, one too big for the client's buffer is
/// sent truncated (TC), so the client retries over TCP.
fn encode(resp: &Message, req: &Message, udp: bool) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    if !udp {
        return Some(bytes);
    }
    let limit = req
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload()).max(512));
    if bytes.len() <= limit {
        Some(bytes)
    } else {
        resp.truncate().to_vec().ok()
    }
}

/// A runtime on its own thread, running one future until dropped.
pub(crate) struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Runs `make()`'s future on a new current-thread runtime until the
    /// returned value is dropped. `make` runs inside the runtime (so it may
    /// turn std sockets into tokio ones).
    pub(crate) fn spawn<F, Fut>(name: &str, make: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let fut = make();
                    tokio::select! {
                        _ = fut => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime cancels the connection tasks.
            })
            .expect("spawn thread");
        Background {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The test DNS server. Stops when dropped.
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    _bg: Background,
}

impl TestDns {
    /// Starts on 127.0.0.1, one port chosen by the kernel for both UDP and
    /// TCP.
    pub fn start() -> TestDns {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// Starts on `ip` (a loopback address), one port for UDP and TCP.
    pub fn start_on(ip: IpAddr) -> TestDns {
        assert!(ip.is_loopback(), "the test DNS server is loopback only");
        let (udp, tcp) = (0..100)
            .find_map(|_| {
                let udp = UdpSocket::bind((ip, 0)).expect("bind UDP");
                let port = udp.local_addr().unwrap().port();
                TcpListener::bind((ip, port)).ok().map(|tcp| (udp, tcp))
            })
            .expect("no port free for both UDP and TCP");
        let addr = udp.local_addr().unwrap();
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let z = zone.clone();
        let bg = Background::spawn("test-dns", move || serve(udp, tcp, z));
        TestDns {
            addr,
            zone,
            _bg: bg,
        }
    }

    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn zone(&self) -> MutexGuard<'_, Zone> {
        self.zone.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds any record (TLSA, SRV, …) to `name`.
    pub fn add_record(&self, name: &str, rdata: RData) {
        let _ = fqdn(name); // a bad name fails here, not in the server
        self.zone()
            .records
            .entry(key(name))
            .or_default()
            .push(rdata);
    }

    /// `domain MX preference host`.
    pub fn add_mx(&self, domain: &str, preference: u16, host: &str) {
        self.add_record(domain, RData::MX(MX::new(preference, fqdn(host))));
    }

    /// The null MX (RFC 7505): `domain MX 0 .`.
    pub fn null_mx(&self, domain: &str) {
        self.add_record(domain, RData::MX(MX::new(0, Name::root())));
    }

    pub fn add_a(&self, name: &str, ip: Ipv4Addr) {
        self.add_record(name, RData::A(A(ip)));
    }

    pub fn add_aaaa(&self, name: &str, ip: Ipv6Addr) {
        self.add_record(name, RData::AAAA(AAAA(ip)));
    }

    /// `name CNAME target`.
    pub fn add_cname(&self, name: &str, target: &str) {
        self.add_record(name, RData::CNAME(CNAME(fqdn(target))));
    }

    /// One TXT record holding `text`, split into character-strings of at
    /// most 255 bytes (a DKIM key is longer); readers concatenate them.
    pub fn add_txt(&self, name: &str, text: &str) {
        let chunks: Vec<&[u8]> = if text.is_empty() {
            vec![b""]
        } else {
            text.as_bytes().chunks(255).collect()
        };
        self.add_record(name, RData::TXT(TXT::from_bytes(chunks)));
    }

    /// Removes `name`'s records of type `rtype`.
    pub fn remove(&self, name: &str, rtype: RecordType) {
        if let Some(v) = self.zone().records.get_mut(&key(name)) {
            v.retain(|r| r.record_type() != rtype);
        }
    }

    /// Makes `name` not exist (NXDOMAIN, the default for unknown names):
    /// removes its records and any [`servfail`](Self::servfail). A name
    /// with names under it still exists (NOERROR, no answer).
    pub fn nxdomain(&self, name: &str) {
        let mut z = self.zone();
        z.records.remove(&key(name));
        z.servfail.remove(&key(name));
    }

    /// Makes every query for `name` (any type) answer SERVFAIL.
    pub fn servfail(&self, name: &str) {
        self.zone().servfail.insert(key(name));
    }

    /// Undoes [`servfail`](Self::servfail).
    pub fn clear_servfail(&self, name: &str) {
        self.zone().servfail.remove(&key(name));
    }

    /// While down, every query is read (and logged) but never answered, as
    /// by an unreachable server: lookups time out.
    pub fn set_down(&self, down: bool) {
        self.zone().down = down;
    }

    /// Every query received so far, in order: (name in lower case without
    /// the trailing dot, type).
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.zone().queries.clone()
    }

    /// How many queries for `name` (any type) were received.
    pub fn query_count(&self, name: &str) -> usize {
        let k = key(name);
        self.zone().queries.iter().filter(|(n, _)| *n == k).count()
    }
}

fn handle(zone: &Mutex<Zone>, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
    let req = Message::from_vec(packet).ok()?;
    let resp = zone
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .respond(&req)?;
    encode(&resp, &req, udp)
}

async fn serve(udp: UdpSocket, tcp: TcpListener, zone: Arc<Mutex<Zone>>) {
    let udp = tokio::net::UdpSocket::from_std(udp).expect("tokio UDP socket");
    let tcp = tokio::net::TcpListener::from_std(tcp).expect("tokio TCP listener");
    let z = zone.clone();
    let udp_loop = async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            if let Some(out) = handle(&z, &buf[..n], true) {
                let _ = udp.send_to(&out, peer).await;
            }
        }
    };
    let tcp_loop = async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                continue;
            };
            let z = zone.clone();
            tokio::spawn(async move {
                // RFC 1035 §4.2.2: each message has a two-byte length.
                loop {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    if let Some(out) = handle(&z, &msg, false) {
                        let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&out);
                        if s.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    };
    tokio::join!(udp_loop, tcp_loop);
}
