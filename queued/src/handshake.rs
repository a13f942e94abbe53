//! What queued agrees to sign for smtpd: only the two inputs a TLS server
//! signs during a handshake. A compromised smtpd can use the key while it
//! is compromised (as in OpenSMTPD), but only to complete TLS handshakes:
//! never to sign a certificate, a DKIM header or anything else.
//!
//! - TLS 1.3 CertificateVerify (RFC 8446 §4.4.3): 64 bytes of 0x20, the
//!   context string "TLS 1.3, server CertificateVerify", a zero byte, and
//!   the transcript hash (SHA-256 or SHA-384).
//! - TLS 1.2 ServerKeyExchange for ECDHE (RFC 8422 §5.4): client random
//!   (32), server random (32), then ServerECDHParams: curve type 3
//!   (named_curve), the curve, the public point's length and the point,
//!   which is exactly as long as the curve's points are.

const TLS13_PREFIX_PAD: usize = 64;
const TLS13_CONTEXT: &[u8] = b"TLS 1.3, server CertificateVerify";

/// Whether `msg` is shaped like a TLS server's handshake signature input.
pub fn is_signature_input(msg: &[u8]) -> bool {
    tls13_certificate_verify(msg) || tls12_server_key_exchange(msg)
}

fn tls13_certificate_verify(msg: &[u8]) -> bool {
    let head = TLS13_PREFIX_PAD + TLS13_CONTEXT.len() + 1;
    if msg.len() != head + 32 && msg.len() != head + 48 {
        return false;
    }
    msg[..TLS13_PREFIX_PAD].iter().all(|b| *b == 0x20)
        && &msg[TLS13_PREFIX_PAD..TLS13_PREFIX_PAD + TLS13_CONTEXT.len()] == TLS13_CONTEXT
        && msg[head - 1] == 0
}

fn tls12_server_key_exchange(msg: &[u8]) -> bool {
    const RANDOMS: usize = 64;
    if msg.len() < RANDOMS + 4 || msg[RANDOMS] != 3 {
        return false;
    }
    let curve = u16::from_be_bytes([msg[RANDOMS + 1], msg[RANDOMS + 2]]);
    let point = msg[RANDOMS + 3] as usize;
    let expected = match curve {
        0x001d => 32,  // x25519
        0x001e => 56,  // x448
        0x0017 => 65,  // secp256r1, uncompressed
        0x0018 => 97,  // secp384r1
        0x0019 => 133, // secp521r1
        _ => return false,
    };
    point == expected && msg.len() == RANDOMS + 4 + point
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A TLS 1.3 CertificateVerify input with a `hash`-byte transcript.
    pub fn tls13_certificate_verify(hash: usize) -> Vec<u8> {
        let mut m = vec![0x20; 64];
        m.extend_from_slice(TLS13_CONTEXT);
        m.push(0);
        m.extend(std::iter::repeat_n(0xAB, hash));
        m
    }

    fn tls12_ske(curve: u16, point: usize) -> Vec<u8> {
        let mut m = vec![7u8; 64];
        m.push(3);
        m.extend_from_slice(&curve.to_be_bytes());
        m.push(point as u8);
        m.extend(std::iter::repeat_n(4, point));
        m
    }

    #[test]
    fn handshake_inputs_pass() {
        assert!(is_signature_input(&tls13_certificate_verify(32)));
        assert!(is_signature_input(&tls13_certificate_verify(48)));
        assert!(is_signature_input(&tls12_ske(0x001d, 32)));
        assert!(is_signature_input(&tls12_ske(0x0017, 65)));
        assert!(is_signature_input(&tls12_ske(0x0018, 97)));
    }

    #[test]
    fn anything_else_is_refused() {
        assert!(!is_signature_input(b""));
        assert!(!is_signature_input(&[0x20; 200]));
        // The client's CertificateVerify context, not the server's.
        let mut client = vec![0x20; 64];
        client.extend_from_slice(b"TLS 1.3, client CertificateVerify\0");
        client.extend([0; 32]);
        assert!(!is_signature_input(&client));
        // A transcript hash of the wrong size.
        assert!(!is_signature_input(&tls13_certificate_verify(20)));
        // Extra bytes after an otherwise valid input.
        let mut long = tls13_certificate_verify(32);
        long.push(0);
        assert!(!is_signature_input(&long));
        // A point that does not fit its curve, an unknown curve, explicit
        // curves, trailing data.
        assert!(!is_signature_input(&tls12_ske(0x001d, 33)));
        assert!(!is_signature_input(&tls12_ske(0x9999, 32)));
        let mut explicit = tls12_ske(0x001d, 32);
        explicit[64] = 1;
        assert!(!is_signature_input(&explicit));
        let mut trailing = tls12_ske(0x0017, 65);
        trailing.push(1);
        assert!(!is_signature_input(&trailing));
        // What a signing oracle is usually abused for.
        assert!(!is_signature_input(
            b"DKIM-Signature: v=1; a=rsa-sha256; d=victim.example"
        ));
    }
}
