//! SPF at MAIL FROM (RFC 7208, REFERENCE §2.6) and the `Received-SPF`
//! header it leaves on the message (§2.8).
//!
//! `check_host(client IP, sender domain, MAIL FROM)`, with the sender
//! domain standing in for the HELO name, as chasquid does. mail-auth
//! evaluates the record; before it, smtpd fetches the sender domain's TXT
//! records itself, because mail-auth takes the first SPF record it finds
//! where RFC 7208 §4.5 says two of them are a `permerror`. The record
//! fetched is handed to mail-auth, so the domain is asked only once.
//!
//! Only `fail` refuses the sender; every other result, errors included, is
//! passed on to queued and the headers. The whole check is bounded in time
//! ([`CHECK_TIMEOUT`]).
//!
//! Everything from the client or the DNS (address, HELO name, explanation)
//! is made safe here before it reaches a reply or a header.

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::hickory_resolver::TokioResolver;
use mail_auth::hickory_resolver::net::{DnsError, NetError};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::hickory_resolver::proto::rr::RData;
use mail_auth::spf::Spf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, Parameters, ResolverCache, Txt};

use tambo_common::address;
use tambo_proto::submit::{SpfReport, SpfResult};

/// How long one SPF check may take, DNS lookups included, before it ends
/// as `temperror`.
///
/// RFC 7208 §4.6.4 suggests allowing at least 20 s. tambo waits less: an
/// SPF error never refuses mail (it only skips the security-level check and
/// says `temperror` in the headers), while every second spent waiting holds
/// the client's MAIL and a session slot, and a dead resolver would hold
/// every session. 10 s is twice the resolver's per-query timeout (5 s), so
/// one lost UDP answer retried still completes, and a healthy DNS answers
/// a whole check in well under a second.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest SPF explanation (`exp=`) put into a reply.
const MAX_EXPLANATION: usize = 200;
/// Longest HELO name put into the header: a domain name is at most 253.
const MAX_HELO: usize = 255;

/// What an SPF check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// What queued and the headers are told.
    pub report: SpfReport,
    /// On `fail`, the domain's own explanation (`exp=`), made safe for a
    /// reply: printable ASCII, bounded.
    pub explanation: Option<String>,
}

/// The SPF checker of a process: mail-auth on the process's resolver.
pub struct SpfChecker {
    auth: MessageAuthenticator,
    timeout: Duration,
}

impl std::fmt::Debug for SpfChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpfChecker")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SpfChecker {
    /// A checker asking `resolver` (see `tambo_common::dns::resolver`),
    /// each check bounded by [`CHECK_TIMEOUT`].
    pub fn new(resolver: TokioResolver) -> Self {
        SpfChecker {
            auth: MessageAuthenticator(resolver),
            timeout: CHECK_TIMEOUT,
        }
    }

    /// Replaces the time bound (tests).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks `sender` (a MAIL FROM address with a domain, as
    /// `command::parse_path` returns it) sent from `client`; `host` is our
    /// name (the `%{r}` macro). Never fails: problems are results.
    pub async fn check(&self, client: IpAddr, sender: &str, host: &str) -> Checked {
        // A v4-mapped v6 address (a dual-stack listener) is the v4 client.
        let client = client.to_canonical();
        let (user, domain) = address::split(sender);
        let Some(ascii) = dns_domain(domain) else {
            // RFC 7208 §4.3: a malformed or single-label domain is `none`.
            return checked(
                domain,
                SpfResult::None,
                "the sender domain is not a valid DNS name".into(),
            );
        };
        let ascii_sender = format!("{user}@{ascii}");
        match tokio::time::timeout(
            self.timeout,
            self.evaluate(client, &ascii_sender, &ascii, host),
        )
        .await
        {
            Ok((result, reason, explanation)) => Checked {
                report: SpfReport {
                    result,
                    domain: domain.to_string(),
                    reason,
                },
                explanation: explanation.map(|e| printable(&e, MAX_EXPLANATION)),
            },
            Err(_) => checked(
                domain,
                SpfResult::TempError,
                format!(
                    "the SPF check of {ascii} took longer than {}s",
                    self.timeout.as_secs()
                ),
            ),
        }
    }

    /// The result, its reason, and on `fail` the explanation.
    async fn evaluate(
        &self,
        client: IpAddr,
        sender: &str,
        domain: &str,
        host: &str,
    ) -> (SpfResult, String, Option<String>) {
        let record = match self.record(domain).await {
            Ok(r) => r,
            Err(Early(result, reason)) => return (result, reason, None),
        };
        let primed = Primed {
            key: fqdn(domain).into_boxed_str(),
            txt: Txt::Spf(Arc::new(record)),
        };
        let params = Parameters::new(SpfParameters::verify_mail_from(
            client, domain, host, sender,
        ))
        .with_txt_cache(&primed);
        let out = self.auth.check_host(params).await;
        let result = from_mail_auth(out.result());
        let explanation = match result {
            SpfResult::Fail => out.explanation().map(str::to_string),
            _ => None,
        };
        (result, reason(result, domain, client), explanation)
    }

    /// The sender domain's one SPF record, parsed; or the result the check
    /// ends with when there is not exactly one valid record.
    async fn record(&self, domain: &str) -> Result<Spf, Early> {
        let lookup = match self.auth.0.txt_lookup(fqdn(domain)).await {
            Ok(l) => l,
            // NXDOMAIN, or no TXT records (RFC 7208 §4.3, §4.5). Any other
            // answer without records (SERVFAIL, REFUSED) is an error.
            Err(NetError::Dns(DnsError::NoRecordsFound(nr)))
                if matches!(
                    nr.response_code,
                    ResponseCode::NoError | ResponseCode::NXDomain
                ) =>
            {
                return Err(Early(
                    SpfResult::None,
                    format!("{domain} has no SPF record"),
                ));
            }
            Err(e) => {
                tracing::debug!("SPF: TXT lookup of {domain} failed: {e}");
                return Err(Early(
                    SpfResult::TempError,
                    format!("DNS error looking up the SPF record of {domain}"),
                ));
            }
        };
        // Bounded by the DNS answer's size.
        let mut spf_records: Vec<Vec<u8>> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(txt.txt_data.iter().flatten().copied().collect()),
                _ => None,
            })
            .filter(|text: &Vec<u8>| is_spf_record(text))
            .collect();
        let record = match spf_records.len() {
            0 => {
                return Err(Early(
                    SpfResult::None,
                    format!("{domain} has no SPF record"),
                ));
            }
            // RFC 7208 §4.5: two or more are the domain's error.
            1 => spf_records.swap_remove(0),
            _ => {
                return Err(Early(
                    SpfResult::PermError,
                    format!("{domain} has more than one SPF record"),
                ));
            }
        };
        let unparseable = |why: &str| {
            Early(
                SpfResult::PermError,
                format!("the SPF record of {domain} does not parse{why}"),
            )
        };
        if let Some(why) = strict_problem(&record) {
            return Err(unparseable(why));
        }
        Spf::parse(&record).map_err(|_| unparseable(""))
    }
}

/// A check that ends before mail-auth runs: its result and reason.
struct Early(SpfResult, String);

fn checked(domain: &str, result: SpfResult, reason: String) -> Checked {
    Checked {
        report: SpfReport {
            result,
            domain: domain.to_string(),
            reason,
        },
        explanation: None,
    }
}

/// RFC 7208 §4.5: an SPF record is a TXT record that starts with exactly
/// `v=spf1` (any case) followed by a space or nothing.
fn is_spf_record(text: &[u8]) -> bool {
    text.get(..6)
        .is_some_and(|v| v.eq_ignore_ascii_case(b"v=spf1"))
        && matches!(text.get(6), None | Some(b' '))
}

/// What RFC 7208 makes a `permerror` in a record but mail-auth's parser
/// lets through: an unknown mechanism (§5; mail-auth ignores it, so a typo
/// such as `include_spf.example.org -all` would end in `fail`), and an
/// `ip4:`/`ip6:` that is not an address (mail-auth reads `300` as `255`).
/// Only the sender domain's own record: included ones are mail-auth's.
fn strict_problem(record: &[u8]) -> Option<&'static str> {
    // mail-auth refuses what is not text.
    let text = std::str::from_utf8(record).ok()?;
    for term in text.split_ascii_whitespace().skip(1) {
        let body = term.strip_prefix(['+', '-', '~', '?']).unwrap_or(term);
        let (name, rest) = body.split_at(body.find([':', '=', '/']).unwrap_or(body.len()));
        // A modifier: unknown ones are ignored (§6).
        if rest.starts_with('=') {
            continue;
        }
        match name.to_ascii_lowercase().as_str() {
            "all" | "include" | "a" | "mx" | "ptr" | "exists" => {}
            v @ ("ip4" | "ip6") => {
                let value = rest.strip_prefix(':').unwrap_or("");
                let (addr, cidr) = match value.split_once('/') {
                    Some((a, c)) => (a, Some(c)),
                    None => (value, None),
                };
                let (addr_ok, max) = if v == "ip4" {
                    (addr.parse::<std::net::Ipv4Addr>().is_ok(), 32)
                } else {
                    (addr.parse::<std::net::Ipv6Addr>().is_ok(), 128)
                };
                let cidr_ok = cidr.is_none_or(|c| c.parse::<u8>().is_ok_and(|c| c <= max));
                if !addr_ok || !cidr_ok {
                    return Some(": a bad ip4 or ip6 address");
                }
            }
            _ => return Some(": an unknown mechanism"),
        }
    }
    None
}

/// The ASCII (A-label) form of a sender domain, if it is a name SPF can
/// look up: at least two labels of letters, digits, `-` or `_`, each 1–63
/// long, 253 in all.
fn dns_domain(domain: &str) -> Option<String> {
    let ascii = idna::domain_to_ascii(domain).ok()?;
    let ascii = ascii.trim_end_matches('.');
    let labels: Vec<&str> = ascii.split('.').collect();
    let ok = ascii.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then(|| ascii.to_ascii_lowercase())
}

/// The key mail-auth's cache is asked with: lower case, a final dot.
fn fqdn(domain: &str) -> String {
    format!("{}.", domain.trim_end_matches('.').to_ascii_lowercase())
}

/// A one-entry TXT cache holding the record smtpd already fetched, so
/// mail-auth evaluates that very record without asking again.
struct Primed {
    key: Box<str>,
    txt: Txt,
}

impl ResolverCache<Box<str>, Txt> for Primed {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let key: &Q = self.key.borrow();
        (key == name).then(|| self.txt.clone())
    }

    fn remove<Q>(&self, _: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    // Other names (include:, redirect=, exp=) are not kept: each check
    // stands alone, and the resolver has its own cache.
    fn insert(&self, _: Box<str>, _: Txt, _: std::time::Instant) {}
}

fn from_mail_auth(r: mail_auth::SpfResult) -> SpfResult {
    match r {
        mail_auth::SpfResult::Pass => SpfResult::Pass,
        mail_auth::SpfResult::Fail => SpfResult::Fail,
        mail_auth::SpfResult::SoftFail => SpfResult::SoftFail,
        mail_auth::SpfResult::Neutral => SpfResult::Neutral,
        mail_auth::SpfResult::TempError => SpfResult::TempError,
        mail_auth::SpfResult::PermError => SpfResult::PermError,
        mail_auth::SpfResult::None => SpfResult::None,
    }
}

/// Why, in words (the comment of RFC 7208 §9.1's examples). Only our own
/// words, the client's IP and the (checked, ASCII) domain.
fn reason(result: SpfResult, domain: &str, client: IpAddr) -> String {
    match result {
        SpfResult::Pass => format!("domain of {domain} designates {client} as permitted sender"),
        SpfResult::Fail => {
            format!("domain of {domain} does not designate {client} as permitted sender")
        }
        // libspf2's words: the domain is moving to a `-all` it does not
        // trust yet.
        SpfResult::SoftFail => format!(
            "transitioning domain of {domain} does not designate {client} as permitted sender"
        ),
        SpfResult::Neutral => {
            format!("{client} is neither permitted nor denied by domain of {domain}")
        }
        SpfResult::None => format!("{domain} has no SPF record"),
        SpfResult::TempError => {
            format!("DNS error while checking the SPF record of {domain}")
        }
        SpfResult::PermError => format!(
            "the SPF policy of {domain} is invalid: a bad include or redirect, or too many DNS lookups"
        ),
    }
}

/// Printable ASCII only (anything else becomes `?`), at most `max`
/// characters, trimmed: safe in a reply line and a header.
pub fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect::<String>()
        .trim()
        .to_string()
}

/// The reply text of a `fail`: `SPF check failed`, and the domain's
/// explanation when it gave one.
pub fn fail_text(c: &Checked) -> String {
    match c.explanation.as_deref().filter(|e| !e.is_empty()) {
        Some(e) => format!("SPF check failed: {e}"),
        None => "SPF check failed".to_string(),
    }
}

/// What the `Received-SPF` header says besides the report.
pub struct HeaderInfo<'a> {
    pub client: IpAddr,
    /// The MAIL FROM address.
    pub sender: &'a str,
    /// The HELO/EHLO name, if one was given.
    pub helo: Option<&'a str>,
    /// Our name on this connection.
    pub receiver: &'a str,
}

/// The `Received-SPF` header (RFC 7208 §9.1), CRLF ended, continuation
/// lines starting with a tab:
///
/// ```text
/// Received-SPF: pass (domain of example.org designates 192.0.2.1 as permitted sender)
///         client-ip=192.0.2.1; envelope-from="ann@example.org"; helo=client.example.org;
///         receiver=mx.example.net; identity=mailfrom
/// ```
///
/// The result first, as chasquid writes it, then the reason as a comment
/// (none when there is no reason), then RFC 7208's key-value pairs.
pub fn received_spf(report: &SpfReport, info: &HeaderInfo<'_>) -> String {
    let mut h = format!("Received-SPF: {}", report.result.name());
    let reason = comment(&report.reason);
    if !reason.is_empty() {
        h.push_str(&format!(" ({reason})"));
    }
    // An IPv6 address is not a dot-atom (RFC 7208 §9.1's grammar): quoted.
    let ip = info.client.to_canonical();
    let ip = if ip.is_ipv6() {
        format!("\"{ip}\"")
    } else {
        ip.to_string()
    };
    h.push_str(&format!(
        "\r\n\tclient-ip={ip}; envelope-from={};",
        quoted(info.sender)
    ));
    if let Some(helo) = info.helo.filter(|h| !h.is_empty()) {
        let helo: String = helo.chars().take(MAX_HELO).collect();
        h.push_str(&format!(" helo={};", atom_or_quoted(&helo)));
    }
    h.push_str(&format!(
        "\r\n\treceiver={}; identity=mailfrom\r\n",
        atom_or_quoted(info.receiver)
    ));
    h
}

/// Text for inside a comment: printable ASCII, with the characters a
/// comment's parser counts or unescapes (`(`, `)`, `\`) quoted, so the
/// comment always ends where we end it.
fn comment(s: &str) -> String {
    let mut out = String::new();
    for c in printable(s, 300).chars() {
        if matches!(c, '(' | ')' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A quoted-string (RFC 5322 §3.2.4): `"` and `\` escaped, control
/// characters dropped (so no line can end inside it). 8-bit text stays:
/// it only comes with SMTPUTF8, whose headers may carry UTF-8.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A dot-atom when `s` is one (a plain host name), else a quoted-string.
fn atom_or_quoted(s: &str) -> String {
    const SPECIAL: &str = "!#$%&'*+-/=?^_`{|}~";
    let dot_atom = !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || SPECIAL.contains(c))
        });
    if dot_atom { s.to_string() } else { quoted(s) }
}

#[cfg(test)]
mod tests;
