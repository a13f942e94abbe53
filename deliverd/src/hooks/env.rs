//! The environment a hook runs with: exactly REFERENCE §6's variables,
//! built here from the typed [`HookEnv`]. queued never names a variable,
//! so nothing it relays (a client's EHLO, an address) can set `LD_PRELOAD`
//! or `BASH_ENV`; and nothing of deliverd's own environment leaks beyond
//! the four variables chasquid copies.

use std::ffi::{OsStr, OsString};
use std::sync::LazyLock;

use tambo_proto::deliver::HookEnv;
use tambo_proto::submit::SpfResult;

/// A variable and its value.
pub type Var = (&'static str, OsString);

/// The variables copied from deliverd's own environment, as chasquid
/// does; each is set, empty if deliverd has none.
const COPIED: [&str; 4] = ["USER", "SHELL", "PATH", "PWD"];

/// deliverd's values of [`COPIED`], read once: the environment does not
/// change while deliverd runs.
fn copied() -> Vec<Var> {
    static VARS: LazyLock<Vec<Var>> = LazyLock::new(|| {
        COPIED
            .iter()
            .map(|&k| (k, std::env::var_os(k).unwrap_or_default()))
            .collect()
    });
    VARS.clone()
}

/// alias-resolve and alias-exists: only the copied variables.
pub fn alias() -> Vec<Var> {
    copied()
}

/// post-data: the copied variables and the transaction's.
pub fn post_data(env: &HookEnv) -> Vec<Var> {
    let mut vars = copied();
    let flag = |b: bool| OsString::from(if b { "1" } else { "0" });
    vars.extend([
        ("REMOTE_ADDR", text(&env.remote_addr)),
        ("EHLO_DOMAIN", OsString::from(sanitize_ehlo(&env.ehlo))),
        ("EHLO_DOMAIN_RAW", text(&env.ehlo)),
        // chasquid passes the null sender as `<>`: hooks written for it
        // test for that.
        (
            "MAIL_FROM",
            if env.mail_from.is_empty() {
                OsString::from("<>")
            } else {
                text(&env.mail_from)
            },
        ),
        ("RCPT_TO", text(&env.rcpt_to.join(" "))),
        ("AUTH_AS", text(&env.auth_as)),
        ("ON_TLS", flag(env.on_tls)),
        ("FROM_LOCAL_DOMAIN", flag(env.from_local_domain)),
        ("SPF_PASS", flag(env.spf == Some(SpfResult::Pass))),
    ]);
    vars
}

/// rcpt: post-data's, plus `SPF_RESULT`: the result's name, empty when
/// SPF did not run (the null sender, an authenticated session).
pub fn rcpt(env: &HookEnv) -> Vec<Var> {
    let mut vars = post_data(env);
    let spf = env.spf.map(SpfResult::name).unwrap_or_default();
    vars.push(("SPF_RESULT", OsString::from(spf)));
    vars
}

/// chasquid's sanitizeEHLODomain: only `a-z A-Z 0-9 - . [ ] :`, enough
/// for every domain and address literal, and safe in a shell script.
pub fn sanitize_ehlo(ehlo: &str) -> String {
    ehlo.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(*c))
        .collect()
}

/// A value as the environment can hold it: a NUL would end it early (and
/// makes spawning fail), so NULs are dropped.
fn text(s: &str) -> OsString {
    if s.contains('\0') {
        OsStr::new(&s.replace('\0', "")).to_os_string()
    } else {
        OsString::from(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_is_sanitised_like_chasquid() {
        assert_eq!(sanitize_ehlo("mail.example.com"), "mail.example.com");
        assert_eq!(sanitize_ehlo("[IPv6:2001:db8::1]"), "[IPv6:2001:db8::1]");
        assert_eq!(sanitize_ehlo("a$(rm -rf /);`x`\"b'c\n"), "arm-rfxbc");
        assert_eq!(sanitize_ehlo("bücher.example"), "bcher.example");
    }

    #[test]
    fn nul_bytes_are_dropped() {
        assert_eq!(text("a\0b"), OsString::from("ab"));
    }
}
