//! Where mail for a domain goes (REFERENCE §4.5 step 2): the MX hosts in
//! the order to try them, and each host's addresses.
//!
//! [`select`] is the whole policy (order, shuffle, cut, null MX, implicit
//! MX) as a pure function; [`lookup_mx`] and [`lookup_addrs`] only ask the
//! resolver and classify its errors.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};

use crate::smtp::Failure;

/// Most MX hosts tried for one domain, to keep an attempt's length sane
/// and a hostile domain from making deliverd dial dozens of hosts.
pub const MAX_MX: usize = 5;

/// Most addresses tried for one host (both families together).
pub const MAX_ADDRS: usize = 8;

/// The hosts to try for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHosts {
    /// Lower case, no trailing dot, in the order to try.
    pub hosts: Vec<String>,
    /// The preference of each host (0 for the implicit MX).
    pub prefs: Vec<u16>,
    /// The domain has no MX: `hosts` is the domain itself (RFC 5321
    /// §5.1), and a domain without addresses either cannot get mail.
    pub implicit: bool,
}

/// Orders MX records: by preference, equal preferences shuffled (RFC 5321
/// §5.1, so load spreads as the domain intends) with `rand(n)` giving a
/// number below `n`; the first [`MAX_MX`] kept, duplicates dropped. No
/// record means the implicit MX; a lone `.` is a null MX (RFC 7505), and
/// a `.` among real hosts is ignored.
pub fn select(
    domain: &str,
    mut records: Vec<(u16, String)>,
    mut rand: impl FnMut(usize) -> usize,
) -> Result<MxHosts, Failure> {
    for (_, name) in &mut records {
        *name = name.trim_end_matches('.').to_ascii_lowercase();
    }
    if records.is_empty() {
        return Ok(MxHosts {
            hosts: vec![domain.to_string()],
            prefs: vec![0],
            implicit: true,
        });
    }
    if records.iter().all(|(_, name)| name.is_empty()) {
        return Err(Failure::permanent(format!(
            "5.1.10 {domain} does not accept mail (null MX, RFC 7505)"
        )));
    }
    records.retain(|(_, name)| !name.is_empty());
    records.sort_by_key(|(pref, _)| *pref);
    let mut start = 0;
    while start < records.len() {
        let pref = records[start].0;
        let end = start + records[start..].iter().take_while(|r| r.0 == pref).count();
        // Fisher–Yates over the run of equal preference.
        for i in (start + 1..end).rev() {
            let j = start + rand(i - start + 1).min(i - start);
            records.swap(i, j);
        }
        start = end;
    }
    let mut hosts: Vec<String> = Vec::with_capacity(MAX_MX);
    let mut prefs = Vec::with_capacity(MAX_MX);
    for (pref, name) in records {
        if hosts.len() == MAX_MX {
            break;
        }
        if !hosts.contains(&name) {
            hosts.push(name);
            prefs.push(pref);
        }
    }
    Ok(MxHosts {
        hosts,
        prefs,
        implicit: false,
    })
}

/// Among hosts of equal preference, those with an open connection come
/// first (in their shuffled order), so connection reuse works for domains
/// with several equal MX hosts; the order between preferences is never
/// touched (RFC 5321 §5.1 leaves only the order within one to us).
pub fn prefer_pooled(mx: &mut MxHosts, pooled: &[String]) {
    debug_assert_eq!(mx.hosts.len(), mx.prefs.len());
    // Without a preference for each host, nothing is known to be equal.
    if mx.hosts.len() != mx.prefs.len() {
        return;
    }
    let mut start = 0;
    while start < mx.hosts.len() {
        let pref = mx.prefs[start];
        let end = start + mx.prefs[start..].iter().take_while(|p| **p == pref).count();
        // Stable: pooled hosts keep their relative (random) order.
        mx.hosts[start..end].sort_by_key(|h| !pooled.contains(h));
        start = end;
    }
}

/// A uniform-enough number below `n` for shuffling (modulo bias is
/// irrelevant for a handful of hosts); 0 if the OS cannot give one.
pub fn random_below(n: usize) -> usize {
    match getrandom::u32() {
        Ok(r) if n > 0 => r as usize % n,
        _ => 0,
    }
}

/// How a lookup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DnsFailure {
    /// NXDOMAIN: the name does not exist.
    NoSuchName,
    /// The name exists, without records of that type.
    NoData,
    /// Anything else: SERVFAIL, REFUSED, FORMERR, a timeout, no server
    /// reachable, a malformed or mismatched answer... None of these says
    /// anything about the domain, only about the path to its answer, and
    /// a mail bounced for a resolver's fault is lost for good; retrying
    /// costs only time (the give-up deadline still ends it).
    Temporary,
}

/// Only an answer that proves the name absent (NXDOMAIN) or without
/// records of the type asked (NOERROR, no data) is taken as final; every
/// other error is temporary. REFERENCE §4.5 step 2 says "other DNS errors
/// → permanent"; this is deliberately narrower, after review: the only
/// permanent cases are NXDOMAIN, a null MX, an IDNA error, and a domain
/// with neither MX nor address.
fn classify(e: &NetError) -> DnsFailure {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            DnsFailure::NoSuchName
        }
        // A referral (name servers, no SOA) is not an answer: a
        // non-recursive or broken upstream resolver, not proof that the
        // domain has no records.
        NetError::Dns(DnsError::NoRecordsFound(nr)) if nr.soa.is_none() && nr.ns.is_some() => {
            DnsFailure::Temporary
        }
        // hickory builds NoRecordsFound only from NOERROR or NXDOMAIN.
        NetError::Dns(DnsError::NoRecordsFound(_)) => DnsFailure::NoData,
        _ => DnsFailure::Temporary,
    }
}

/// The fully qualified form of `name`, so the resolver's search list is
/// never tried.
fn fqdn(name: &str) -> Result<Name, String> {
    let mut n = Name::from_ascii(name.trim_end_matches('.')).map_err(|e| e.to_string())?;
    n.set_fqdn(true);
    Ok(n)
}

/// The MX hosts of `domain` (IDNA-ASCII), or why there are none.
pub async fn lookup_mx(resolver: &TokioResolver, domain: &str) -> Result<MxHosts, Failure> {
    let name = fqdn(domain).map_err(|e| {
        Failure::permanent(format!("5.1.3 {domain:?} is not a valid domain name: {e}"))
    })?;
    let records = match resolver.mx_lookup(name).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect(),
        Err(e) => match classify(&e) {
            DnsFailure::NoData => Vec::new(),
            DnsFailure::NoSuchName => {
                return Err(Failure::permanent(format!(
                    "5.1.2 the domain {domain} does not exist (NXDOMAIN)"
                )));
            }
            DnsFailure::Temporary => {
                return Err(Failure::temporary(format!(
                    "MX lookup for {domain} failed: {e}"
                )));
            }
        },
    };
    select(domain, records, random_below)
}

/// Why a host has no address to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrError {
    /// The name has no A or AAAA record, or does not exist.
    NoAddress,
    /// The lookups failed; the text says how.
    Failed(String),
}

/// The addresses of `host` with `port`: IPv6 and IPv4 alternating (so a
/// broken family costs one attempt, not all), at most [`MAX_ADDRS`].
pub async fn lookup_addrs(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, AddrError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = fqdn(host).map_err(AddrError::Failed)?;
    let (v6, v4) = tokio::join!(
        resolver.ipv6_lookup(name.clone()),
        resolver.ipv4_lookup(name)
    );
    let ips = |r: &Result<hickory_resolver::lookup::Lookup, NetError>| -> Vec<IpAddr> {
        match r {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    let addrs = interleave(ips(&v6), ips(&v4), port);
    if !addrs.is_empty() {
        return Ok(addrs);
    }
    let errors: Vec<&NetError> = [&v6, &v4]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    if errors
        .iter()
        .all(|e| matches!(classify(e), DnsFailure::NoData | DnsFailure::NoSuchName))
    {
        return Err(AddrError::NoAddress);
    }
    let texts: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    Err(AddrError::Failed(texts.join("; ")))
}

fn interleave(v6: Vec<IpAddr>, v4: Vec<IpAddr>, port: u16) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(MAX_ADDRS);
    let (mut a, mut b) = (v6.into_iter(), v4.into_iter());
    while out.len() < MAX_ADDRS {
        match (a.next(), b.next()) {
            (None, None) => break,
            (x, y) => out.extend(x.into_iter().chain(y).map(|ip| SocketAddr::new(ip, port))),
        }
    }
    out.truncate(MAX_ADDRS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(list: &[(u16, &str)]) -> Vec<(u16, String)> {
        list.iter().map(|(p, n)| (*p, n.to_string())).collect()
    }

    #[test]
    fn sorted_by_preference() {
        let got = select(
            "example.org",
            recs(&[
                (20, "b.example.org."),
                (10, "A.example.org."),
                (30, "c.example.org"),
            ]),
            |_| 0,
        )
        .unwrap();
        assert_eq!(
            got.hosts,
            ["a.example.org", "b.example.org", "c.example.org"]
        );
        assert!(!got.implicit);
    }

    #[test]
    fn equal_preferences_are_shuffled_within_their_group() {
        let list = recs(&[(10, "a"), (10, "b"), (10, "c"), (5, "first"), (20, "last")]);
        let mut seen = std::collections::HashSet::new();
        for seed in 0..50usize {
            let mut s = seed;
            let got = select("d", list.clone(), |n| {
                s = s.wrapping_mul(31).wrapping_add(7);
                s % n
            })
            .unwrap()
            .hosts;
            assert_eq!(got[0], "first");
            assert_eq!(got[4], "last");
            let mut mid = got[1..4].to_vec();
            seen.insert(mid.clone());
            mid.sort();
            assert_eq!(mid, ["a", "b", "c"]);
        }
        assert!(seen.len() > 1, "never shuffled");
        // A misbehaving random source cannot index out of the group.
        let got = select("d", list, |_| usize::MAX).unwrap().hosts;
        assert_eq!((got[0].as_str(), got[4].as_str()), ("first", "last"));
    }

    #[test]
    fn at_most_five_without_duplicates() {
        let list = recs(&[
            (1, "a"),
            (2, "a."),
            (3, "b"),
            (4, "c"),
            (5, "d"),
            (6, "e"),
            (7, "f"),
        ]);
        assert_eq!(
            select("d", list, |_| 0).unwrap().hosts,
            ["a", "b", "c", "d", "e"]
        );
    }

    #[test]
    fn implicit_and_null_mx() {
        let got = select("example.org", Vec::new(), |_| 0).unwrap();
        assert_eq!(got.hosts, ["example.org"]);
        assert!(got.implicit);

        let Err(Failure::Permanent(t)) = select("example.org", recs(&[(0, ".")]), |_| 0) else {
            panic!("null MX must fail permanently");
        };
        assert!(t.starts_with("5.1.10 "), "{t}");

        // A "." beside real hosts is only skipped.
        let got = select("example.org", recs(&[(0, "."), (10, "mx")]), |_| 0).unwrap();
        assert_eq!(got.hosts, ["mx"]);
    }

    #[test]
    fn pooled_hosts_go_first_only_within_their_preference() {
        let mut mx = MxHosts {
            hosts: ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
            prefs: vec![10, 10, 10, 20, 20],
            implicit: false,
        };
        prefer_pooled(&mut mx, &["c".to_string(), "e".to_string()]);
        assert_eq!(mx.hosts, ["c", "a", "b", "e", "d"]);
        // A pooled backup never jumps ahead of the primaries.
        let mut mx = MxHosts {
            hosts: ["a", "b"].map(String::from).to_vec(),
            prefs: vec![10, 20],
            implicit: false,
        };
        prefer_pooled(&mut mx, &["b".to_string()]);
        assert_eq!(mx.hosts, ["a", "b"]);
    }

    #[test]
    fn only_nxdomain_and_nodata_are_final() {
        use hickory_resolver::net::NoRecords;
        use hickory_resolver::proto::ProtoError;
        use hickory_resolver::proto::op::Query;
        use hickory_resolver::proto::rr::RecordType;
        use std::sync::Arc;

        let query = || Query::query(Name::from_ascii("example.org.").unwrap(), RecordType::MX);
        let no_records =
            |code| NetError::Dns(DnsError::NoRecordsFound(NoRecords::new(query(), code)));
        assert_eq!(
            classify(&no_records(ResponseCode::NXDomain)),
            DnsFailure::NoSuchName
        );
        assert_eq!(
            classify(&no_records(ResponseCode::NoError)),
            DnsFailure::NoData
        );
        // A referral instead of an answer proves nothing.
        let mut referral = NoRecords::new(query(), ResponseCode::NoError);
        referral.ns = Some(Arc::from(Vec::new()));
        assert_eq!(
            classify(&NetError::Dns(DnsError::NoRecordsFound(referral))),
            DnsFailure::Temporary
        );
        let temporary = [
            NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)),
            NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)),
            NetError::Dns(DnsError::ResponseCode(ResponseCode::FormErr)),
            NetError::Dns(DnsError::ResponseCode(ResponseCode::NotImp)),
            NetError::Dns(DnsError::ResponseCode(ResponseCode::NotAuth)),
            NetError::Dns(DnsError::DnssecBogus),
            NetError::Proto(ProtoError::from("bad label")),
            NetError::Msg("something odd".into()),
            NetError::Message("something odd"),
            NetError::QueryCaseMismatch,
            NetError::Truncated,
            NetError::Timeout,
            NetError::Busy,
            NetError::NoConnections,
            NetError::Io(Arc::new(std::io::Error::other("reset"))),
        ];
        for e in &temporary {
            assert_eq!(classify(e), DnsFailure::Temporary, "{e:?}");
        }
    }

    #[test]
    fn addresses_alternate_families() {
        let v6: Vec<IpAddr> = vec!["::1".parse().unwrap(), "::2".parse().unwrap()];
        let v4: Vec<IpAddr> = (1..=9).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        let got = interleave(v6, v4, 25);
        assert_eq!(got.len(), MAX_ADDRS);
        assert_eq!(got[0].to_string(), "[::1]:25");
        assert_eq!(got[1].to_string(), "10.0.0.1:25");
        assert_eq!(got[2].to_string(), "[::2]:25");
        assert_eq!(got[4].to_string(), "10.0.0.3:25");
    }
}
