//! Send-only sender rewriting (REFERENCE §4.8): when a local alias sends
//! mail from another domain on to a remote address, the envelope sender
//! becomes an address of ours that names the original one, so the next
//! hop's SPF check sees our domain and not a forgery of theirs.
//!
//! Send-only: the rewritten address is an ordinary address with a
//! suffix (`list+fwd_from=ann=elsewhere.example@example.org`), so a bounce
//! to it reaches the alias `list`, not the original sender; there is no
//! hash or timestamp to verify, as in chasquid.

use tambo_common::address;
use tambo_common::domains::Domains;

use crate::item::{Kind, Recipient};

/// The envelope sender for one recipient (REFERENCE §4.8): send-only SRS
/// when mail from another domain leaves again because a local alias sent
/// it on (`list+fwd_from=ann=elsewhere.example@example.org`), so the next
/// hop's SPF check sees our domain; unchanged otherwise. The null sender
/// is never rewritten.
pub fn envelope_sender(from: &str, r: &Recipient, domains: &Domains) -> String {
    let leaves = match r.kind {
        Kind::Forward { .. } => true,
        Kind::Email => !r.local,
        Kind::Pipe => false,
    };
    let is_local = |domain: &str| {
        let d = address::normalize_domain(domain).unwrap_or_else(|_| domain.to_lowercase());
        domains.is_local(&d)
    };
    let (sender_user, sender_domain) = address::split(from);
    if from.is_empty() || !leaves || is_local(sender_domain) {
        return from.to_string();
    }
    let (user, domain) = match r.original_address.rsplit_once('@') {
        Some((u, d)) => (u, d),
        None => return from.to_string(),
    };
    if !is_local(domain) {
        // An authenticated user relaying directly keeps their sender.
        return from.to_string();
    }
    let ascii = idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_string());
    let sender_domain =
        idna::domain_to_ascii(sender_domain).unwrap_or_else(|_| sender_domain.to_lowercase());
    format!(
        "{user}+fwd_from={}={sender_domain}@{ascii}",
        atom(sender_user)
    )
}

/// The sender's local part made fit for the middle of a dot-atom (RFC
/// 5322 §3.2.3): quotes taken off, characters a dot-atom cannot hold
/// (space, `"`, `,`, `@`, `\`, …) and a second dot in a row become `_`.
/// Send-only SRS is never reversed, so this only has to be readable and
/// valid; non-ASCII stays (RFC 6531 allows it; the sender's mail needed
/// SMTPUTF8 already).
fn atom(user: &str) -> String {
    let user = user
        .strip_prefix('"')
        .and_then(|u| u.strip_suffix('"'))
        .unwrap_or(user);
    let mut out = String::with_capacity(user.len());
    for c in user.chars() {
        let ok = !c.is_ascii()
            || c.is_ascii_alphanumeric()
            || "!#$%&'*+-/=?^_`{|}~".contains(c)
            || (c == '.' && !out.ends_with('.'));
        out.push(if ok { c } else { '_' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::Status;

    fn domains() -> Domains {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("domains/example.org")).unwrap();
        std::fs::create_dir_all(dir.path().join("domains/bücher.example")).unwrap();
        std::fs::write(dir.path().join("tambo.conf"), "").unwrap();
        let cfg = tambo_common::config::Config::load(dir.path(), None).unwrap();
        Domains::load(&cfg).unwrap()
    }

    fn rcpt(address: &str, kind: Kind, local: bool, original: &str) -> Recipient {
        Recipient {
            address: address.into(),
            kind,
            local,
            status: Status::Pending,
            last_failure: String::new(),
            permanent: false,
            original_address: original.into(),
            uncertain: false,
        }
    }

    #[test]
    fn forwarded_mail_from_elsewhere_gets_our_sender() {
        let d = domains();
        let remote = rcpt("bob@far.example", Kind::Email, false, "list@example.org");
        assert_eq!(
            envelope_sender("ann@elsewhere.example", &remote, &d),
            "list+fwd_from=ann=elsewhere.example@example.org"
        );
        let via = Kind::Forward {
            via: vec!["smtp.far.example".into()],
        };
        let fwd = rcpt("bob@far.example", via, false, "list@bücher.example");
        assert_eq!(
            envelope_sender("ann@elsewhere.example", &fwd, &d),
            "list+fwd_from=ann=elsewhere.example@xn--bcher-kva.example",
            "the domain part is IDNA-ASCII"
        );
    }

    #[test]
    fn the_rewritten_sender_is_a_valid_ascii_domain_address() {
        let d = domains();
        let remote = rcpt("bob@far.example", Kind::Email, false, "list@EXAMPLE.org");
        assert_eq!(
            envelope_sender("\"a,b  c..d\"@elsewhere.example", &remote, &d),
            "list+fwd_from=a_b__c._d=elsewhere.example@example.org"
        );
        // The sender's domain in its A-label form: no SMTPUTF8 needed.
        assert_eq!(
            envelope_sender("ann@bücher.example", &remote, &d),
            "ann@bücher.example",
            "bücher.example is ours: not rewritten"
        );
        assert_eq!(
            envelope_sender("ann@Ñandú.example", &remote, &d),
            "list+fwd_from=ann=xn--and-6ma2c.example@example.org"
        );
        // The A-label of a local domain is local.
        let remote = rcpt(
            "bob@far.example",
            Kind::Email,
            false,
            "list@xn--bcher-kva.example",
        );
        assert_eq!(
            envelope_sender("ann@elsewhere.example", &remote, &d),
            "list+fwd_from=ann=elsewhere.example@xn--bcher-kva.example"
        );
        assert_eq!(
            envelope_sender("ann@XN--BCHER-KVA.example", &remote, &d),
            "ann@XN--BCHER-KVA.example",
            "a sender of ours, in any spelling, is kept"
        );
    }

    #[test]
    fn other_cases_keep_the_sender() {
        let d = domains();
        let remote = rcpt("bob@far.example", Kind::Email, false, "list@example.org");
        // The null sender, and senders of our own domains.
        assert_eq!(envelope_sender("", &remote, &d), "");
        assert_eq!(
            envelope_sender("ann@example.org", &remote, &d),
            "ann@example.org"
        );
        // An authenticated user relaying directly: the RCPT was remote.
        let direct = rcpt("bob@far.example", Kind::Email, false, "bob@far.example");
        assert_eq!(
            envelope_sender("ann@elsewhere.example", &direct, &d),
            "ann@elsewhere.example"
        );
        // Mail that stays here.
        let local = rcpt("ann@example.org", Kind::Email, true, "list@example.org");
        assert_eq!(
            envelope_sender("x@elsewhere.example", &local, &d),
            "x@elsewhere.example"
        );
        let pipe = rcpt("/bin/true", Kind::Pipe, false, "list@example.org");
        assert_eq!(
            envelope_sender("x@elsewhere.example", &pipe, &d),
            "x@elsewhere.example"
        );
    }
}
