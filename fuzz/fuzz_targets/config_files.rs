//! tambo.conf, aliases and users files, and address normalisation never
//! panic on any text.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tambo_common::address;
use tambo_common::aliases::Aliases;
use tambo_common::config::Config;
use tambo_common::users::UserDb;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::from_str(Path::new("/etc/tambo"), Path::new("tambo.conf"), text);
    let _ = Aliases::parse(text, Path::new("aliases"), "example.org", ".", "+");
    let _ = UserDb::parse(text, Path::new("users"));
    let _ = address::normalize(text);
    let _ = address::clean_user(text, ".", "+");
});
