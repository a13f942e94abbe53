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
