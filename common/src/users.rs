//! `domains/<domain>/users`: one `user <PHC hash>` per line.
//!
//! The hash is a PHC string (`$scrypt$…` or `$argon2id$…`); `user !` marks a
//! receive-only user, who gets mail but never authenticates. Blank lines and
//! lines starting with `#` are ignored.

use std::collections::HashMap;
use std::path::Path;

use crate::address;
use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A PHC password hash, checked syntactically at load time.
    Hash(String),
    /// Receives mail, never authenticates.
    ReceiveOnly,
}

#[derive(Debug, Clone, Default)]
pub struct UserDb {
    users: HashMap<String, Credential>,
}

impl UserDb {
    /// Loads a users file; a missing file is an empty database.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ConfigError::file(path, format!("cannot read: {e}"))),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |problem: String| ConfigError::line(path, i + 1, problem);
            let (name, cred) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| err("expected `user <PHC hash>` or `user !`".into()))?;
            let name = address::normalize_user(name).map_err(|e| err(e.to_string()))?;
            let cred = cred.trim();
            let cred = if cred == "!" {
                Credential::ReceiveOnly
            } else {
                let phc = password_hash::PasswordHash::new(cred).map_err(|e| {
                    err(format!(
                        "password hash for {name:?} is not a PHC string: {e}"
                    ))
                })?;
                match phc.algorithm.as_str() {
                    "scrypt" | "argon2id" | "argon2i" | "argon2d" => {}
                    other => {
                        return Err(err(format!(
                            "password hash for {name:?} uses {other:?}; only scrypt and argon2 are supported"
                        )));
                    }
                }
                check_cost(&phc).map_err(|e| err(format!("password hash for {name:?}: {e}")))?;
                Credential::Hash(cred.to_string())
            };
            users.insert(name, cred);
        }
        Ok(Self { users })
    }

    /// Whether `user` (already normalised) exists.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn get(&self, user: &str) -> Option<&Credential> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// The hash of some user who has one: checking a password against it
    /// costs what checking a real user's does (for answers about users who
    /// have no hash).
    pub fn any_hash(&self) -> Option<&str> {
        self.users.values().find_map(|c| match c {
            Credential::Hash(h) => Some(h.as_str()),
            Credential::ReceiveOnly => None,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Most memory one hash may ask for: a typo in a users file (`ln=41`)
/// must not make queued, the trusted core, abort on allocation. 2 GiB
/// still admits RFC 9106's first recommended argon2id setting.
pub const MAX_HASH_MEMORY: u64 = 2 << 30;

/// Most scrypt work (N·r·p) one hash may ask for: 32 times chasquid's
/// (2^14·8·1, ~50 ms), so ~1.6 s per check, already too slow for AUTH.
pub const MAX_SCRYPT_WORK: u64 = 1 << 22;

/// Most argon2 passes (`t`) one hash may ask for.
pub const MAX_ARGON2_PASSES: u64 = 16;

/// Refuses a hash whose parameters would cost absurd memory or time to
/// check. Parameters left out take the algorithm's defaults (scrypt r=8,
/// p=1); whether they are otherwise usable is for the verifier to say.
pub fn check_cost(phc: &password_hash::PasswordHash<'_>) -> Result<(), String> {
    let algorithm = phc.algorithm.as_str();
    let param = |k: &str, default: u64| -> Result<u64, String> {
        match phc.params.get_str(k) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| format!("the {algorithm} hash's {k}={v} is not a number")),
        }
    };
    let memory = match algorithm {
        "scrypt" => {
            let (ln, r, p) = (param("ln", 0)?, param("r", 8)?, param("p", 1)?);
            let n = 1u64
                .checked_shl(u32::try_from(ln).unwrap_or(u32::MAX))
                .unwrap_or(u64::MAX);
            let work = n.saturating_mul(r).saturating_mul(p);
            if work > MAX_SCRYPT_WORK {
                return Err(format!(
                    "scrypt parameters ln={ln}, r={r}, p={p} cost {}× chasquid's (ln=14, r=8, p=1); at most {}× is allowed",
                    work >> 17,
                    MAX_SCRYPT_WORK >> 17
                ));
            }
            // The working set: 128·r·N bytes for V plus 128·r·p for B.
            (128 * r).saturating_mul(n.saturating_add(p))
        }
        "argon2id" | "argon2i" | "argon2d" => {
            let t = param("t", 2)?;
            if t > MAX_ARGON2_PASSES {
                return Err(format!(
                    "argon2 parameter t={t}: at most {MAX_ARGON2_PASSES} passes are allowed"
                ));
            }
            param("m", 19 * 1024)?.saturating_mul(1024)
        }
        _ => 0,
    };
    if memory > MAX_HASH_MEMORY {
        return Err(format!(
            "the {algorithm} hash needs {} MiB, more than the {} MiB allowed",
            memory >> 20,
            MAX_HASH_MEMORY >> 20
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str =
        "$scrypt$ln=14,r=8,p=1$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4";

    #[test]
    fn parses_users() {
        let text = format!("# test users\n\nAnn {HASH}\nbob !\n");
        let db = UserDb::parse(&text, Path::new("users")).unwrap();
        assert!(db.contains("ann"));
        assert_eq!(db.get("bob"), Some(&Credential::ReceiveOnly));
        assert_eq!(db.len(), 2);
    }

    #[test]
    fn absurd_costs_are_refused_when_the_file_is_read() {
        for (hash, needle) in [
            // 2^40 rounds: the typo `ln=40` for `ln=14`.
            (
                "$scrypt$ln=40,r=8,p=1$c2FsdA$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
                "chasquid's",
            ),
            (
                "$scrypt$ln=14,r=8,p=64$c2FsdA$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
                "64×",
            ),
            (
                "$scrypt$ln=20,r=64,p=1$c2FsdA$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
                "chasquid's",
            ),
            (
                "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdA$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
                "4096 MiB",
            ),
            (
                "$argon2id$v=19$m=65536,t=1000,p=1$c2FsdA$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4",
                "passes",
            ),
        ] {
            let e = UserDb::parse(&format!("ann {hash}\n"), Path::new("d/users"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("d/users") && e.contains(needle), "{hash}: {e}");
        }
        // chasquid's own cost, and a cheap one, pass.
        UserDb::parse(&format!("ann {HASH}\n"), Path::new("users")).unwrap();
        UserDb::parse(
            "ann $scrypt$ln=4,r=8,p=1$c2FsdA$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4\n",
            Path::new("users"),
        )
        .unwrap();
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        for (text, needle) in [
            ("ann\n", "expected"),
            ("ann notahash\n", "PHC"),
            (
                "ann $md5$c2FsdHNhbHRzYWx0$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4\n",
                "md5",
            ),
            ("a\u{7}b !\n", "user"),
        ] {
            let e = UserDb::parse(text, Path::new("d/users"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("d/users:1: "), "{e}");
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }

    #[test]
    fn missing_file_is_empty() {
        let db = UserDb::load(Path::new("/nonexistent/users")).unwrap();
        assert!(db.is_empty());
    }
}
