//! The header-section check reads a message as DATA brings it, in pieces
//! cut anywhere: whatever the cuts, it says the same as for the message
//! whole, and never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tambo_smtpd::headers::HeaderScan;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, msg)) = data.split_first() else {
        return;
    };
    let mut whole = HeaderScan::default();
    whole.scan(msg);
    let mut pieces = HeaderScan::default();
    for piece in msg.chunks(usize::from(cut % 16) + 1) {
        pieces.scan(piece);
    }
    assert_eq!(whole.error(), pieces.error());
    assert_eq!(whole.received(), pieces.received());
    assert_eq!(whole.finished(), pieces.finished());
});
