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

/// What the files under `domains/` look like now: every entry's name, and
/// each users and aliases file's device, inode, size and change time. A
/// new value means something changed and the domains are worth loading
/// again (the periodic reload reads nothing else when nothing changed).
pub fn files_state(config_dir: &Path) -> FilesState {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(config_dir.join("domains")) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        out.push((name.clone(), None));
        for f in ["users", "aliases"] {
            if let Ok(m) = std::fs::metadata(e.path().join(f)) {
                out.push((
                    format!("{name}/{f}"),
                    Some(((m.dev(), m.ino()), m.size(), (m.ctime(), m.ctime_nsec()))),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Per entry of `domains/`: its name, and for users and aliases files
/// their device and inode, size and change time.
pub type FilesState = Vec<(String, Option<((u64, u64), u64, (i64, i64))>)>;

/// Whether a domains directory looks usable, for tools.
pub fn exists(config_dir: &Path) -> bool {
    config_dir.join("domains").is_dir()
}

/// The domain directories under `dir` (`domains/`), with their normalised
/// names, in name order: directories only (regular files are ignored).
/// Every reader of `domains/` finds domains this way. A name that does
/// not normalise, or two directories naming one domain (`Example.org` and
/// `example.org`), is an error naming the directory: silently merging
/// them would make one of them not apply. Directories that are plainly not
/// domains (`_template`, `.git`, `example.org.bak`) are left out with a
/// warning in the log; [`scan_domain_dirs`] returns them instead.
pub fn domain_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, ConfigError> {
    let scan = scan_domain_dirs(dir)?;
    for (path, why) in &scan.ignored {
        tracing::warn!("{}: {why}: ignored", path.display());
    }
    Ok(scan.found)
}

/// What [`scan_domain_dirs`] found under `domains/`.
#[derive(Debug, Default)]
pub struct DomainDirs {
    /// The domains, normalised, in name order, with their directories.
    pub found: Vec<(String, PathBuf)>,
    /// Directories that are not domains, and why.
    pub ignored: Vec<(PathBuf, &'static str)>,
}

/// Suffixes of the copies editors, package managers and people leave
/// beside a directory: `example.org.bak` must not become a domain `bak`.
const BACKUP_SUFFIXES: &[&str] = &[
    ".bak",
    ".old",
    ".orig",
    ".save",
    ".saved",
    ".swp",
    ".tmp",
    ".disabled",
    ".off",
    ".dpkg-old",
    ".dpkg-dist",
    ".dpkg-new",
    ".dpkg-bak",
    ".rpmnew",
    ".rpmsave",
    "~",
];

/// [`domain_dirs`], returning the directories left out rather than
/// logging them (`tambo check-config` prints them).
pub fn scan_domain_dirs(dir: &Path) -> Result<DomainDirs, ConfigError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigError::file(dir, format!("cannot read the domains directory: {e}")))?;
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut ignored = Vec::new();
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
        if raw.starts_with('.') || raw.starts_with('_') {
            ignored.push((path, "a hidden or template directory, not a domain"));
            continue;
        }
        let lower = raw.to_lowercase();
        if BACKUP_SUFFIXES.iter().any(|s| lower.ends_with(s)) {
            ignored.push((path, "looks like a backup copy, not a domain"));
            continue;
        }
        if let Some(bare) = raw.strip_suffix('.') {
            // `example.org.` would be a second, different domain, and the
            // real one would refuse its mail as relaying.
            return Err(ConfigError::file(
                &path,
                format!("a domain directory's name must not end with a dot: rename it to {bare}"),
            ));
        }
        let name = address::normalize_domain(raw)
            .map_err(|e| ConfigError::file(&path, format!("invalid domain name: {e}")))?;
        if let Some(problem) = not_a_host_name(&name) {
            return Err(ConfigError::file(
                &path,
                format!("not a domain name ({problem})"),
            ));
        }
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
    ignored.sort();
    Ok(DomainDirs {
        found: found.into_iter().collect(),
        ignored,
    })
}

/// Why a normalised domain is no host name (RFC 1123 labels, letters
/// taken in any script as IDNA allows), if it is not.
fn not_a_host_name(name: &str) -> Option<&'static str> {
    if name.len() > 253 {
        return Some("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("an empty label");
        }
        if label.chars().count() > 63 {
            return Some("a label longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a label starts or ends with a hyphen");
        }
        if !label.chars().all(|c| c.is_alphanumeric() || c == '-') {
            return Some("only letters, digits and hyphens may make a label");
        }
    }
    None
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
    fn directories_that_are_not_domains_are_left_out_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let domains = dir.path().join("domains");
        for d in [
            "example.org",
            "example.org.bak",
            "_template",
            ".git",
            "Example.net~",
            "b.dpkg-old",
        ] {
            std::fs::create_dir_all(domains.join(d)).unwrap();
        }
        let scan = scan_domain_dirs(&domains).unwrap();
        let names: Vec<_> = scan.found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["example.org"]);
        let ignored: Vec<_> = scan
            .ignored
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            ignored,
            [
                ".git",
                "Example.net~",
                "_template",
                "b.dpkg-old",
                "example.org.bak"
            ]
        );

        // The final dot: one clear error naming the fix.
        std::fs::create_dir_all(domains.join("example.com.")).unwrap();
        let e = scan_domain_dirs(&domains).unwrap_err().to_string();
        assert!(
            e.contains("example.com.") && e.contains("rename it to example.com"),
            "{e}"
        );
        std::fs::remove_dir(domains.join("example.com.")).unwrap();

        for bad in ["exa mple.org", "a..b", "-x.org", "x_y.org"] {
            std::fs::create_dir_all(domains.join(bad)).unwrap();
            let e = scan_domain_dirs(&domains).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
            std::fs::remove_dir(domains.join(bad)).unwrap();
        }
        // Internationalised names are domains.
        std::fs::create_dir_all(domains.join("ñandú.example")).unwrap();
        assert_eq!(scan_domain_dirs(&domains).unwrap().found.len(), 2);
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
