//! `domains/<domain>/aliases`, in chasquid's syntax, so existing files work
//! unchanged (REFERENCE §5.2).
//!
//! ```text
//! # comment
//! postmaster: ann
//! sales.team: bob, carol@partner.example
//! archive: | /usr/local/bin/store-copy --folder inbox
//! backup: dave via mx1.backup.example/mx2.backup.example
//! *: ann
//! ```

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::address;
use crate::config::ConfigError;

/// Where an alias sends mail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// An address, which resolution may expand further. A user part of `*`
    /// stands for the original user.
    Email(String),
    /// A command, split on whitespace, that gets the message on stdin.
    Pipe(String),
    /// An address delivered through the listed servers, without MX lookup.
    Forward { address: String, via: Vec<String> },
}

#[derive(Debug, Clone, Default)]
pub struct Aliases {
    /// Left side (drops removed, suffix kept, normalised; `*` = catch-all)
    /// to targets.
    entries: HashMap<String, Vec<Target>>,
}

impl Aliases {
    /// Loads an aliases file; a missing file means no aliases.
    pub fn load(path: &Path, domain: &str, drops: &str, seps: &str) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path, domain, drops, seps),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ConfigError::file(path, format!("cannot read: {e}"))),
        }
    }

    pub fn parse(
        text: &str,
        path: &Path,
        domain: &str,
        drops: &str,
        seps: &str,
    ) -> Result<Self, ConfigError> {
        let mut entries = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |problem: String| ConfigError::line(path, i + 1, problem);
            let (lhs, rhs) = line
                .split_once(':')
                .ok_or_else(|| err("expected `user: target, target…`".into()))?;
            let (lhs, rhs) = (lhs.trim(), rhs.trim());
            if lhs.is_empty() || rhs.is_empty() {
                return Err(err("both sides of `:` must be non-empty".into()));
            }
            if lhs.contains('@') {
                return Err(err(format!(
                    "left side {lhs:?} must be a user without a domain"
                )));
            }
            let key = if lhs == "*" {
                "*".to_string()
            } else {
                address::normalize_user(&address::remove_drops(lhs, drops, seps))
                    .map_err(|e| err(e.to_string()))?
            };
            let targets = parse_rhs(rhs, domain).map_err(err)?;
            // A duplicate left side: the last one wins, as in chasquid.
            entries.insert(key, targets);
        }
        Ok(Self { entries })
    }

    /// The targets of a left-side key (see [`Aliases::entries`]).
    pub fn get(&self, key: &str) -> Option<&[Target]> {
        self.entries.get(key).map(|v| v.as_slice())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Parses the right side of an alias line, giving addresses without a
/// domain `@domain`.
pub fn parse_rhs(rhs: &str, domain: &str) -> Result<Vec<Target>, String> {
    if let Some(cmd) = rhs.strip_prefix('|') {
        let cmd = cmd.trim();
        if cmd.is_empty() {
            return Err("empty pipe command".into());
        }
        return Ok(vec![Target::Pipe(cmd.to_string())]);
    }
    let mut out = Vec::new();
    for item in rhs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((addr, servers)) = item.split_once(" via ") {
            let addr = addr.trim();
            if addr.is_empty() {
                return Err(format!("{item:?}: missing address before `via`"));
            }
            let via: Vec<String> = servers.split('/').map(|s| s.trim().to_string()).collect();
            if via.iter().any(|s| s.is_empty()) {
                return Err(format!("{item:?}: empty server in the `via` list"));
            }
            out.push(Target::Forward {
                address: target_address(addr, domain)?,
                via,
            });
        } else {
            out.push(Target::Email(target_address(item, domain)?));
        }
    }
    Ok(out)
}

fn target_address(item: &str, domain: &str) -> Result<String, String> {
    let full = if item.contains('@') {
        item.to_string()
    } else {
        format!("{item}@{domain}")
    };
    let (user, dom) = address::split(&full);
    if user == "*" {
        let dom = address::normalize_domain(dom).map_err(|e| format!("{item:?}: {e}"))?;
        return Ok(format!("*@{dom}"));
    }
    address::normalize(&full).map_err(|e| format!("{item:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "# role accounts
postmaster: ann
sales.team: bob, carol@partner.example
bob+invoices: accounting
archive: | /usr/local/bin/store-copy --folder inbox
backup: dave via mx1.backup.example/mx2.backup.example
*: ann
";

    fn parse(text: &str) -> Result<Aliases, ConfigError> {
        Aliases::parse(
            text,
            Path::new("domains/example.org/aliases"),
            "example.org",
            ".",
            "+",
        )
    }

    #[test]
    fn reference_example() {
        let a = parse(EXAMPLE).unwrap();
        assert_eq!(
            a.get("postmaster").unwrap(),
            &[Target::Email("ann@example.org".into())]
        );
        assert_eq!(
            a.get("salesteam").unwrap(),
            &[
                Target::Email("bob@example.org".into()),
                Target::Email("carol@partner.example".into())
            ]
        );
        assert!(a.get("bob+invoices").is_some());
        assert_eq!(
            a.get("archive").unwrap(),
            &[Target::Pipe(
                "/usr/local/bin/store-copy --folder inbox".into()
            )]
        );
        assert_eq!(
            a.get("backup").unwrap(),
            &[Target::Forward {
                address: "dave@example.org".into(),
                via: vec!["mx1.backup.example".into(), "mx2.backup.example".into()]
            }]
        );
        assert_eq!(
            a.get("*").unwrap(),
            &[Target::Email("ann@example.org".into())]
        );
    }

    #[test]
    fn star_target_keeps_domain() {
        let a = parse("*: *@other.example\n").unwrap();
        assert_eq!(
            a.get("*").unwrap(),
            &[Target::Email("*@other.example".into())]
        );
    }

    #[test]
    fn errors_name_file_and_line() {
        for (text, line) in [
            ("ok: ann\nno colon here\n", 2),
            (": ann\n", 1),
            ("ann:\n", 1),
            ("a@b: ann\n", 1),
            ("x: |   \n", 1),
            ("x: via mx\n", 1),
            ("x: dave via a//b\n", 1),
            ("x: a b@c\n", 1),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
            assert!(
                e.to_string().starts_with("domains/example.org/aliases:"),
                "{e}"
            );
        }
    }

    #[test]
    fn last_duplicate_wins() {
        let a = parse("x: a\nx: b\n").unwrap();
        assert_eq!(
            a.get("x").unwrap(),
            &[Target::Email("b@example.org".into())]
        );
    }
}
