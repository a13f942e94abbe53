//! Alias resolution with the alias-resolve hook: an aliases file anyone
//! with write access to a domain directory wrote, and a hook whose output
//! is whatever the program printed. Whatever they say (loops, catch-alls,
//! pipes, forwards, garbage), resolving an RCPT never panics and always
//! ends, and what comes out is a delivery tambo can make.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tambo_common::aliases::{self, Aliases};
use tambo_common::config::Config;
use tambo_common::domains::{Domain, Domains};
use tambo_common::users::UserDb;

// queued is a binary crate: its item and policy modules are compiled in.
#[allow(dead_code)]
#[path = "../../queued/src/item.rs"]
mod item;
#[allow(dead_code)]
#[path = "../../queued/src/policy.rs"]
mod policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Three parts: the aliases file, the hook's output (for every
    // address), the RCPTs to resolve (one per line).
    let mut parts = text.splitn(3, '\u{1}');
    let (Some(file), Some(hook_out), Some(rcpts)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let cfg = Config::defaults(Path::new("/etc/tambo"));
    let Ok(aliases) = Aliases::parse(file, Path::new("aliases"), "example.test", ".", "+") else {
        return;
    };
    let users = UserDb::parse("ann !\nbob !\n", Path::new("users")).unwrap();
    let domains = Domains::from_parts([("example.test".to_string(), Domain { users, aliases })]);
    let p = policy::Policy { cfg: &cfg, domains: &domains };
    // The hook answers every address with the same output, parsed as
    // queued parses it; an output it refuses counts as no answer.
    let hook = |_: &str| aliases::parse_rhs(hook_out.trim(), "example.test").ok();
    let oracles = policy::Oracles { dovecot: &|_| Some(false), hook: &hook };
    for rcpt in rcpts.lines().take(8) {
        if let Ok(out) = p.resolve_with(rcpt, &oracles) {
            for r in &out {
                assert!(!r.address.is_empty(), "{rcpt}: an empty recipient");
                if r.kind == item::Kind::Email && r.local {
                    // A mailbox: a user part and a domain.
                    let (user, domain) = r.address.rsplit_once('@').unwrap_or((&r.address, ""));
                    assert!(!user.is_empty() && !domain.is_empty(), "{rcpt}: {}", r.address);
                }
                assert_eq!(r.original_address, rcpt);
                assert_eq!(r.status, item::Status::Pending);
            }
        }
    }
});
