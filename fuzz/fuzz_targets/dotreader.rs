//! The DATA decoder never panics, gives the same result however the input
//! is split, and its size counter matches what it produced.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tambo_smtpd::dotreader::{DotDecoder, Progress};

fn run(data: &[u8], split: usize) -> (Vec<u8>, Option<usize>, bool) {
    let mut d = DotDecoder::new();
    let mut out = Vec::new();
    let mut offset = 0;
    for part in [&data[..split], &data[split..]] {
        match d.feed(part, &mut out) {
            Ok(Progress::More) => offset += part.len(),
            Ok(Progress::End(n)) => {
                assert_eq!(d.size(), out.len() as u64);
                return (out, Some(offset + n), false);
            }
            Err(_) => return (out, None, true),
        }
    }
    assert_eq!(d.size(), out.len() as u64);
    (out, None, false)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize % data.len();
    let whole = run(data, data.len());
    let parts = run(data, split);
    assert_eq!(whole.1, parts.1);
    assert_eq!(whole.2, parts.2);
    if whole.1.is_some() {
        assert_eq!(whole.0, parts.0);
        // Output never contains a bare LF or CR.
        let out = &whole.0;
        for (i, &b) in out.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && out[i - 1] == b'\r');
            }
        }
    }
});
