//! Every IPC message type must decode any bytes without panicking, and what
//! decodes must re-encode to something that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tambo_proto::deliver::{FromDeliverd, ToDeliverd};
use tambo_proto::frame::{decode, encode};
use tambo_proto::hello::Hello;
use tambo_proto::monitor::MonitorMessage;
use tambo_proto::submit::{SubmitReply, SubmitRequest};

fn check<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    data: &[u8],
) {
    if let Ok(msg) = decode::<T>(data) {
        let bytes = encode(&msg).expect("a decoded message re-encodes");
        let again: T = decode(&bytes[4..]).expect("and decodes again");
        assert_eq!(again, msg);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<Hello>(data);
    check::<SubmitRequest>(data);
    check::<SubmitReply>(data);
    check::<ToDeliverd>(data);
    check::<FromDeliverd>(data);
    check::<MonitorMessage>(data);
});
