//! HAProxy's PROXY protocol, v1 (text) and v2 (binary): the header a proxy
//! sends first on every connection, naming the client it relays
//! (REFERENCE §2.1, `haproxy_incoming`).
//!
//! [`parse`] is a pure function over the bytes received so far. Besides
//! the header, it says how many more bytes may be read without taking one
//! past the header's end: whatever follows (SMTP commands, or on 465 the
//! TLS handshake) must stay in the socket for whoever reads next. So
//! [`read_header`] reads straight from the socket, never through a buffer,
//! and leaves nothing behind.
//!
//! Only what tambo can use is accepted: v1 `TCP4`/`TCP6` with exactly six
//! fields; v2 `PROXY` over TCP (AF_INET or AF_INET6, STREAM), or v2
//! `LOCAL` (the proxy speaking for itself, e.g. a health check: the
//! connection's own peer address holds). v1 `UNKNOWN` is refused: there
//! would be no client address to check or to write down.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 line, CRLF included (the protocol's own limit).
pub const V1_MAX: usize = 107;
/// Shortest v1 line tambo accepts: `PROXY TCP6 :: :: 0 0\r\n`.
const V1_MIN: usize = 22;
const V1_PREFIX: &[u8] = b"PROXY ";
/// The fields of a v1 line, `PROXY` included; one space between each two.
const V1_FIELDS: usize = 6;
/// What starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and protocol, length.
const V2_HEAD: usize = 16;
/// Most bytes after a v2 head: the addresses (36 at most) and the TLVs
/// (ALPN, SNI, unique id, TLS details…), which tambo skips. A real proxy
/// sends a few hundred; the rest of the 64 KiB the length field allows
/// would only be memory held for a peer that is not a proxy.
pub const V2_MAX_LEN: usize = 4096;
const V2_CMD_LOCAL: u8 = 0x0;
const V2_CMD_PROXY: u8 = 0x1;
/// AF_INET over STREAM, and its address block: two addresses, two ports.
const V2_TCP4: u8 = 0x11;
const V2_TCP4_LEN: usize = 4 + 4 + 2 + 2;
/// AF_INET6 over STREAM.
const V2_TCP6: u8 = 0x21;
const V2_TCP6_LEN: usize = 16 + 16 + 2 + 2;

/// A header tambo accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxy relays `src`, which connected to `dst`.
    Proxy { src: SocketAddr, dst: SocketAddr },
    /// v2 `LOCAL`: the proxy's own connection; its own address holds.
    Local,
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Neither `PROXY ` nor the v2 signature: a client talking directly,
    /// or a proxy without the PROXY protocol turned on.
    #[error("no PROXY header")]
    NotProxy,
    /// v1 `UNKNOWN`: the proxy does not know the client.
    #[error("PROXY UNKNOWN: no client address")]
    Unknown,
    /// Not TCP over IPv4 or IPv6.
    #[error("PROXY header for another family or protocol: {0}")]
    Family(&'static str),
    /// Over [`V1_MAX`] (v1) or [`V2_MAX_LEN`] (v2).
    #[error("PROXY header too long")]
    TooLong,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// What [`parse`] made of the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A whole header, `len` bytes long (what follows is not its own).
    Done(Header, usize),
    /// Not yet whole: read at most this many more bytes (at least 1). No
    /// valid header consistent with the bytes so far ends sooner, so a
    /// read of that size never takes a byte past the header.
    More(usize),
}

/// Parses the start of a connection, `buf` being every byte received so
/// far. Decides as early as the bytes allow: a client speaking SMTP
/// directly is refused at its first byte.
pub fn parse(buf: &[u8]) -> Result<Step, Error> {
    match buf.first() {
        // The shortest header is a v2 one with an empty block.
        None => Ok(Step::More(V2_HEAD)),
        Some(&b) if b == V2_SIGNATURE[0] => parse_v2(buf),
        Some(&b) if b == V1_PREFIX[0] => parse_v1(buf),
        Some(_) => Err(Error::NotProxy),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Step, Error> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(Error::NotProxy);
    }
    let Some(head) = buf.get(..V2_HEAD) else {
        return Ok(Step::More(V2_HEAD - buf.len()));
    };
    let (ver_cmd, family) = (head[12], head[13]);
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(Error::Malformed("v2 version is not 2"));
    }
    let command = ver_cmd & 0x0f;
    // Checked before waiting for the block, so a bad head is refused at
    // once rather than after the deadline.
    let addr_len = match (command, family) {
        // LOCAL: the family and the block are ignored (the protocol says
        // so); the connection's own addresses hold.
        (V2_CMD_LOCAL, _) => 0,
        (V2_CMD_PROXY, V2_TCP4) => V2_TCP4_LEN,
        (V2_CMD_PROXY, V2_TCP6) => V2_TCP6_LEN,
        (V2_CMD_PROXY, _) => return Err(Error::Family(family_name(family))),
        _ => return Err(Error::Malformed("v2 command is neither LOCAL nor PROXY")),
    };
    if len > V2_MAX_LEN {
        return Err(Error::TooLong);
    }
    if len < addr_len {
        return Err(Error::Malformed("v2 length shorter than its addresses"));
    }
    let total = V2_HEAD + len;
    let Some(block) = buf.get(V2_HEAD..total) else {
        return Ok(Step::More(total - buf.len()));
    };
    if command == V2_CMD_LOCAL {
        return Ok(Step::Done(Header::Local, total));
    }
    let (addrs, tlvs) = block.split_at(addr_len);
    check_tlvs(tlvs)?;
    let (src, dst) = if family == V2_TCP4 {
        let ip = |at: usize| {
            IpAddr::V4(Ipv4Addr::new(
                addrs[at],
                addrs[at + 1],
                addrs[at + 2],
                addrs[at + 3],
            ))
        };
        (ip(0), ip(4))
    } else {
        let ip = |at: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&addrs[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(b))
        };
        (ip(0), ip(16))
    };
    let ports = &addrs[addr_len - 4..];
    let src_port = u16::from_be_bytes([ports[0], ports[1]]);
    let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    Ok(Step::Done(
        Header::Proxy {
            src: SocketAddr::new(src, src_port),
            dst: SocketAddr::new(dst, dst_port),
        },
        total,
    ))
}

fn family_name(family: u8) -> &'static str {
    match family >> 4 {
        0x1 | 0x2 => "v2 transport is not STREAM",
        0x0 => "v2 family AF_UNSPEC",
        0x3 => "v2 family AF_UNIX",
        _ => "v2 family unknown",
    }
}

/// The TLVs after the addresses: skipped, but each must fit, as HAProxy
/// itself requires of what it receives.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), Error> {
    while !tlvs.is_empty() {
        let Some(&[_kind, hi, lo]) = tlvs.get(..3) else {
            return Err(Error::Malformed("v2 TLV cut short"));
        };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        if end > tlvs.len() {
            return Err(Error::Malformed("v2 TLV longer than the header"));
        }
        tlvs = &tlvs[end..];
    }
    Ok(())
}

fn parse_v1(buf: &[u8]) -> Result<Step, Error> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(Error::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let lf = window.iter().position(|&b| b == b'\n');
    let line = &window[..lf.unwrap_or(window.len())];
    // Checked on every read, so garbage is refused before the line ends.
    for (i, &b) in line.iter().enumerate() {
        let ok = match b {
            b' '..=b'~' => true,
            // Only as the last byte before the LF.
            b'\r' => i + 1 == line.len(),
            _ => false,
        };
        if !ok {
            return Err(Error::Malformed("v1 line with a control or non-ASCII byte"));
        }
    }
    let spaces = line.iter().filter(|&&b| b == b' ').count();
    if spaces >= V1_FIELDS && !line.starts_with(b"PROXY UNKNOWN") {
        return Err(Error::Malformed("v1 line with more than 6 fields"));
    }
    let Some(lf) = lf else {
        if buf.len() >= V1_MAX {
            return Err(Error::TooLong);
        }
        return Ok(Step::More(v1_more(buf, spaces)));
    };
    let Some(text) = line.strip_suffix(b"\r") else {
        return Err(Error::Malformed("v1 line not ended by CRLF"));
    };
    // Printable ASCII only, checked above.
    let text = std::str::from_utf8(text).map_err(|_| Error::Malformed("v1 line not ASCII"))?;
    parse_v1_line(text).map(|h| Step::Done(h, lf + 1))
}

/// The fewest bytes any valid v1 line starting with `buf` (no LF yet)
/// still needs: the rest of the current field (a byte if it has none),
/// a space and a byte for each field after it, and CRLF; and the line
/// must reach [`V1_MIN`].
fn v1_more(buf: &[u8], spaces: usize) -> usize {
    if buf.last() == Some(&b'\r') {
        return 1;
    }
    let empty_field = usize::from(buf.last() == Some(&b' '));
    let fields_after = (V1_FIELDS - 1).saturating_sub(spaces);
    let by_fields = empty_field + 2 * fields_after + 2;
    let by_len = V1_MIN.saturating_sub(buf.len());
    by_fields.max(by_len).min(V1_MAX - buf.len())
}

/// A v1 line without its CRLF, `PROXY ` checked.
fn parse_v1_line(text: &str) -> Result<Header, Error> {
    let fields: Vec<&str> = text.split(' ').collect();
    if fields.get(1) == Some(&"UNKNOWN") {
        return Err(Error::Unknown);
    }
    let &[_, proto, src, dst, src_port, dst_port] = fields.as_slice() else {
        return Err(Error::Malformed("v1 line without exactly 6 fields"));
    };
    let (src, dst) = match proto {
        "TCP4" => {
            let ip = |s: &str| s.parse::<Ipv4Addr>().map(IpAddr::V4);
            (ip(src), ip(dst))
        }
        "TCP6" => {
            let ip = |s: &str| s.parse::<Ipv6Addr>().map(IpAddr::V6);
            (ip(src), ip(dst))
        }
        _ => return Err(Error::Family("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Ok(src), Ok(dst)) = (src, dst) else {
        return Err(Error::Malformed("v1 address not of its protocol's family"));
    };
    Ok(Header::Proxy {
        src: SocketAddr::new(src, port(src_port)?),
        dst: SocketAddr::new(dst, port(dst_port)?),
    })
}

/// A v1 port: 0 to 65535 in decimal, without leading zeros or a sign
/// (which `u16::from_str` would take).
fn port(s: &str) -> Result<u16, Error> {
    let bad = Error::Malformed("v1 port is not a number from 0 to 65535");
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(bad);
    }
    s.parse().map_err(|_| bad)
}

/// How reading a header can fail.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Header(#[from] Error),
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    /// Closed (or reset) before a whole header.
    #[error("connection closed before a whole PROXY header")]
    Closed,
}

/// A kind of [`Failure`]: the label it is counted under, and the unit of
/// log rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NotProxy,
    Unknown,
    Family,
    TooLong,
    Malformed,
    Timeout,
    Closed,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::NotProxy,
        Kind::Unknown,
        Kind::Family,
        Kind::TooLong,
        Kind::Malformed,
        Kind::Timeout,
        Kind::Closed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::NotProxy => "not_proxy",
            Kind::Unknown => "unknown",
            Kind::Family => "family",
            Kind::TooLong => "too_long",
            Kind::Malformed => "malformed",
            Kind::Timeout => "timeout",
            Kind::Closed => "closed",
        }
    }

    /// Its place in [`Kind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl Failure {
    pub fn kind(&self) -> Kind {
        match self {
            Failure::Header(Error::NotProxy) => Kind::NotProxy,
            Failure::Header(Error::Unknown) => Kind::Unknown,
            Failure::Header(Error::Family(_)) => Kind::Family,
            Failure::Header(Error::TooLong) => Kind::TooLong,
            Failure::Header(Error::Malformed(_)) => Kind::Malformed,
            Failure::Timeout(_) => Kind::Timeout,
            Failure::Closed => Kind::Closed,
        }
    }
}

/// Reads one header from `r` within `deadline`, reading only the header's
/// own bytes: the next byte `r` gives is the first one after it.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    deadline: tokio::time::Instant,
) -> Result<Header, Failure> {
    let limit = deadline.saturating_duration_since(tokio::time::Instant::now());
    tokio::time::timeout_at(deadline, read_exactly_header(r))
        .await
        .map_err(|_| Failure::Timeout(limit))?
}

async fn read_exactly_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, Failure> {
    let mut buf = Vec::with_capacity(V1_MAX);
    loop {
        match parse(&buf)? {
            Step::Done(header, _) => return Ok(header),
            Step::More(n) => {
                let start = buf.len();
                buf.resize(start + n, 0);
                let got = r
                    .read(&mut buf[start..])
                    .await
                    .map_err(|_| Failure::Closed)?;
                if got == 0 {
                    return Err(Failure::Closed);
                }
                buf.truncate(start + got);
            }
        }
    }
}

#[cfg(test)]
mod tests;
