//! Networks in CIDR notation (`192.0.2.0/24`, `2001:db8::/32`), for
//! `[tambo] relay_networks`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address prefix. A bare address is a network of one (`/32`, `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the network. An IPv4-mapped IPv6 address
    /// (`::ffff:192.0.2.1`, as a dual-stack socket reports IPv4 clients)
    /// counts as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                masked(u32::from(net).into(), 32, self.prefix)
                    == masked(u32::from(a).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                masked(u128::from(net), 128, self.prefix) == masked(u128::from(a), 128, self.prefix)
            }
            _ => false,
        }
    }
}

/// The top `prefix` bits of a `bits`-bit number.
fn masked(n: u128, bits: u8, prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { n >> (bits - prefix) }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not a network (address/prefix)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {max}")),
            },
        };
        let cidr = Cidr { addr, prefix };
        // `192.0.2.1/24` is almost always a typo for a host or for
        // `192.0.2.0/24`: refuse it rather than guess which.
        let host_bits = match addr {
            IpAddr::V4(v4) => {
                u32::from(v4) as u128
                    & !(u32::MAX.checked_shl(u32::from(max - prefix)).unwrap_or(0)) as u128
            }
            IpAddr::V6(v6) => {
                u128::from(v6) & !(u128::MAX.checked_shl(u32::from(max - prefix)).unwrap_or(0))
            }
        };
        if host_bits != 0 {
            return Err(format!(
                "{s:?} has bits set after its /{prefix} prefix (a network starts at its first address)"
            ));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses() {
        let n: Cidr = "192.168.0.0/16".parse().unwrap();
        assert!(n.contains(ip("192.168.3.4")));
        assert!(n.contains(ip("::ffff:192.168.3.4")));
        assert!(!n.contains(ip("192.169.0.1")));
        assert!(!n.contains(ip("::1")));
        let host: Cidr = "10.1.2.3".parse().unwrap();
        assert!(host.contains(ip("10.1.2.3")) && !host.contains(ip("10.1.2.4")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("192.0.2.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")) && !all.contains(ip("2001:db8::1")));
        assert_eq!(v6.to_string(), "2001:db8::/32");
    }

    #[test]
    fn bad_networks_are_refused() {
        for bad in [
            "",
            "mx.example",
            "192.0.2.0/33",
            "192.0.2.0/-1",
            "192.0.2.0/+8",
            "192.0.2.0/",
            "192.0.2.1/24",
            "2001:db8::/129",
            "2001:db8::1/64",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
