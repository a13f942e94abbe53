use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn proxy(src: &str, dst: &str) -> Header {
    Header::Proxy {
        src: sa(src),
        dst: sa(dst),
    }
}

/// A v2 header: command, family, and the block after the head.
fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(ver_cmd);
    h.push(family);
    h.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    h.extend_from_slice(block);
    h
}

fn v2_tcp4(tlvs: &[u8]) -> Vec<u8> {
    let mut block = vec![192, 0, 2, 1, 198, 51, 100, 7];
    block.extend_from_slice(&40000u16.to_be_bytes());
    block.extend_from_slice(&25u16.to_be_bytes());
    block.extend_from_slice(tlvs);
    v2(0x21, V2_TCP4, &block)
}

fn v2_tcp6(tlvs: &[u8]) -> Vec<u8> {
    let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let dst: Ipv6Addr = "2001:db8:ffff::25".parse().unwrap();
    let mut block = src.octets().to_vec();
    block.extend_from_slice(&dst.octets());
    block.extend_from_slice(&65535u16.to_be_bytes());
    block.extend_from_slice(&465u16.to_be_bytes());
    block.extend_from_slice(tlvs);
    v2(0x21, V2_TCP6, &block)
}

/// Every valid header the tests know, with what it parses to.
fn valid() -> Vec<(Vec<u8>, Header)> {
    let tcp4 = proxy("192.0.2.1:40000", "198.51.100.7:25");
    let tcp6 = proxy("[2001:db8::1]:65535", "[2001:db8:ffff::25]:465");
    // ALPN "h2", then an SNI, then a NOOP with an empty value.
    let tlvs = b"\x01\x00\x02h2\x02\x00\x0bexample.com\x04\x00\x00";
    let longest6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let v1_longest = format!("PROXY TCP6 {longest6} {longest6} 65535 65535\r\n");
    assert_eq!(v1_longest.len(), V1_MAX - 3);
    vec![
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.7 40000 25\r\n".to_vec(),
            tcp4,
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8:ffff::25 65535 465\r\n".to_vec(),
            tcp6,
        ),
        (
            b"PROXY TCP6 :: :: 0 0\r\n".to_vec(),
            proxy("[::]:0", "[::]:0"),
        ),
        (
            b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n".to_vec(),
            proxy("0.0.0.0:0", "0.0.0.0:0"),
        ),
        (
            b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1 2\r\n".to_vec(),
            proxy("[::ffff:192.0.2.9]:1", "[::1]:2"),
        ),
        (
            v1_longest.into_bytes(),
            proxy(
                &format!("[{longest6}]:65535"),
                &format!("[{longest6}]:65535"),
            ),
        ),
        (v2_tcp4(b""), tcp4),
        (v2_tcp6(b""), tcp6),
        (v2_tcp4(tlvs), tcp4),
        (v2_tcp6(tlvs), tcp6),
        // LOCAL: empty, or with a family and block that are ignored.
        (v2(0x20, 0x00, b""), Header::Local),
        (v2(0x20, 0x31, &[0xff; 216]), Header::Local),
        (v2(0x20, 0x11, &[1, 2, 3]), Header::Local),
    ]
}

#[test]
fn valid_headers_parse_to_their_exact_length() {
    for (h, want) in valid() {
        assert_eq!(parse(&h), Ok(Step::Done(want, h.len())), "{h:?}");
        // What follows is not the header's.
        let mut more = h.clone();
        more.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(parse(&more), Ok(Step::Done(want, h.len())), "{h:?}");
    }
}

#[test]
fn no_read_goes_past_a_valid_header() {
    for (h, _) in valid() {
        for at in 0..h.len() {
            match parse(&h[..at]) {
                Ok(Step::More(n)) => assert!(
                    n >= 1 && n <= h.len() - at,
                    "{h:?} after {at} bytes asks for {n}"
                ),
                other => panic!("{h:?} after {at} bytes: {other:?}"),
            }
        }
    }
}

#[test]
fn reads_are_few() {
    // The bound is not byte by byte: a typical v1 line takes a handful
    // of reads even when each arrives alone, and a v2 header two.
    let count = |h: &[u8]| {
        let (mut at, mut reads) = (0, 0);
        while let Ok(Step::More(n)) = parse(&h[..at]) {
            at += n;
            reads += 1;
        }
        reads
    };
    let line = b"PROXY TCP4 192.0.2.1 198.51.100.7 40000 25\r\n";
    assert!(count(line) <= 12, "{}", count(line));
    assert_eq!(count(&v2_tcp6(b"\x04\x00\x00")), 2);
}

fn err(buf: &[u8]) -> Error {
    match parse(buf) {
        Err(e) => e,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

#[test]
fn v1_refusals() {
    let malformed = |b: &[u8]| matches!(err(b), Error::Malformed(_));
    assert_eq!(err(b"PROXY UNKNOWN\r\n"), Error::Unknown);
    assert_eq!(
        err(b"PROXY UNKNOWN ffff:: ffff:: 65535 65535\r\n"),
        Error::Unknown
    );
    assert_eq!(err(b"PROXY UNKNOWN a b c d e f g\r\n"), Error::Unknown);
    // Not 6 fields.
    for b in [
        &b"PROXY TCP4 192.0.2.1 198.51.100.7 40000\r\n"[..],
        b"PROXY TCP4 192.0.2.1 198.51.100.7 40000 25 x\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 40000 25 \r\n",
        b"PROXY TCP4  192.0.2.1 198.51.100.7 40000 25\r\n",
        b"PROXY TCP4 192.0.2.1  198.51.100.7 40000\r\n",
        b"PROXY \r\n",
        b"PROXY TCP4\r\n",
    ] {
        assert!(malformed(b), "{:?}", String::from_utf8_lossy(b));
    }
    // A seventh field is refused before the line ends.
    assert!(malformed(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 "));
    // Addresses.
    for b in [
        &b"PROXY TCP4 192.0.2.256 198.51.100.7 1 25\r\n"[..],
        b"PROXY TCP4 192.0.2 198.51.100.7 1 25\r\n",
        b"PROXY TCP4 192.0.2.01 198.51.100.7 1 25\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.7 1 25\r\n",
        b"PROXY TCP4 192.0.2.1 ::1 1 25\r\n",
        b"PROXY TCP6 192.0.2.1 ::1 1 25\r\n",
        b"PROXY TCP6 ::1 fe80::1%eth0 1 25\r\n",
        b"PROXY TCP6 [::1] ::1 1 25\r\n",
        b"PROXY TCP4 example.com 198.51.100.7 1 25\r\n",
    ] {
        assert!(malformed(b), "{:?}", String::from_utf8_lossy(b));
    }
    // Ports.
    for p in [
        "65536", "99999", "-1", "+1", "01", "00", "1a", "", " 1", "123456",
    ] {
        let b = format!("PROXY TCP4 192.0.2.1 198.51.100.7 {p} 25\r\n");
        assert!(malformed(b.as_bytes()), "{b:?}");
        let b = format!("PROXY TCP4 192.0.2.1 198.51.100.7 25 {p}\r\n");
        assert!(malformed(b.as_bytes()), "{b:?}");
    }
    // Protocols.
    for p in ["TCP5", "UDP4", "tcp4", "UNIX", "", "TCP"] {
        let b = format!("PROXY {p} 192.0.2.1 198.51.100.7 1 25\r\n");
        assert!(
            matches!(err(b.as_bytes()), Error::Family(_) | Error::Malformed(_)),
            "{b:?}"
        );
    }
    assert!(matches!(
        err(b"PROXY UDP4 192.0.2.1 198.51.100.7 1 25\r\n"),
        Error::Family(_)
    ));
    // Line endings and bytes.
    for b in [
        &b"PROXY TCP4 192.0.2.1 198.51.100.7 1 25\n"[..],
        b"PROXY TCP4 192.0.2.1 198.51.100.7 1 25\r\r\n",
        b"PROXY TCP4 192.0.2.1\r198.51.100.7 1 25\r\n",
        b"PROXY TCP4 192.0.2.1\t198.51.100.7 1 25\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 1 25\0\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\xc3\xa9\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 1 25 \x7f",
    ] {
        assert!(malformed(b), "{:?}", String::from_utf8_lossy(b));
    }
    // Garbage is refused as it arrives, not when the line ends.
    assert!(malformed(b"PROXY TCP4 1\x01"));
    assert!(malformed(b"PROXY TCP4 1\rx"));
}

#[test]
fn v1_length_limit() {
    // 107 bytes with the CRLF is the limit; a line that has not ended
    // by then is refused, even one that would end just after.
    let mut line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535".to_vec();
    while line.len() < V1_MAX {
        line.insert(11, b'0');
    }
    assert_eq!(line.len(), V1_MAX);
    assert_eq!(err(&line), Error::TooLong);
    let mut long = line.clone();
    long.extend_from_slice(b"\r\n");
    assert_eq!(err(&long), Error::TooLong);
    // Exactly 107 with the CRLF: read whole, then judged on its merits
    // (here the leading zeros make a bad address).
    let exact = [&line[..V1_MAX - 2], b"\r\n"].concat();
    assert!(matches!(err(&exact), Error::Malformed(_)));
    // A line without a LF never asks past the limit.
    for at in V1_PREFIX.len()..V1_MAX {
        let mut b = V1_PREFIX.to_vec();
        b.resize(at, b'1');
        if let Ok(Step::More(n)) = parse(&b) {
            assert!(b.len() + n <= V1_MAX, "{at}: {n}");
        }
    }
}

#[test]
fn not_proxy_at_the_first_wrong_byte() {
    for b in [
        &b"E"[..],
        b"EHLO client.test\r\n",
        b"HELO x\r\n",
        b"QUIT\r\n",
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00",
        b"PR0XY",
        b"proxy TCP4",
        b"PROXY\t",
        b"PROXY\r\n",
        b"PROXYTCP4",
        b"\r\n\r\n\0\r\nQUIT\r",
        b"\r\n\r\n\x01",
        b"\r\r",
        b"\n",
        b"\0",
    ] {
        assert_eq!(err(b), Error::NotProxy, "{b:?}");
    }
    // Prefixes of either signature are only incomplete.
    for b in [&b"P"[..], b"PROX", b"PROXY", b"\r", b"\r\n\r\n\0\r\nQUI"] {
        assert!(matches!(parse(b), Ok(Step::More(_))), "{b:?}");
    }
}

#[test]
fn v2_refusals() {
    let addrs4 = &v2_tcp4(b"")[V2_HEAD..];
    let addrs6 = &v2_tcp6(b"")[V2_HEAD..];
    // Versions other than 2, commands other than LOCAL and PROXY.
    for ver_cmd in [0x11, 0x31, 0x01, 0xf1, 0x22, 0x2f] {
        assert!(
            matches!(err(&v2(ver_cmd, V2_TCP4, addrs4)), Error::Malformed(_)),
            "{ver_cmd:#x}"
        );
    }
    // Families and protocols other than TCP over IPv4 or IPv6, refused
    // from the head alone.
    for family in [
        0x00, 0x01, 0x10, 0x12, 0x20, 0x22, 0x30, 0x31, 0x32, 0x41, 0xff,
    ] {
        let h = v2(0x21, family, &[0u8; 216]);
        assert!(matches!(err(&h), Error::Family(_)), "{family:#x}");
        assert!(
            matches!(err(&h[..V2_HEAD]), Error::Family(_)),
            "{family:#x}"
        );
    }
    // A block shorter than its addresses.
    assert!(matches!(
        err(&v2(0x21, V2_TCP4, &addrs4[..11])),
        Error::Malformed(_)
    ));
    assert!(matches!(
        err(&v2(0x21, V2_TCP6, addrs4)),
        Error::Malformed(_)
    ));
    assert!(matches!(
        err(&v2(0x21, V2_TCP6, &addrs6[..35])),
        Error::Malformed(_)
    ));
    // Longer than the limit: refused from the head alone.
    let mut head = v2(0x21, V2_TCP4, b"");
    head[14..16].copy_from_slice(&u16::try_from(V2_MAX_LEN + 1).unwrap().to_be_bytes());
    assert_eq!(err(&head), Error::TooLong);
    head[14..16].copy_from_slice(&[0xff, 0xff]);
    assert_eq!(err(&head), Error::TooLong);
    let mut local = v2(0x20, 0, b"");
    local[14..16].copy_from_slice(&[0xff, 0xff]);
    assert_eq!(err(&local), Error::TooLong);
    // At the limit: fine.
    let max_tlv = [&[0xe0, 0x0f, 0xf1][..], &[0u8; V2_MAX_LEN - 12 - 3]].concat();
    let h = v2_tcp4(&max_tlv);
    assert_eq!(h.len(), V2_HEAD + V2_MAX_LEN);
    assert!(matches!(parse(&h), Ok(Step::Done(..))));
    // TLVs that do not fit.
    for tlvs in [
        &b"\x01"[..],
        b"\x01\x00",
        b"\x01\x00\x03h2",
        b"\x01\x00\x02h2\x04",
        b"\x01\xff\xffh2",
    ] {
        assert!(
            matches!(err(&v2_tcp4(tlvs)), Error::Malformed(_)),
            "{tlvs:?}"
        );
        assert!(
            matches!(err(&v2_tcp6(tlvs)), Error::Malformed(_)),
            "{tlvs:?}"
        );
    }
    // A wrong signature, anywhere in it.
    for i in 0..V2_SIGNATURE.len() {
        let mut h = v2_tcp4(b"");
        h[i] ^= 0x20;
        assert!(
            matches!(err(&h), Error::NotProxy),
            "byte {i}: {:?}",
            parse(&h)
        );
    }
}

#[test]
fn failure_kinds_have_distinct_labels() {
    let labels: std::collections::HashSet<_> = Kind::ALL.iter().map(|k| k.label()).collect();
    assert_eq!(labels.len(), Kind::ALL.len());
    for (i, k) in Kind::ALL.iter().enumerate() {
        assert_eq!(k.index(), i);
    }
    assert_eq!(Failure::from(Error::Unknown).kind(), Kind::Unknown);
    assert_eq!(Failure::from(Error::Family("x")).kind(), Kind::Family);
}

/// A reader that hands out one byte per read, as a slow proxy would.
struct Trickle<'a>(&'a [u8]);

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some((&b, rest)) = self.0.split_first()
            && buf.remaining() > 0
        {
            buf.put_slice(&[b]);
            self.0 = rest;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(60)
}

#[tokio::test]
async fn reading_leaves_every_byte_after_the_header() {
    let after = b"\x16\x03\x01\x00\xa5EHLO x\r\n";
    for (h, want) in valid() {
        let input = [&h[..], after].concat();
        let mut r: &[u8] = &input;
        assert_eq!(read_header(&mut r, far()).await.unwrap(), want);
        assert_eq!(r, after, "{h:?}");
        let mut t = Trickle(&input);
        assert_eq!(read_header(&mut t, far()).await.unwrap(), want);
        assert_eq!(t.0, after, "{h:?}");
    }
}

#[tokio::test]
async fn reading_fails_on_eof_garbage_and_time() {
    let mut r: &[u8] = b"PROXY TCP4 192.0.2.1";
    assert!(matches!(
        read_header(&mut r, far()).await,
        Err(Failure::Closed)
    ));
    let mut r: &[u8] = b"";
    assert!(matches!(
        read_header(&mut r, far()).await,
        Err(Failure::Closed)
    ));
    let mut r: &[u8] = b"EHLO client.test\r\n";
    let e = read_header(&mut r, far()).await.unwrap_err();
    assert_eq!(e.kind(), Kind::NotProxy);
    let mut r: &[u8] = b"PROXY UNKNOWN\r\nEHLO x\r\n";
    let e = read_header(&mut r, far()).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Unknown);
    // A peer that says nothing.
    let (mut quiet, _keep) = tokio::io::duplex(64);
    let soon = tokio::time::Instant::now() + Duration::from_millis(50);
    let e = read_header(&mut quiet, soon).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Timeout);
}
