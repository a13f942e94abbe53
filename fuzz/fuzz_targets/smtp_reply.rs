//! Reply lines come from any server deliverd connects to: parsing them
//! never panics, and what is accepted is a 2xx–5xx code.
#![no_main]
use libfuzzer_sys::fuzz_target;

// deliverd is a binary crate: its (self-contained) parser is compiled in.
#[allow(dead_code)]
#[path = "../../deliverd/src/smtp/reply.rs"]
mod reply;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.split("\r\n") {
        if let Ok(l) = reply::parse_line(line) {
            assert!((200..600).contains(&l.code));
            assert!(l.text.len() < line.len() || line.len() == 3);
        }
    }
});
