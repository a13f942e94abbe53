//! PROXY header parsing never panics, and keeps the promise the reader
//! relies on: no read it asks for goes past the end of a header it later
//! accepts, and what follows a header never changes how it parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tambo_smtpd::proxy::{self, Step, V1_MAX, V2_MAX_LEN};

fuzz_target!(|data: &[u8]| {
    match proxy::parse(data) {
        Ok(Step::Done(header, len)) => {
            assert!(len <= data.len() && len <= 16 + V2_MAX_LEN);
            if data[0] == b'P' {
                assert!(len <= V1_MAX);
            }
            assert_eq!(proxy::parse(&data[..len]), Ok(Step::Done(header, len)));
            for at in 0..len {
                match proxy::parse(&data[..at]) {
                    Ok(Step::More(n)) => assert!(n >= 1 && at + n <= len),
                    other => panic!("prefix of {at} bytes: {other:?}"),
                }
            }
        }
        Ok(Step::More(n)) => assert!(n >= 1 && data.len() + n <= 16 + V2_MAX_LEN),
        Err(_) => {}
    }
});
