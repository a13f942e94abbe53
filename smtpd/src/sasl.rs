//! SASL PLAIN (RFC 4616) and LOGIN responses: decoding only (REFERENCE §2.5).
//!
//! smtpd carries the exchange and never judges a password: it turns the
//! client's base64 into an identity and a password and hands both to queued,
//! which normalises the identity and checks the users file. So nothing here
//! normalises, looks anything up or logs; the functions are pure, and the
//! session maps their errors to replies:
//!
//! - [`SaslError::Malformed`] → `501 5.5.2` (cannot decode);
//! - [`SaslError::Cancelled`] (a `*` line, RFC 4954 §4) → `501 5.0.0`.
//!
//! AUTH LOGIN is the same exchange split over two prompts,
//! [`LOGIN_USERNAME_PROMPT`] then [`LOGIN_PASSWORD_PROMPT`]; each answer
//! goes through [`decode_line`], and [`login_credentials`] applies the same
//! rules as PLAIN to the pair.

use std::fmt;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// Longest decoded response accepted, in bytes. RFC 4616 §2 asks servers
/// to take IDs and a password of up to 255 octets each, i.e. 767 bytes with
/// the two NULs; 1 KiB covers that and keeps what a client can make smtpd
/// allocate, and queued hash, small. (A 1000-byte command line carries
/// at most 750 decoded bytes, so this only binds if lines grow.)
pub const MAX_DECODED_LEN: usize = 1024;

/// Longest base64 text that can decode to [`MAX_DECODED_LEN`] bytes;
/// anything longer is refused before decoding allocates.
const MAX_ENCODED_LEN: usize = MAX_DECODED_LEN.div_ceil(3) * 4;

/// The AUTH LOGIN prompts: base64 of `Username:` and `Password:`, sent as
/// `334 <prompt>`.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// Standard alphabet; padding optional. RFC 4954 wants padded base64, but
/// some clients drop the `=`s, and accepting them costs nothing: the
/// alphabet and the trailing bits are still checked strictly.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// Not base64, too long, or not a well-formed response. Deliberately
    /// carries no detail: the text is the client's secret material.
    #[error("the AUTH response cannot be decoded")]
    Malformed,
    /// The client sent `*` instead of a response.
    #[error("the client cancelled AUTH")]
    Cancelled,
}

/// What the client presented. `identity` is as given (the authcid, or the
/// authzid when the authcid is empty): queued splits and normalises it.
pub struct Credentials {
    pub identity: String,
    pub password: Vec<u8>,
}

/// By hand, so that a `{:?}` in a log or a test failure never prints the
/// password.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Decodes an AUTH PLAIN response, from the AUTH line or from the line
/// read after an empty `334` challenge: base64 of
/// `authzid NUL authcid NUL password`.
///
/// Exactly three parts: a NUL inside the password, which RFC 4616 forbids,
/// makes four and is refused rather than silently kept. If both IDs are
/// present they must be byte-for-byte equal (tambo has no proxy
/// authorisation); the identity is whichever is non-empty, and it must be
/// UTF-8. An empty identity or password is refused (RFC 4616: `1*SAFE`).
/// The password is opaque bytes: it is only ever hashed.
pub fn decode_plain(b64: &[u8]) -> Result<Credentials, SaslError> {
    let decoded = decode_line(b64)?;
    let mut parts = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    if !authzid.is_empty() && !authcid.is_empty() && authzid != authcid {
        return Err(SaslError::Malformed);
    }
    let identity = if authcid.is_empty() { authzid } else { authcid };
    credentials(identity, password)
}

/// Decodes one client line of base64: an AUTH LOGIN answer (or any SASL
/// continuation). Surrounding spaces, tabs and CR/LF are ignored; `*`
/// cancels; `=` and an empty line decode to nothing (RFC 4954's
/// zero-length response). Longer than [`MAX_DECODED_LEN`] once decoded,
/// or not base64 → [`SaslError::Malformed`].
pub fn decode_line(b64: &[u8]) -> Result<Vec<u8>, SaslError> {
    let text = b64.trim_ascii();
    match text {
        b"*" => return Err(SaslError::Cancelled),
        b"=" => return Ok(Vec::new()),
        _ => {}
    }
    if text.len() > MAX_ENCODED_LEN {
        return Err(SaslError::Malformed);
    }
    let decoded = BASE64.decode(text).map_err(|_| SaslError::Malformed)?;
    if decoded.len() > MAX_DECODED_LEN {
        return Err(SaslError::Malformed);
    }
    Ok(decoded)
}

/// The two decoded AUTH LOGIN answers as [`Credentials`], under PLAIN's
/// rules: a non-empty UTF-8 user, a non-empty password, no NUL in either.
pub fn login_credentials(user: &[u8], password: &[u8]) -> Result<Credentials, SaslError> {
    if user.contains(&0) {
        return Err(SaslError::Malformed);
    }
    credentials(user, password)
}

fn credentials(identity: &[u8], password: &[u8]) -> Result<Credentials, SaslError> {
    if identity.is_empty() || password.is_empty() || password.contains(&0) {
        return Err(SaslError::Malformed);
    }
    let identity = std::str::from_utf8(identity).map_err(|_| SaslError::Malformed)?;
    Ok(Credentials {
        identity: identity.to_string(),
        password: password.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

    fn b64(raw: &[u8]) -> Vec<u8> {
        STANDARD.encode(raw).into_bytes()
    }

    fn plain(raw: &[u8]) -> Result<Credentials, SaslError> {
        decode_plain(&b64(raw))
    }

    #[track_caller]
    fn assert_creds(r: Result<Credentials, SaslError>, identity: &str, password: &[u8]) {
        let c = r.expect("credentials");
        assert_eq!(c.identity, identity);
        assert_eq!(c.password, password);
    }

    #[test]
    fn plain_without_authzid() {
        assert_creds(
            plain(b"\0ann@example.org\0s3cret"),
            "ann@example.org",
            b"s3cret",
        );
    }

    #[test]
    fn plain_with_matching_authzid() {
        assert_creds(
            plain(b"ann@example.org\0ann@example.org\0s3cret"),
            "ann@example.org",
            b"s3cret",
        );
    }

    #[test]
    fn plain_with_authzid_only() {
        // Some clients put the identity in the authzid and leave the authcid
        // empty; the non-empty one is the identity.
        assert_creds(plain(b"ann\0\0pw"), "ann", b"pw");
    }

    #[test]
    fn plain_identity_is_kept_as_given() {
        // Normalisation is queued's job.
        assert_creds(plain(b"\0Ann@Example.ORG\0pw"), "Ann@Example.ORG", b"pw");
        assert_creds(
            plain("\0ñandú@ejemplo.ar\0pw".as_bytes()),
            "ñandú@ejemplo.ar",
            b"pw",
        );
    }

    #[test]
    fn plain_mismatching_authzid() {
        assert_eq!(
            plain(b"bob@example.org\0ann@example.org\0pw").unwrap_err(),
            SaslError::Malformed
        );
        // Byte-for-byte: case differences are a mismatch too.
        assert_eq!(
            plain(b"Ann@example.org\0ann@example.org\0pw").unwrap_err(),
            SaslError::Malformed
        );
    }

    #[test]
    fn plain_empty_identity_or_password() {
        assert_eq!(plain(b"\0\0pw").unwrap_err(), SaslError::Malformed);
        assert_eq!(plain(b"\0ann\0").unwrap_err(), SaslError::Malformed);
        assert_eq!(plain(b"\0\0").unwrap_err(), SaslError::Malformed);
    }

    #[test]
    fn plain_needs_exactly_three_parts() {
        for raw in [
            &b""[..],
            b"ann",
            b"ann\0pw",
            b"\0ann\0pw\0",
            b"\0ann\0pw\0more",
            b"\0\0\0",
        ] {
            assert_eq!(plain(raw).unwrap_err(), SaslError::Malformed, "{raw:?}");
        }
        // The empty response (`=`) has one part.
        assert_eq!(decode_plain(b"=").unwrap_err(), SaslError::Malformed);
    }

    #[test]
    fn plain_refuses_nul_in_password() {
        // RFC 4616 forbids NUL anywhere in the password; the four-part
        // split catches it instead of keeping `p\0w` as the password.
        assert_eq!(plain(b"\0ann\0p\0w").unwrap_err(), SaslError::Malformed);
    }

    #[test]
    fn plain_password_is_opaque_bytes() {
        assert_creds(
            plain(b"\0ann\0\xff\xfe pw \x01"),
            "ann",
            b"\xff\xfe pw \x01",
        );
    }

    #[test]
    fn plain_refuses_non_utf8_identity() {
        assert_eq!(plain(b"\0ann\xff\0pw").unwrap_err(), SaslError::Malformed);
        assert_eq!(plain(b"\xc3\0\0pw").unwrap_err(), SaslError::Malformed);
    }

    #[test]
    fn bad_base64() {
        for text in [
            &b"!!!!"[..],
            b"AGFubgBwdw=x",
            b"AGFu bgBwdw==",
            b"AGFubgBwdw===",
            // `AGFubgBwdx==`: non-zero trailing bits, not canonical.
            b"AGFubgBwdx==",
            b"A",
        ] {
            assert_eq!(
                decode_plain(text).unwrap_err(),
                SaslError::Malformed,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn padding_is_optional() {
        let raw = b"\0ann\0pw";
        assert_creds(decode_plain(&b64(raw)), "ann", b"pw");
        assert_creds(
            decode_plain(STANDARD_NO_PAD.encode(raw).as_bytes()),
            "ann",
            b"pw",
        );
    }

    #[test]
    fn surrounding_whitespace_is_trimmed() {
        let mut line = b"  ".to_vec();
        line.extend(b64(b"\0ann\0pw"));
        line.extend(b" \t\r\n");
        assert_creds(decode_plain(&line), "ann", b"pw");
        assert_eq!(decode_line(b"dXNlcg==\r\n").unwrap(), b"user");
        assert_eq!(decode_line(b"dXNlcg== \n").unwrap(), b"user");
        assert_eq!(decode_line(b"*\r\n").unwrap_err(), SaslError::Cancelled);
    }

    #[test]
    fn length_limit() {
        // Exactly at the limit: accepted.
        let mut raw = b"\0ann\0".to_vec();
        raw.resize(MAX_DECODED_LEN, b'x');
        let c = plain(&raw).unwrap();
        assert_eq!(c.password.len(), MAX_DECODED_LEN - 5);
        // One byte over: refused, padded or not.
        raw.push(b'x');
        assert_eq!(plain(&raw).unwrap_err(), SaslError::Malformed);
        assert_eq!(
            decode_plain(STANDARD_NO_PAD.encode(&raw).as_bytes()).unwrap_err(),
            SaslError::Malformed
        );
        // Huge input is refused before decoding.
        let huge = vec![b'A'; 1 << 20];
        assert_eq!(decode_line(&huge).unwrap_err(), SaslError::Malformed);
        // 1368 characters pass the cheap check but decode to 1026 bytes.
        assert_eq!(
            decode_line(&vec![b'A'; MAX_ENCODED_LEN]).unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(decode_line(&vec![b'A'; 1364]).unwrap().len(), 1023);
    }

    #[test]
    fn cancel() {
        assert_eq!(decode_line(b"*").unwrap_err(), SaslError::Cancelled);
        assert_eq!(decode_plain(b"*").unwrap_err(), SaslError::Cancelled);
        // Only a lone `*` cancels.
        assert_eq!(decode_line(b"**").unwrap_err(), SaslError::Malformed);
        assert_eq!(decode_line(b"*x").unwrap_err(), SaslError::Malformed);
    }

    #[test]
    fn login_prompts() {
        assert_eq!(
            STANDARD.decode(LOGIN_USERNAME_PROMPT).unwrap(),
            b"Username:"
        );
        assert_eq!(
            STANDARD.decode(LOGIN_PASSWORD_PROMPT).unwrap(),
            b"Password:"
        );
    }

    #[test]
    fn login_exchange() {
        let user = decode_line(&b64(b"ann@example.org")).unwrap();
        let password = decode_line(&b64(b"s3cret")).unwrap();
        assert_creds(
            login_credentials(&user, &password),
            "ann@example.org",
            b"s3cret",
        );
    }

    #[test]
    fn login_empty_lines() {
        assert_eq!(decode_line(b"").unwrap(), b"");
        assert_eq!(decode_line(b"=").unwrap(), b"");
        assert_eq!(decode_line(b"\r\n").unwrap(), b"");
        assert_eq!(
            login_credentials(b"", b"pw").unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(
            login_credentials(b"ann", b"").unwrap_err(),
            SaslError::Malformed
        );
    }

    #[test]
    fn login_refuses_nul_and_non_utf8() {
        assert_eq!(
            login_credentials(b"ann\0bob", b"pw").unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(
            login_credentials(b"ann", b"p\0w").unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(
            login_credentials(b"ann\xff", b"pw").unwrap_err(),
            SaslError::Malformed
        );
    }

    #[test]
    fn debug_redacts_the_password() {
        let c = plain(b"\0ann\0hunter2").unwrap();
        let shown = format!("{c:?} {c:#?}");
        assert!(shown.contains("ann"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("104, 117"), "{shown}"); // b"hu" as bytes
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn errors_carry_no_client_text() {
        assert_eq!(
            SaslError::Malformed.to_string(),
            "the AUTH response cannot be decoded"
        );
        assert_eq!(
            SaslError::Cancelled.to_string(),
            "the client cancelled AUTH"
        );
    }
}
