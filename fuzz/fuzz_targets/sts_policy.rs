//! An MTA-STS policy comes from whoever runs the recipient domain's
//! policy host: parsing and matching it never panics, and what it accepts
//! holds the rules of REFERENCE §4.7.
#![no_main]
use libfuzzer_sys::fuzz_target;

// deliverd is a binary crate: its (self-contained) parser is compiled in.
#[allow(dead_code)]
#[path = "../../deliverd/src/sts/policy.rs"]
mod policy;

fuzz_target!(|data: &[u8]| {
    // The first line doubles as an MX host name to match.
    let host = std::str::from_utf8(data)
        .ok()
        .and_then(|s| s.lines().next())
        .unwrap_or("mx.example.com");
    if let Ok(p) = policy::parse(data) {
        assert!(!p.max_age.is_zero());
        assert!(p.mode == policy::Mode::None || !p.mx.is_empty());
        let _ = p.matches(host);
        let _ = p.matches("mx.example.com");
    }
    let _ = policy::normalize_host(host);
    let _ = policy::excerpt(host);
});
