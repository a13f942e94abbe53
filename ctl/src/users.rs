//! `tambo user-add`, `user-remove`, `authenticate`, `check-userdb`
//! (REFERENCE §9): the users files of `domains/<domain>/users`, edited
//! and read as chasquid-util does, without a running server. queued picks
//! an edit up at its next reload (every 30 s, or SIGHUP).
//!
//! An edit keeps the file's other lines (comments included) as they are,
//! is checked by the same parser queued uses before it is written, and
//! replaces the file atomically with its owner, group and mode: under the
//! Debian package the file is `root:tambo-queue 0640`, and queued must
//! never see it otherwise.

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tambo_common::address;
use tambo_common::users::{Credential, UserDb};

/// An admin command's failure: one line for stderr.
pub type Error = String;

/// `user@domain`, normalised as queued normalises AUTH identities.
fn split(address: &str) -> Result<(String, String), Error> {
    let (user, domain) = address
        .rsplit_once('@')
        .filter(|(_, d)| !d.is_empty())
        .ok_or_else(|| "domain missing: the user must be given as user@domain".to_string())?;
    let user = address::normalize_user(user).map_err(|e| format!("invalid user name: {e}"))?;
    let domain = address::normalize_domain(domain).map_err(|e| format!("invalid domain: {e}"))?;
    Ok((user, domain))
}

/// The users file of `domain`: in the directory that already names it
/// (`Example.org/` for `example.org`), else in `domains/<domain>/`.
fn users_path(config_dir: &Path, domain: &str) -> Result<PathBuf, Error> {
    let domains = config_dir.join("domains");
    if domains.is_dir() {
        let scan = tambo_common::domains::scan_domain_dirs(&domains).map_err(|e| e.to_string())?;
        if let Some((_, dir)) = scan.found.iter().find(|(name, _)| name == domain) {
            return Ok(dir.join("users"));
        }
    }
    Ok(domains.join(domain).join("users"))
}

/// The password: `--password`, else asked on the terminal (twice when
/// `confirm`, without echo), else one line of standard input (scripts).
fn password(given: Option<String>, confirm: bool) -> Result<String, Error> {
    if let Some(p) = given {
        return Ok(p);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password: {e}"))?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_string());
    }
    let first = prompt("Password: ")?;
    if confirm {
        let second = prompt("Confirm password: ")?;
        if first != second {
            return Err("passwords don't match".into());
        }
    }
    Ok(first)
}

/// Reads one line from the terminal with echo off (restored even when the
/// read fails).
fn prompt(label: &str) -> Result<String, Error> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let mut err = std::io::stderr();
    let _ = write!(err, "{label}");
    let _ = err.flush();
    let saved = tcgetattr(&stdin).map_err(|e| format!("cannot use the terminal: {e}"))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet)
        .map_err(|e| format!("cannot use the terminal: {e}"))?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    let _ = writeln!(err);
    read.map_err(|e| format!("cannot read the password: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// The file's text and the lines of it that are not `user`'s.
fn other_lines(text: &str, user: &str) -> (Vec<String>, bool) {
    let mut found = false;
    let kept = text
        .lines()
        .filter(|raw| {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                return true;
            }
            let name = line.split(char::is_whitespace).next().unwrap_or("");
            let mine = address::normalize_user(name).is_ok_and(|n| n == user);
            found |= mine;
            !mine
        })
        .map(str::to_string)
        .collect();
    (kept, found)
}

/// Reads the users file as queued would; a missing file is empty. A file
/// queued would refuse is not edited: its error is the answer.
fn read(path: &Path) -> Result<String, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    UserDb::parse(&text, path).map_err(|e| format!("{e} (fix it before editing it)"))?;
    Ok(text)
}

/// Writes the users file atomically, keeping an existing file's owner,
/// group and mode; a new one gets 0640 and the group of the directory it
/// is in (the domain directory, itself made like `domains/`).
fn write(path: &Path, text: &str) -> Result<String, Error> {
    let mut said = String::new();
    UserDb::parse(text, path)
        .map_err(|e| format!("refusing to write what queued would refuse: {e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.is_dir() {
        let domains = dir.parent().unwrap_or(Path::new("."));
        let meta = std::fs::metadata(domains).map_err(|e| {
            format!(
                "{}: {e} (is the config directory right?)",
                domains.display()
            )
        })?;
        std::fs::create_dir(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::os::unix::fs::chown(dir, Some(meta.uid()), Some(meta.gid())))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        said = format!("Created domain directory {}\n", dir.display());
    }
    let (mode, owner) = match std::fs::metadata(path) {
        Ok(m) => (m.permissions().mode() & 0o7777, (m.uid(), m.gid())),
        Err(_) => {
            let d = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            (0o640, (nix::unistd::geteuid().as_raw(), d.gid()))
        }
    };
    // Only root may give a file away; anyone else keeps their own.
    let owner = nix::unistd::geteuid().is_root().then_some(owner);
    tambo_common::safeio::write_atomic_as(path, text.as_bytes(), mode, owner)
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    Ok(said)
}

fn join(lines: &[String]) -> String {
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// One editor at a time (REFERENCE §5.4): an exclusive lock on the
/// `domains/` directory while a users file is read, changed and replaced,
/// so two `user-add`s at once cannot lose one of the edits.
fn lock_domains(config_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    let dir = config_dir.join("domains");
    let f = std::fs::File::open(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("{}: cannot lock: {e}", dir.display()))
}

/// `tambo user-add`: adds or replaces a user.
pub fn add(
    config_dir: &Path,
    who: &str,
    given: Option<String>,
    receive_only: bool,
) -> Result<String, Error> {
    if receive_only && given.is_some() {
        return Err("cannot give both --receive_only and --password".into());
    }
    let (user, domain) = split(who)?;
    // Asked before the lock: a slow typist must not hold up other edits.
    let credential = if receive_only {
        "!".to_string()
    } else {
        let pw = password(given, true)?;
        if pw.is_empty() {
            return Err("the password is empty".into());
        }
        tambo_common::password::hash(pw.as_bytes())?
    };
    let _lock = lock_domains(config_dir)?;
    let path = users_path(config_dir, &domain)?;
    let text = read(&path)?;
    let (mut lines, _) = other_lines(&text, &user);
    lines.push(format!("{user} {credential}"));
    Ok(write(&path, &join(&lines))? + "Added user\n")
}

/// `tambo user-remove`: removes a user; an unknown one is an error.
pub fn remove(config_dir: &Path, who: &str) -> Result<String, Error> {
    let (user, domain) = split(who)?;
    let _lock = lock_domains(config_dir)?;
    let path = users_path(config_dir, &domain)?;
    let text = read(&path)?;
    let (lines, found) = other_lines(&text, &user);
    if !found {
        return Err("unknown user".into());
    }
    Ok(write(&path, &join(&lines))? + "Removed user\n")
}

/// `tambo authenticate`: checks a password against the users file only.
pub fn authenticate(config_dir: &Path, who: &str, given: Option<String>) -> Result<String, Error> {
    let (user, domain) = split(who)?;
    let path = users_path(config_dir, &domain)?;
    let db = UserDb::load(&path).map_err(|e| e.to_string())?;
    let pw = password(given, false)?;
    let ok = match db.get(&user) {
        Some(Credential::Hash(phc)) => tambo_common::password::verify(phc, pw.as_bytes())?,
        Some(Credential::ReceiveOnly) | None => false,
    };
    if !ok {
        return Err("authentication failed".into());
    }
    Ok("Authentication succeeded\n".into())
}

/// `tambo check-userdb`: loads a domain's users file, prints its count.
pub fn check(config_dir: &Path, domain: &str) -> Result<String, Error> {
    let domain = address::normalize_domain(domain).map_err(|e| format!("invalid domain: {e}"))?;
    let path = users_path(config_dir, &domain)?;
    if !path.exists() {
        return Err(format!("{}: no such file", path.display()));
    }
    let db = UserDb::load(&path).map_err(|e| e.to_string())?;
    Ok(format!("Database loaded ({} users)\n", db.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_lines_keep_comments_and_drop_the_user_in_any_case() {
        let text = "# staff\nAnn !\n\nbob !\n";
        let (lines, found) = other_lines(text, "ann");
        assert!(found);
        assert_eq!(join(&lines), "# staff\n\nbob !\n");
        let (_, found) = other_lines(text, "carol");
        assert!(!found);
    }

    #[test]
    fn addresses_need_a_domain() {
        assert!(split("ann").unwrap_err().contains("user@domain"));
        assert!(split("ann@").unwrap_err().contains("user@domain"));
        assert_eq!(
            split("Ann@Example.ORG").unwrap(),
            ("ann".into(), "example.org".into())
        );
        assert!(split("a b@example.org").is_err());
    }
}
