//! Delivery status notifications (RFC 3464 inside RFC 6522), sent to the
//! envelope sender when recipients failed or timed out (REFERENCE §3.4).

use crate::item::{Item, Kind, Recipient, Status};

/// How much of the original message goes back with the DSN.
pub const MAX_ORIGINAL: usize = 256 * 1024;

pub struct DsnInput<'a> {
    pub item: &'a Item,
    /// The DSN's own queue ID (used in Message-ID and the boundary).
    pub dsn_id: &'a str,
    pub hostname: &'a str,
    /// Local domain the DSN comes from (see [`our_domain`]).
    pub our_domain: &'a str,
    /// The start of the original message (at most [`MAX_ORIGINAL`]).
    pub original: &'a [u8],
    pub date: &'a str,
}

/// The recipients a DSN reports: failed, or still pending at the deadline.
pub fn failed(item: &Item) -> Vec<&Recipient> {
    item.recipients
        .iter()
        .filter(|r| r.status != Status::Sent)
        .collect()
}

/// Our domain for the DSN: the sender's if local, else the first local
/// domain among the original recipients, else the hostname.
pub fn our_domain(item: &Item, is_local: impl Fn(&str) -> bool, hostname: &str) -> String {
    let domain_of = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_lowercase());
    if let Some(d) = domain_of(&item.from).filter(|d| is_local(d)) {
        return d;
    }
    item.rcpt_to
        .iter()
        .filter_map(|r| domain_of(r))
        .find(|d| is_local(d))
        .unwrap_or_else(|| hostname.to_string())
}

/// Builds the DSN message, CRLF line endings.
pub fn build(input: &DsnInput<'_>) -> Vec<u8> {
    let item = input.item;
    let failed = failed(item);
    let boundary = format!("dsn-boundary-{}", input.dsn_id);
    let report_addr = |r: &Recipient| -> String {
        // Pipes and forwards are reported by the address the sender used,
        // never by the command line.
        match r.kind {
            Kind::Email => r.address.clone(),
            _ => r.original_address.clone(),
        }
    };
    let all_ascii = std::iter::once(item.from.as_str())
        .chain(failed.iter().map(|r| r.original_address.as_str()))
        .chain(failed.iter().map(|r| r.address.as_str()))
        .all(|s| s.is_ascii());
    let addr_type = if all_ascii { "rfc822" } else { "utf-8" };
    let failed_list: Vec<String> = failed.iter().map(|r| report_addr(r)).collect();
    let mut m = String::new();
    let mut h = |line: String| {
        m.push_str(&line);
        m.push_str("\r\n");
    };
    h(format!(
        "From: Mail Delivery System <postmaster-dsn@{}>",
        input.our_domain
    ));
    h(format!("To: <{}>", item.from));
    h("Subject: Mail delivery failed: returning message to sender".into());
    h(format!("Date: {}", input.date));
    h(format!(
        "Message-ID: <dsn-{}@{}>",
        input.dsn_id, input.our_domain
    ));
    if let Some(mid) = message_id(input.original) {
        h(format!("In-Reply-To: {mid}"));
        h(format!("References: {mid}"));
    }
    h("Auto-Submitted: auto-replied".into());
    // One address per line: a long list must not make a line over RFC
    // 5322's 998 octets.
    h(format!(
        "X-Failed-Recipients: {}",
        failed_list.join(",\r\n\t")
    ));
    h("MIME-Version: 1.0".into());
    h(format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""
    ));
    h(String::new());
    h("This is a MIME-encapsulated message.".into());
    h(String::new());
    h(format!("--{boundary}"));
    h("Content-Type: text/plain; charset=utf-8".into());
    h("Content-Transfer-Encoding: 8bit".into());
    h(String::new());
    h(format!(
        "Delivery of your message to the following recipient(s) failed (reported by {}):",
        input.hostname
    ));
    h(String::new());
    for r in &failed {
        let how = if r.status == Status::Failed {
            "failed permanently"
        } else {
            "timed out"
        };
        h(format!("  - {} ({how})", r.original_address));
        h(format!("    {}", one_line(&r.last_failure)));
        h(String::new());
    }
    h(format!("--{boundary}"));
    h(format!(
        "Content-Type: message/{}",
        if all_ascii {
            "delivery-status"
        } else {
            "global-delivery-status"
        }
    ));
    h(String::new());
    h(format!("Reporting-MTA: dns; {}", input.hostname));
    h(String::new());
    for r in &failed {
        h(format!(
            "Original-Recipient: {addr_type}; {}",
            r.original_address
        ));
        h(format!("Final-Recipient: {addr_type}; {}", report_addr(r)));
        h("Action: failed".into());
        let status = enhanced_code(&r.last_failure).unwrap_or(
            if r.status == Status::Failed {
                "5.0.0"
            } else {
                "4.0.0"
            }
            .into(),
        );
        h(format!("Status: {status}"));
        h(format!(
            "Diagnostic-Code: smtp; {}",
            one_line(&r.last_failure)
        ));
        h(String::new());
    }
    h(format!("--{boundary}"));
    h(format!(
        "Content-Type: message/{}",
        if all_ascii { "rfc822" } else { "global" }
    ));
    h(String::new());
    let mut out = m.into_bytes();
    let original = truncate_at_line(input.original, MAX_ORIGINAL);
    out.extend_from_slice(original);
    if !original.is_empty() && !original.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// Reads the start of the original for a DSN: at most [`MAX_ORIGINAL`]
/// bytes, cut after a whole line. One byte more than that is read, so a
/// message longer than the limit is always cut by [`truncate_at_line`].
pub fn read_original(r: impl std::io::Read) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    r.take(MAX_ORIGINAL as u64 + 1).read_to_end(&mut buf)?;
    let keep = truncate_at_line(&buf, MAX_ORIGINAL).len();
    buf.truncate(keep);
    Ok(buf)
}

/// At most `max` bytes of `msg`, cut after the last whole line (CRLF) in
/// them, so a cut never leaves a bare CR (or half a multi-byte character)
/// in the DSN. A message without any CRLF in its first `max` bytes is cut
/// at `max` and its stray CRs dropped.
fn truncate_at_line(msg: &[u8], max: usize) -> &[u8] {
    if msg.len() <= max {
        return msg;
    }
    let head = &msg[..max];
    match head.windows(2).rposition(|w| w == b"\r\n") {
        Some(i) => &head[..i + 2],
        // One enormous line: nothing sensible to keep.
        None => &[],
    }
}

/// Longest header value copied from the original into the DSN.
const MAX_COPIED_HEADER: usize = 256;

/// Longest failure text put on one line of a DSN: with its field name, the
/// line stays under RFC 5322's 998 octets. A remote server's reply can be
/// far longer (many lines, joined).
const MAX_FAILURE_TEXT: usize = 900;

fn one_line(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let s = s.trim();
    if s.is_empty() {
        return "unknown error".into();
    }
    if s.len() <= MAX_FAILURE_TEXT {
        return s.to_string();
    }
    let mut end = MAX_FAILURE_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} [...]", s[..end].trim_end())
}

/// The first RFC 3463 code (`5.1.1`) in a failure text, if any.
fn enhanced_code(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == ':' || c == ',' || c == ';')
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 3
                && matches!(parts[0], "2" | "4" | "5")
                && parts[1..]
                    .iter()
                    .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

/// The original's Message-ID, if its header section has one that looks
/// like one: `<…>`, printable ASCII, at most [`MAX_COPIED_HEADER`] bytes.
/// Anything else is left out rather than copied into our headers.
fn message_id(original: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(original);
    for line in text.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("message-id")
        {
            let v = value.trim();
            let shaped = v.len() <= MAX_COPIED_HEADER
                && v.starts_with('<')
                && v.ends_with('>')
                && v.bytes().all(|b| b.is_ascii_graphic());
            return shaped.then(|| v.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::FORMAT_VERSION;

    fn item() -> Item {
        let rcpt = |addr: &str, kind: Kind, status: Status, fail: &str, orig: &str| Recipient {
            address: addr.into(),
            kind,
            local: true,
            status,
            last_failure: fail.into(),
            permanent: status == Status::Failed,
            original_address: orig.into(),
            uncertain: false,
        };
        Item {
            version: FORMAT_VERSION,
            id: "orig".into(),
            from: "ann@remote.example".into(),
            rcpt_to: vec!["bob@example.org".into(), "list@example.org".into()],
            created_ms: 0,
            client: "1.2.3.4:5".into(),
            recipients: vec![
                rcpt(
                    "bob@example.org",
                    Kind::Email,
                    Status::Failed,
                    "550 5.1.1 no such mailbox",
                    "bob@example.org",
                ),
                rcpt(
                    "/bin/secret --x",
                    Kind::Pipe,
                    Status::Pending,
                    "exit status 75",
                    "list@example.org",
                ),
                rcpt(
                    "ok@example.org",
                    Kind::Email,
                    Status::Sent,
                    "",
                    "ok@example.org",
                ),
            ],
            body_len: None,
            rewritten: false,
        }
    }

    #[test]
    fn dsn_contents() {
        let item = item();
        let original = b"Message-ID: <abc@remote.example>\r\nSubject: hi\r\n\r\nbody\r\n";
        let dsn = build(&DsnInput {
            item: &item,
            dsn_id: "DSNID",
            hostname: "mx.example.org",
            our_domain: "example.org",
            original,
            date: "Tue, 24 Nov 2026 01:00:00 +0000",
        });
        let s = String::from_utf8(dsn).unwrap();
        assert!(s.contains("From: Mail Delivery System <postmaster-dsn@example.org>\r\n"));
        assert!(s.contains("To: <ann@remote.example>\r\n"));
        assert!(s.contains("In-Reply-To: <abc@remote.example>\r\n"));
        assert!(s.contains("Auto-Submitted: auto-replied\r\n"));
        assert!(s.contains("X-Failed-Recipients: bob@example.org,\r\n\tlist@example.org\r\n"));
        assert!(s.contains("Content-Type: message/delivery-status\r\n"));
        assert!(s.contains("Status: 5.1.1\r\n"), "the remote's code is used");
        assert!(s.contains("Status: 4.0.0\r\n"), "timeouts are 4.0.0");
        assert!(
            !s.contains("/bin/secret"),
            "pipe commands never reach the sender"
        );
        assert!(s.contains("Subject: hi\r\n\r\nbody\r\n--dsn-boundary-DSNID--\r\n"));
        assert!(!s.replace("\r\n", "").contains('\n'), "CRLF line ends only");
    }

    #[test]
    fn truncation_never_leaves_a_bare_cr() {
        let item = item();
        // A line ending straddles the cut: CR at the last byte kept, LF
        // just past it.
        let mut original = b"Subject: x\r\n\r\n".to_vec();
        while original.len() < MAX_ORIGINAL - 1 {
            original.extend_from_slice(b"0123456789\r\n");
        }
        original.truncate(MAX_ORIGINAL - 1);
        original.extend_from_slice(b"\r\nmore after the cut\r\n");
        assert_eq!(original[MAX_ORIGINAL - 1], b'\r');
        // As queued reads it from the queue file.
        let read = read_original(&original[..]).unwrap();
        assert!(read.len() <= MAX_ORIGINAL);
        assert!(read.ends_with(b"\r\n"));
        let dsn = build(&DsnInput {
            item: &item,
            dsn_id: "D",
            hostname: "mx",
            our_domain: "example.org",
            original: &read,
            date: "now",
        });
        for (i, w) in dsn.windows(2).enumerate() {
            assert!(w[0] != b'\r' || w[1] == b'\n', "bare CR at {i}");
            assert!(w[1] != b'\n' || w[0] == b'\r', "bare LF at {i}");
        }
        assert!(!dsn.windows(4).any(|w| w == b"more"));
        // A short message is taken whole.
        assert_eq!(read_original(&b"a\r\nb"[..]).unwrap(), b"a\r\nb");
    }

    #[test]
    fn copied_headers_are_bounded() {
        let long = format!("Message-ID: <{}@x>\r\n\r\n", "a".repeat(5000));
        assert_eq!(message_id(long.as_bytes()), None);
        assert_eq!(message_id(b"Message-ID: not-an-id\r\n\r\n"), None);
        assert_eq!(
            message_id(b"Message-ID: <a b@x>\r\n\r\n"),
            None,
            "no spaces inside"
        );
        assert_eq!(
            message_id(b"message-id:  <ok@x>\r\n\r\n").as_deref(),
            Some("<ok@x>")
        );
    }

    #[test]
    fn our_domain_rules() {
        let mut item = item();
        let local = |d: &str| d == "example.org";
        assert_eq!(our_domain(&item, local, "mx"), "example.org");
        item.rcpt_to = vec!["x@other.example".into()];
        assert_eq!(our_domain(&item, local, "mx"), "mx");
        item.from = "me@example.org".into();
        assert_eq!(our_domain(&item, local, "mx"), "example.org");
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(enhanced_code("550 5.1.1 unknown").as_deref(), Some("5.1.1"));
        assert_eq!(enhanced_code("exit status 1"), None);
        assert_eq!(enhanced_code("version 1.2.3"), None);
    }

    #[test]
    fn a_long_failure_text_stays_on_one_short_line() {
        // A remote's many-line reply, joined: 5000 bytes, multi-byte
        // characters at the cut.
        let long = "é".repeat(2500);
        let line = one_line(&long);
        assert!(line.len() <= MAX_FAILURE_TEXT + 6, "{}", line.len());
        assert!(line.ends_with(" [...]"));
        assert_eq!(one_line("  550 short\r\n"), "550 short");
    }
}
