//! AUTH PLAIN/LOGIN decoding never panics, and what it accepts keeps the
//! promises queued relies on: a non-empty identity, a non-empty password
//! without NUL, nothing over the size limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tambo_smtpd::sasl::{self, MAX_DECODED_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = sasl::decode_plain(data) {
        assert!(!c.identity.is_empty() && !c.identity.contains('\0'));
        assert!(!c.password.is_empty() && !c.password.contains(&0));
        assert!(c.identity.len() + c.password.len() + 2 <= MAX_DECODED_LEN);
    }
    if let Ok(line) = sasl::decode_line(data) {
        assert!(line.len() <= MAX_DECODED_LEN);
        // The raw bytes as a LOGIN pair, split anywhere.
        let (user, password) = line.split_at(line.len() / 2);
        if let Ok(c) = sasl::login_credentials(user, password) {
            assert!(!c.password.contains(&0));
        }
    }
});
