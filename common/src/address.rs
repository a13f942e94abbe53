//! Email addresses: splitting, and the normal forms used to compare them.
//!
//! Addresses are kept in Unicode internally (domains IDNA→Unicode, NFC,
//! lowercase) and only go to ASCII on the wire when needed.

use std::net::{IpAddr, Ipv6Addr};

use unicode_normalization::UnicodeNormalization;

/// Longest address accepted in MAIL or RCPT (REFERENCE §2.2).
pub const MAX_ADDRESS_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the domain {0:?} is not a valid (IDNA) domain name")]
    BadDomain(String),
    #[error("the user part {0:?} contains characters not allowed in a user name")]
    BadUser(String),
    #[error("the address is empty")]
    Empty,
}

/// Splits at the last `@`. An address without one has an empty domain.
pub fn split(addr: &str) -> (&str, &str) {
    match addr.rfind('@') {
        Some(i) => (&addr[..i], &addr[i + 1..]),
        None => (addr, ""),
    }
}

/// IDNA → Unicode, NFC, lowercase. Used for every domain tambo compares.
pub fn normalize_domain(domain: &str) -> Result<String, AddressError> {
    if domain.is_empty() {
        return Ok(String::new());
    }
    let (unicode, result) = idna::domain_to_unicode(domain);
    if result.is_err() || unicode.is_empty() || unicode.contains(char::is_whitespace) {
        return Err(AddressError::BadDomain(domain.to_string()));
    }
    Ok(unicode.nfc().collect::<String>().to_lowercase())
}

/// The user-part normal form: fullwidth ASCII mapped to ASCII, lowercase,
/// NFC; whitespace and control characters refused.
///
/// This approximates PRECIS UsernameCaseMapped (RFC 8265) for the cases mail
/// sees; the full profile (e.g. all width mappings) is still to come.
pub fn normalize_user(user: &str) -> Result<String, AddressError> {
    if user.is_empty() {
        return Err(AddressError::Empty);
    }
    let mapped: String = user
        .chars()
        .map(|c| match c as u32 {
            // Fullwidth forms of ASCII 0x21..0x7E.
            0xFF01..=0xFF5E => char::from_u32(c as u32 - 0xFF01 + 0x21).unwrap_or(c),
            _ => c,
        })
        .collect();
    if mapped
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '@')
    {
        return Err(AddressError::BadUser(user.to_string()));
    }
    Ok(mapped.to_lowercase().nfc().collect())
}

/// Form-urlencoding (REFERENCE §1.4), as domaininfo files are named:
/// `A-Z a-z 0-9 - _ . ~` kept, every other byte `%XX`.
pub fn form_urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Normalises a whole address: user part and domain.
pub fn normalize(addr: &str) -> Result<String, AddressError> {
    let (user, domain) = split(addr);
    let user = normalize_user(user)?;
    if domain.is_empty() {
        return Ok(user);
    }
    Ok(format!("{user}@{}", normalize_domain(domain)?))
}

/// The clean form of a (normalised) user part: drop characters removed
/// before the first suffix separator, and the suffix cut off
/// (`jo.se+news` → `jose`).
pub fn clean_user(user: &str, drop_characters: &str, suffix_separators: &str) -> String {
    let base = match user.find(|c| suffix_separators.contains(c)) {
        Some(i) => &user[..i],
        None => user,
    };
    base.chars()
        .filter(|c| !drop_characters.contains(*c))
        .collect()
}

/// Removes drop characters before the first suffix separator, keeping the
/// suffix (`jo.se+news` → `jose+news`): the form aliases' left sides take.
pub fn remove_drops(user: &str, drop_characters: &str, suffix_separators: &str) -> String {
    let (base, suffix) = match user.find(|c| suffix_separators.contains(c)) {
        Some(i) => (&user[..i], &user[i..]),
        None => (user, ""),
    };
    let mut out: String = base
        .chars()
        .filter(|c| !drop_characters.contains(*c))
        .collect();
    out.push_str(suffix);
    out
}

/// A light syntax check for envelope addresses: a non-empty local part,
/// no whitespace or control characters, no angle brackets, at most one
/// domain. Full RFC 5321 quoting is accepted as long as it stays on one
/// token.
pub fn is_plausible(addr: &str) -> bool {
    if addr.is_empty() || addr.chars().count() > MAX_ADDRESS_LEN {
        return false;
    }
    if addr
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
    {
        return false;
    }
    let (user, _domain) = split(addr);
    !user.is_empty()
}

/// Whether queued takes `from` as a transaction's sender: `<>`, or a
/// plausible address that normalises and cannot pass for a command-line
/// option (it ends up in logs, MDA arguments and DSN headers). smtpd asks
/// the same to foresee queued's answer to MAIL.
pub fn is_acceptable_sender(from: &str) -> bool {
    from.is_empty() || (is_plausible(from) && normalize(from).is_ok() && !from.starts_with('-'))
}

/// Whether queued's answer to a MAIL is certain to be Ok, so that smtpd
/// may give its 250 without waiting for it: queued refuses a MAIL only on
/// a submission port without AUTH, for an authenticated user's sender,
/// for a sender it does not take ([`is_acceptable_sender`]), and for the
/// incoming security level, which it checks only after an SPF pass.
/// queued's Mail handling must keep to this (its tests check it does).
pub fn mail_answer_is_certain(
    mode: tambo_proto::submit::Mode,
    authenticated: bool,
    from: &str,
    spf: Option<&tambo_proto::submit::SpfReport>,
) -> bool {
    mode == tambo_proto::submit::Mode::Smtp
        && !authenticated
        && is_acceptable_sender(from)
        && spf.is_none_or(|r| r.result != tambo_proto::submit::SpfResult::Pass)
}

/// The address a client is counted under: IPv4 as is (IPv4-mapped IPv6
/// included), IPv6 by its /64, which is what one subscriber usually gets.
/// Every per-client limit (smtpd's session cap, queued's AUTH failure
/// budget) groups clients this way, so an IPv6 host cannot escape one by
/// rotating through its own /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xFFFF_FFFF_FFFF_FFFF_0000_0000_0000_0000,
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_unicode_lowercase() {
        assert_eq!(normalize_domain("Example.ORG").unwrap(), "example.org");
        assert_eq!(
            normalize_domain("xn--bcher-kva.example").unwrap(),
            "bücher.example"
        );
        assert!(normalize_domain("bad domain").is_err());
        assert!(normalize_domain("xn--zz").is_err());
    }

    #[test]
    fn users_are_case_mapped() {
        assert_eq!(normalize_user("Ann").unwrap(), "ann");
        assert_eq!(normalize_user("ＡＮＮ").unwrap(), "ann");
        assert!(normalize_user("a b").is_err());
        assert!(normalize_user("").is_err());
        assert_eq!(normalize("Ann@Example.ORG").unwrap(), "ann@example.org");
    }

    #[test]
    fn clean_forms() {
        assert_eq!(clean_user("jo.se+news", ".", "+"), "jose");
        assert_eq!(clean_user("jo.se+ne.ws", ".", "+"), "jose");
        assert_eq!(remove_drops("jo.se+ne.ws", ".", "+"), "jose+ne.ws");
        assert_eq!(clean_user("a.b", "", ""), "a.b");
    }

    #[test]
    fn clients_are_keyed_by_ipv4_or_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1")),
            client_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn plausible_addresses() {
        assert!(is_plausible("a@b.c"));
        assert!(is_plausible("postmaster"));
        assert!(!is_plausible("a b@c"));
        assert!(!is_plausible("@c"));
        assert!(!is_plausible(&format!("{}@x", "a".repeat(300))));
        // The limit counts characters, not bytes.
        assert!(is_plausible(&format!("{}@example.org", "é".repeat(130))));
    }
}
