//! A DSN is built from what others control: the original message (its
//! Message-ID is copied), the failure texts remote servers sent, and the
//! addresses of the envelope. Whatever they hold, building never panics
//! and the DSN stays well formed: CRLF lines, none longer than RFC 5322's
//! 998 octets in the parts tambo writes, every header field a field or a
//! folded continuation, and the report closed by its boundary.
#![no_main]
use libfuzzer_sys::fuzz_target;

// queued is a binary crate: its item and DSN modules are compiled in.
#[allow(dead_code)]
#[path = "../../queued/src/dsn.rs"]
mod dsn;
#[allow(dead_code)]
#[path = "../../queued/src/item.rs"]
mod item;

use item::{FORMAT_VERSION, Item, Kind, Recipient, Status};

/// An envelope address as smtpd lets one through: no controls, no spaces,
/// at most 100 characters.
fn address(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && !c.is_whitespace())
        .take(100)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xFF: sender, then (address, failure) pairs,
    // the last field is the original message.
    let mut fields: Vec<&[u8]> = data.split(|b| *b == 0xFF).collect();
    let Some(original) = fields.pop() else { return };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let from = address(&text(fields.first().copied().unwrap_or_default()));
    let mut recipients = Vec::new();
    for (n, pair) in fields.get(1..).unwrap_or_default().chunks(2).enumerate() {
        let addr = address(&text(pair[0]));
        let failure = pair.get(1).map(|f| text(f)).unwrap_or_default();
        recipients.push(Recipient {
            address: addr.clone(),
            kind: if n % 3 == 1 { Kind::Pipe } else { Kind::Email },
            local: n % 2 == 0,
            status: if n % 4 == 3 {
                Status::Sent
            } else if n % 2 == 0 {
                Status::Failed
            } else {
                Status::Pending
            },
            last_failure: failure,
            permanent: n % 2 == 0,
            original_address: addr,
            uncertain: false,
        });
    }
    let item = Item {
        version: FORMAT_VERSION,
        id: "fuzzitem000".into(),
        from,
        rcpt_to: recipients
            .iter()
            .map(|r| r.original_address.clone())
            .collect(),
        created_ms: 0,
        client: "local".into(),
        recipients,
        body_len: None,
        rewritten: false,
    };
    let original = dsn::read_original(original).unwrap();
    let out = dsn::build(&dsn::DsnInput {
        item: &item,
        dsn_id: "fuzzdsn0000",
        hostname: "mx.example.test",
        our_domain: "example.test",
        original: &original,
        date: "Tue, 1 Dec 2026 00:00:00 +0000",
    });
    let boundary = b"--dsn-boundary-fuzzdsn0000";
    assert!(out.ends_with(b"--dsn-boundary-fuzzdsn0000--\r\n"));
    // What tambo wrote: everything before the original (the last part's
    // header and its blank line).
    // Failure texts and addresses cannot hold the boundary's line: each
    // boundary tambo wrote starts a line of its own, three before the
    // original.
    let mut line = b"\r\n".to_vec();
    line.extend_from_slice(boundary);
    line.extend_from_slice(b"\r\n");
    let starts: Vec<usize> = out
        .windows(line.len())
        .enumerate()
        .filter(|(_, w)| *w == line.as_slice())
        .map(|(i, _)| i + 2)
        .collect();
    assert!(starts.len() >= 3, "{starts:?}");
    let part = starts[2];
    let ours = &out[..part];
    let lines: Vec<&[u8]> = ours.split(|b| *b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if i + 1 < lines.len() {
            assert!(line.ends_with(b"\r"), "bare LF in line {i}");
        }
        let body = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(!body.contains(&b'\r'), "bare CR in line {i}");
        assert!(body.len() <= 998, "line {i} is {} octets", body.len());
    }
    // The header section: fields and folded continuations only.
    for line in lines.iter().take_while(|l| **l != b"\r") {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let field = line
            .iter()
            .position(|b| *b == b':')
            .is_some_and(|c| c > 0 && line[..c].iter().all(|b| b.is_ascii_graphic()));
        assert!(
            field || line.starts_with(b"\t") || line.starts_with(b" "),
            "{line:?}"
        );
    }
});
