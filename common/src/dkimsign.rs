//! Building one `DKIM-Signature` header field (RFC 6376 §3.5, §5): queued
//! signs with it, and `tambo dkim-sign` prints one (feature `dkim`).
//!
//! mail-auth does the relaxed canonicalisation of header fields and body,
//! the part where implementations disagree in subtle ways. The field itself
//! is put together here because mail-auth's `DkimSigner` cannot produce the
//! `h=` REFERENCE §4.9 asks for: it spells names as the message does
//! (REFERENCE: lower-case); it lists every requested name the message lacks
//! (REFERENCE: only the six over-signed names get an entry when absent, so
//! a message without Reply-To has no `reply-to`); it over-signs a present
//! header only when the name is repeated in its list, by a detail of its
//! implementation; and it folds at 76 columns.
//!
//! What is signed, as in chasquid 1.18 (`internal/dkim/sign.go`):
//! - `v=1`, `a=`, `c=relaxed/relaxed`, `d=`, `s=`, `t=` (now), `bh=`, `b=`;
//!   never `x=`, `l=` or `i=`.
//! - `h=`: for each name of [`SIGNED`] in that order, the name once per
//!   instance in the message; then each name of [`OVERSIGNED`] once more.
//!   A verifier matches a name's entries to its instances from the bottom
//!   up (RFC 6376 §5.4.2), so the extra entry matches nothing: a header of
//!   that name added in transit breaks the signature.
//!
//! Differs from chasquid: there, a name's instances are hashed top-down,
//! so a message with two different `To:` fields (or two of any signed
//! name) gets a signature verifiers reject, chasquid's own included. Here
//! they are hashed bottom-up.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::common::headers::{Writable, Writer};
use mail_auth::dkim::Canonicalization;

/// Header fields signed when present, in `h=` order (RFC 6376 §5.4.1's
/// list, plus Message-ID).
const SIGNED: [&str; 20] = [
    "from",
    "reply-to",
    "subject",
    "date",
    "to",
    "cc",
    "resent-date",
    "resent-from",
    "resent-to",
    "resent-cc",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
    "message-id",
];

/// Header fields over-signed: listed once more than they appear, so none
/// can be added after signing.
const OVERSIGNED: [&str; 6] = ["from", "subject", "date", "to", "cc", "message-id"];

const NAME: &str = "DKIM-Signature";

/// How long lines of the field get, in characters (the folding tab counts
/// as one). A `d=` longer than that stays on one line.
const WIDTH: usize = 70;
/// Starts each line with a new tag.
const TAG_INDENT: &str = "\t";
/// Starts a line that continues a tag's value (`h=`, `b=`).
const VALUE_INDENT: &str = "\t  ";

/// A message made ready for signing: what every key of a domain shares.
pub struct Prepared<'a> {
    /// `h=`, in order.
    h: Vec<&'static str>,
    /// The header fields `h=` selects, in `h=` order (absent ones left out).
    signed: Vec<Field<'a>>,
    /// `bh=`: base64 of SHA-256 over the relaxed canonical body.
    bh: String,
}

/// One header field as it is in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field<'a> {
    /// The name, exactly as written (no colon).
    name: &'a [u8],
    /// From after the colon through the CRLF that ends the field,
    /// continuation lines included.
    value: &'a [u8],
}

impl<'a> Prepared<'a> {
    pub fn new(message: &'a [u8]) -> Self {
        let (fields, body) = split(message);
        let (h, signed) = select(&fields);
        let mut hasher = Sha256(ring::digest::Context::new(&ring::digest::SHA256));
        Canonicalization::Relaxed
            .canonical_body(body, 0)
            .write(&mut hasher);
        let bh = BASE64.encode(hasher.0.finish());
        Self { h, signed, bh }
    }

    /// The folded `DKIM-Signature` field, ending in CRLF, for selector `s`
    /// of domain `d` with algorithm `a`. `sign` gets the bytes to sign (RFC
    /// 6376 §3.7: the selected header fields, then this field with `b=`
    /// empty, all relaxed-canonicalised) and returns the signature.
    pub fn field<E>(
        &self,
        d: &str,
        s: &str,
        a: &str,
        t: u64,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<String, E> {
        let mut f = Folder::new(NAME);
        for word in ["v=1;", &format!("a={a};"), "c=relaxed/relaxed;"] {
            f.word(" ", word, TAG_INDENT);
        }
        f.fold(TAG_INDENT);
        for word in [format!("d={d};"), format!("s={s};"), format!("t={t};")] {
            f.word(" ", &word, TAG_INDENT);
        }
        f.fold(TAG_INDENT);
        let last = self.h.len() - 1;
        for (i, name) in self.h.iter().enumerate() {
            let tag = if i == 0 { "h=" } else { "" };
            let end = if i == last { ';' } else { ':' };
            f.word("", &format!("{tag}{name}{end}"), VALUE_INDENT);
        }
        f.fold(TAG_INDENT);
        f.word("", &format!("bh={};", self.bh), TAG_INDENT);
        f.fold(TAG_INDENT);
        f.push("b=");

        // This very field, with b= empty, is signed too: its value with a
        // ";" after "b=", which the final field also has after the value.
        let mut value = f.out.as_bytes()[NAME.len() + 1..].to_vec();
        value.push(b';');
        let mut tbs = Vec::with_capacity(1024);
        Canonicalization::Relaxed
            .canonicalize_headers(self.signed.iter().map(|f| (f.name, f.value)), &mut tbs);
        Canonicalization::Relaxed
            .canonicalize_headers(std::iter::once((NAME.as_bytes(), &value[..])), &mut tbs);
        let signature = sign(&tbs)?;

        f.split(&BASE64.encode(signature), VALUE_INDENT);
        f.push(";\r\n");
        Ok(f.out)
    }
}

/// Splits a message into its header fields and its body. Lines end in CRLF
/// (a bare LF is taken as a line end too). A line that starts with a space
/// or tab continues the field before it; a line without a colon is not a
/// field (and is never signed). Without an empty line the body is empty.
fn split(message: &[u8]) -> (Vec<Field<'_>>, &[u8]) {
    let mut fields = Vec::new();
    // (start, colon) of the field being read.
    let mut current: Option<(usize, usize)> = None;
    let mut close = |current: &mut Option<(usize, usize)>, end: usize| {
        if let Some((start, colon)) = current.take() {
            fields.push(Field {
                name: &message[start..colon],
                value: &message[colon + 1..end],
            });
        }
    };
    let mut pos = 0;
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        if line == b"\r\n" || line == b"\n" {
            close(&mut current, pos);
            return (fields, &message[end..]);
        }
        if !matches!(line[0], b' ' | b'\t') {
            close(&mut current, pos);
            current = line
                .iter()
                .position(|&b| b == b':')
                .map(|colon| (pos, pos + colon));
        }
        pos = end;
    }
    close(&mut current, message.len());
    (fields, &[])
}

/// `h=` and the fields it selects, in the order they are hashed.
fn select<'a>(fields: &[Field<'a>]) -> (Vec<&'static str>, Vec<Field<'a>>) {
    // Each signed name's instances, top to bottom. Names are compared
    // exactly (ASCII case aside), as verifiers do: "Subject " with a space
    // before the colon is not a Subject to them, so it is not signed.
    let mut found: [Vec<Field<'a>>; SIGNED.len()] = Default::default();
    for field in fields {
        if let Some(n) = SIGNED
            .iter()
            .position(|name| field.name.eq_ignore_ascii_case(name.as_bytes()))
        {
            found[n].push(*field);
        }
    }
    let mut h = Vec::new();
    let mut signed = Vec::new();
    for (name, instances) in SIGNED.iter().zip(found) {
        // The k-th entry of a name matches its k-th instance from the
        // bottom (RFC 6376 §5.4.2).
        for field in instances.into_iter().rev() {
            h.push(*name);
            signed.push(field);
        }
    }
    h.extend(OVERSIGNED);
    (h, signed)
}

/// Writes a header field, folding its lines near [`WIDTH`].
struct Folder {
    out: String,
    /// Characters on the current line.
    col: usize,
    /// Whether the current line holds only its indentation.
    fresh: bool,
}

impl Folder {
    fn new(name: &str) -> Self {
        Self {
            out: format!("{name}:"),
            col: name.len() + 1,
            fresh: false,
        }
    }

    /// Ends the line; what follows starts a continuation line.
    fn fold(&mut self, indent: &str) {
        self.out.push_str("\r\n");
        self.out.push_str(indent);
        self.col = indent.len();
        self.fresh = true;
    }

    /// Appends `word` (never split) after `sep`, or at the start of a new
    /// line indented with `indent` when it would go past [`WIDTH`].
    fn word(&mut self, sep: &str, word: &str, indent: &str) {
        if !self.fresh {
            if self.col + sep.len() + word.len() > WIDTH {
                self.fold(indent);
            } else {
                self.push(sep);
            }
        }
        self.push(word);
    }

    /// Appends `text`, split anywhere to fill lines up to [`WIDTH`] (for
    /// base64, where folding whitespace may go between any characters).
    fn split(&mut self, mut text: &str, indent: &str) {
        while !text.is_empty() {
            if self.col >= WIDTH {
                self.fold(indent);
            }
            let (now, rest) = text.split_at((WIDTH - self.col).min(text.len()));
            self.push(now);
            text = rest;
        }
    }

    fn push(&mut self, text: &str) {
        self.out.push_str(text);
        self.col += text.len();
        self.fresh = self.fresh && text.is_empty();
    }
}

/// Feeds mail-auth's canonicalisation output into ring's SHA-256.
struct Sha256(ring::digest::Context);

impl Writer for Sha256 {
    fn write(&mut self, buf: &[u8]) {
        self.0.update(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(fields: &[Field<'_>]) -> Vec<String> {
        fields
            .iter()
            .map(|f| String::from_utf8_lossy(f.name).into_owned())
            .collect()
    }

    #[test]
    fn splits_fields_and_body() {
        let msg = b"From: a@b\r\nSubject: one\r\n two\r\n\tthree\r\nno colon here\r\n \
                    orphan continuation\r\nTo:x\r\n\r\nbody\r\n\r\nmore\r\n";
        let (fields, body) = split(msg);
        assert_eq!(names(&fields), ["From", "Subject", "To"]);
        assert_eq!(fields[1].value, b" one\r\n two\r\n\tthree\r\n");
        assert_eq!(fields[2].value, b"x\r\n");
        assert_eq!(body, b"body\r\n\r\nmore\r\n");
    }

    #[test]
    fn headers_only_message_has_an_empty_body() {
        let (fields, body) = split(b"From: a@b\r\nTo: c@d\r\n");
        assert_eq!(names(&fields), ["From", "To"]);
        assert_eq!(fields[1].value, b" c@d\r\n");
        assert!(body.is_empty());
        let (fields, body) = split(b"\r\nbody only\r\n");
        assert!(fields.is_empty());
        assert_eq!(body, b"body only\r\n");
        assert_eq!(split(b""), (vec![], &b""[..]));
    }

    #[test]
    fn selects_each_instance_bottom_up_then_oversigns() {
        let msg = b"Received: x\r\nTO: first\r\nfrom: me\r\nList-Id: l\r\nTo: second\r\n\
                    X-Other: y\r\nSubject : spaced\r\n\r\n";
        let (fields, _) = split(msg);
        let (h, signed) = select(&fields);
        assert_eq!(
            h.join(":"),
            "from:to:to:list-id:from:subject:date:to:cc:message-id"
        );
        let values: Vec<&[u8]> = signed.iter().map(|f| f.value).collect();
        assert_eq!(
            values,
            [&b" me\r\n"[..], b" second\r\n", b" first\r\n", b" l\r\n"]
        );
    }

    #[test]
    fn folder_keeps_lines_near_the_width() {
        let mut f = Folder::new("X");
        for _ in 0..30 {
            f.word(" ", "abcdefgh;", TAG_INDENT);
        }
        f.fold(TAG_INDENT);
        f.push("b=");
        f.split(&"x".repeat(200), VALUE_INDENT);
        for line in f.out.split("\r\n") {
            assert!(line.len() <= WIDTH, "{line:?}");
        }
        assert!(f.out.contains("\r\n\tb=xxx"));
        assert_eq!(f.out.matches('x').count(), 200);
    }
}
