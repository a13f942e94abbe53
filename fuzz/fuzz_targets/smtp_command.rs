//! Command-line parsing never panics on any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tambo_smtpd::command;

fuzz_target!(|data: &[u8]| {
    let cmd = command::parse(data);
    let _ = command::metric_label(&cmd);
    let _ = command::parse_path(cmd.arg, "FROM:");
    let _ = command::parse_path(data, "TO:");
});
