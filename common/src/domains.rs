//! `domains/`: one directory per local domain, each with optional `users`
//! and `aliases` files. Loaded into one immutable snapshot that queued swaps
//! whole on reload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::address;
use crate::aliases::Aliases;
use crate::config::{Config, ConfigError};
use crate::users::UserDb;

#[derive(Debug, Clone, Default)]
pub struct Domain {
    pub users: UserDb,
    pub aliases: Aliases,
}

#[derive(Debug, Clone, Default)]
pub struct Domains {
    domains: BTreeMap<String, Domain>,
}

impl Domains {
    /// Loads `<config_dir>/domains/`. It must exist and hold at least one
    /// domain directory (regular files in it are ignored).
    pub fn load(cfg: &Config) -> Result<Self, ConfigError> {
        let dir = cfg.config_dir.join("domains");
        let mut domains = BTreeMap::new();
        for (name, path) in domain_dirs(&dir)? {
            let users = UserDb::load(&path.join("users"))?;
            let aliases = Aliases::load(
                &path.join("aliases"),
                &name,
                &cfg.drop_characters,
                &cfg.suffix_separators,
            )?;
            domains.insert(name, Domain { users, aliases });
        }
        if domains.is_empty() {
            return Err(ConfigError::file(
                &dir,
                "no domain directories: add at least one, e.g. domains/example.org/",
            ));
        }
        Ok(Self { domains })
    }

    /// Whether mail for `domain` (normalised) is ours. `localhost` always is.
    pub fn is_local(&self, domain: &str) -> bool {
        domain.is_empty() || domain == "localhost" || self.domains.contains_key(domain)
    }

    pub fn get(&self, domain: &str) -> Option<&Domain> {
        self.domains.get(domain)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Domain)> {
        self.domains.iter()
    }

    /// The first local domain (in name order), for DSN `From:` fallbacks.
    pub fn first(&self) -> Option<&str> {
        self.domains.keys().next().map(String::as_str)
    }

    /// Builds a snapshot from parts (tests, tools).
    pub fn from_parts(parts: impl IntoIterator<Item = (String, Domain)>) -> Self {
        Self {
            domains: parts.into_iter().collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.domains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

/// Whether a domains directory looks usable, for tools.
pub fn exists(config_dir: &Path) -> bool {
    config_dir.join("domains").is_dir()
}

/// The domain directories under `dir` (`domains/`), with their normalised
/// names, in name order: directories only (regular files are ignored).
/// Every reader of `domains/` finds domains this way. A name that does
/// not normalise, or two directories naming one domain (`Example.org` and
/// `example.org`), is an error naming the directory: silently merging
/// them would make one of them not apply.
pub fn domain_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, ConfigError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigError::file(dir, format!("cannot read the domains directory: {e}")))?;
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| ConfigError::file(dir, e.to_string()))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let raw = entry.file_name();
        let raw = raw
            .to_str()
            .ok_or_else(|| ConfigError::file(&path, "domain directory name is not UTF-8"))?;
        let name = address::normalize_domain(raw)
            .map_err(|e| ConfigError::file(&path, format!("invalid domain name: {e}")))?;
        if let Some(other) = found.get(&name) {
            // Report the pair the same way whatever order readdir gave.
            let (a, b) = if other < &path {
                (other, &path)
            } else {
                (&path, other)
            };
            return Err(ConfigError::file(
                b,
                format!(
                    "names the same domain as {}: keep one directory per domain",
                    a.display()
                ),
            ));
        }
        found.insert(name, path);
    }
    Ok(found.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> Config {
        Config::defaults(dir)
    }

    #[test]
    fn two_directories_of_one_domain_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("domains/Example.ORG")).unwrap();
        std::fs::create_dir_all(dir.path().join("domains/example.org")).unwrap();
        let e = Domains::load(&cfg(dir.path())).err().unwrap().to_string();
        assert!(e.contains("names the same domain as"), "{e}");
        assert!(
            e.contains("Example.ORG") && e.contains("example.org"),
            "{e}"
        );
    }

    #[test]
    fn loads_domains() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("domains/Example.ORG");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("users"), "ann !\n").unwrap();
        std::fs::write(d.join("aliases"), "postmaster: ann\n").unwrap();
        std::fs::write(dir.path().join("domains/README"), "ignored").unwrap();
        let ds = Domains::load(&cfg(dir.path())).unwrap();
        assert_eq!(ds.len(), 1);
        assert!(ds.is_local("example.org"));
        assert!(ds.is_local("localhost"));
        assert!(!ds.is_local("elsewhere.example"));
        assert!(ds.get("example.org").unwrap().users.contains("ann"));
    }

    #[test]
    fn refuses_missing_or_empty_domains() {
        let dir = tempfile::tempdir().unwrap();
        let e = Domains::load(&cfg(dir.path())).unwrap_err().to_string();
        assert!(e.contains("domains") && e.contains("cannot read"), "{e}");
        std::fs::create_dir(dir.path().join("domains")).unwrap();
        let e = Domains::load(&cfg(dir.path())).unwrap_err().to_string();
        assert!(e.contains("no domain directories"), "{e}");
    }

    #[test]
    fn refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("domains/example.org");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("aliases"), "broken line\n").unwrap();
        let e = Domains::load(&cfg(dir.path())).unwrap_err().to_string();
        assert!(e.contains("example.org/aliases:1:"), "{e}");
    }
}
