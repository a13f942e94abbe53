//! The `Received:` header smtpd puts on top of every message
//! (RFC 5321 §4.4, REFERENCE §2.8). It never names the recipients, so it
//! cannot leak a BCC.

use std::net::{IpAddr, SocketAddr};

use tambo_proto::submit::Mode;

pub struct ReceivedInfo<'a> {
    pub ehlo: &'a str,
    pub esmtp: bool,
    pub client: SocketAddr,
    pub hostname: &'a str,
    pub mode: Mode,
    pub from: &'a str,
    /// On TLS: the version (`TLS-1.3`) and the IANA cipher suite name.
    pub tls: Option<(&'a str, &'a str)>,
    /// The session authenticated: its IP is not shown.
    pub authenticated: bool,
}

/// Builds the header, CRLF line ends, continuation lines starting with a
/// tab, dated now in local time.
pub fn header(info: &ReceivedInfo<'_>) -> String {
    let date = chrono::Local::now().format("%a, %d %b %Y %H:%M:%S %z");
    header_at(info, &date.to_string())
}

fn header_at(info: &ReceivedInfo<'_>, date: &str) -> String {
    let ip = match info.client.ip() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPv6:{v6}"),
        },
    };
    // RFC 3848: ESMTP, + S on TLS, + A when authenticated.
    let mut with = String::from(if info.esmtp { "ESMTP" } else { "SMTP" });
    if info.tls.is_some() {
        with.push('S');
    }
    if info.authenticated {
        with.push('A');
    }
    let mode = match info.mode {
        Mode::Smtp => "SMTP",
        Mode::Submission => "submission",
        Mode::SubmissionTls => "submission+TLS",
    };
    // An authenticated client's address is nobody else's business.
    let from = if info.authenticated {
        sanitize(info.ehlo)
    } else {
        format!("{} ([{ip}])", sanitize(info.ehlo))
    };
    let (cipher, transport) = match info.tls {
        // RFC 8314 §4.3: the cipher suite after `with`.
        Some((version, cipher)) => (format!(" tls {cipher}"), version.to_string()),
        None => (String::new(), "plain text".to_string()),
    };
    format!(
        "Received: from {from}\r\n\tby {host} (tambo) with {with}{cipher}\r\n\t(over {mode}, {transport}, envelope from \"{sender}\")\r\n\t; {date}\r\n",
        host = info.hostname,
        sender = quote(info.from),
    )
}

/// Keeps an EHLO name to the characters a host name or address literal can
/// hold, so a client cannot inject header syntax.
fn sanitize(s: &str) -> String {
    let out: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-.[]:_".contains(*c))
        .take(255)
        .collect();
    if out.is_empty() {
        "unknown".into()
    } else {
        out
    }
}

/// Quotes the sender for the quoted string inside the header's comment:
/// `"` and `\\` for the quoted string, and `(` and `)` too, since a
/// comment's parser counts them (RFC 5322 §3.2.2) and an unbalanced one
/// would end the comment early.
fn quote(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .flat_map(|c| match c {
            '"' | '\\' | '(' | ')' => vec!['\\', c],
            _ => vec![c],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_shape() {
        let info = ReceivedInfo {
            ehlo: "client.test",
            esmtp: true,
            client: "127.0.0.1:40000".parse().unwrap(),
            hostname: "mx.example.org",
            mode: Mode::Smtp,
            from: "ann@example.org",
            tls: None,
            authenticated: false,
        };
        assert_eq!(
            header_at(&info, "Tue, 24 Nov 2026 01:00:00 +0000"),
            "Received: from client.test ([127.0.0.1])\r\n\tby mx.example.org (tambo) with ESMTP\r\n\t(over SMTP, plain text, envelope from \"ann@example.org\")\r\n\t; Tue, 24 Nov 2026 01:00:00 +0000\r\n"
        );
    }

    #[test]
    fn tls_and_authentication_show() {
        let info = ReceivedInfo {
            ehlo: "laptop",
            esmtp: true,
            client: "192.0.2.8:5000".parse().unwrap(),
            hostname: "mx.example.org",
            mode: Mode::SubmissionTls,
            from: "ann@example.org",
            tls: Some(("TLS-1.3", "TLS13_AES_256_GCM_SHA384")),
            authenticated: true,
        };
        assert_eq!(
            header_at(&info, "now"),
            "Received: from laptop\r\n\tby mx.example.org (tambo) with ESMTPSA tls TLS13_AES_256_GCM_SHA384\r\n\t(over submission+TLS, TLS-1.3, envelope from \"ann@example.org\")\r\n\t; now\r\n"
        );
    }

    #[test]
    fn hostile_values_are_neutralised() {
        let info = ReceivedInfo {
            ehlo: "evil\r\nX-Injected: 1",
            esmtp: false,
            client: "[::1]:25".parse().unwrap(),
            hostname: "mx",
            mode: Mode::Smtp,
            from: "a\"b\r\n@c",
            tls: None,
            authenticated: false,
        };
        let h = header(&info);
        assert!(
            h.starts_with("Received: from evilX-Injected:1 ([IPv6:::1])"),
            "{h}"
        );
        assert!(h.contains("envelope from \"a\\\"b@c\""), "{h}");
        assert_eq!(h.matches("\r\n").count(), 4);
    }

    #[test]
    fn comment_characters_are_quoted() {
        let info = ReceivedInfo {
            ehlo: "c",
            esmtp: true,
            client: "127.0.0.1:1".parse().unwrap(),
            hostname: "mx",
            mode: Mode::Smtp,
            from: "\"a)b(c\\\"@d",
            tls: None,
            authenticated: false,
        };
        let h = header_at(&info, "now");
        assert!(
            h.contains("envelope from \"\\\"a\\)b\\(c\\\\\\\"@d\")"),
            "{h}"
        );
        // Every parenthesis in the comment is balanced or quoted.
        let comment = &h[h.find("(over").unwrap()..h.find("\r\n\t;").unwrap()];
        let mut depth = 0i32;
        let mut chars = comment.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "{comment}");
        }
        assert_eq!(depth, 0, "{comment}");
    }
}
