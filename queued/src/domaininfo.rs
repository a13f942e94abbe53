//! Per-domain security levels (REFERENCE §4.6): once a domain was seen
//! over TLS, mail to it (or, with the inbound checks, from it) never goes
//! over anything weaker again.
//!
//! Kept by queued, the one process that writes state: deliverd reports
//! the level it saw; it never writes these files. One file per domain,
//! `<data_dir>/domaininfo/s:<escaped domain>`, in chasquid's text form, so
//! a chasquid data dir's history carries over. Read at startup and on
//! SIGHUP; written (atomically, durably) whenever a level rises.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tambo_common::{address, safeio};
use tambo_proto::deliver::SecLevel;

/// The two levels of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels {
    pub incoming: SecLevel,
    pub outgoing: SecLevel,
}

impl Default for Levels {
    fn default() -> Self {
        Self {
            incoming: SecLevel::Plain,
            outgoing: SecLevel::Plain,
        }
    }
}

/// Which half of a domain's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Incoming,
    Outgoing,
}

pub struct DomainInfo {
    dir: PathBuf,
    levels: Mutex<HashMap<String, Levels>>,
    /// Held while a record is written, so concurrent raises of one domain
    /// reach the disk in order: each write takes the levels in memory at
    /// the time it writes, never a copy that a later raise superseded.
    writing: Mutex<()>,
}

impl DomainInfo {
    /// Reads every record in `dir`, creating it if missing. A file that
    /// does not parse is logged and skipped (its domain starts again from
    /// PLAIN): losing one record must not stop mail.
    pub fn load(dir: &Path) -> io::Result<Self> {
        safeio::create_dir_all_durable(dir, 0o700)?;
        let me = Self {
            dir: dir.to_path_buf(),
            levels: Mutex::default(),
            writing: Mutex::default(),
        };
        me.reload()?;
        Ok(me)
    }

    /// Reads the directory again (SIGHUP). Levels only go up (only
    /// `clear` lowers one, and writes it): what is read is merged with
    /// what memory holds, the higher level winning, so a file that cannot
    /// be read now, or a raise whose write failed, is not forgotten. Two
    /// files naming one domain (a Unicode and an A-label spelling) merge
    /// the same way.
    pub fn reload(&self) -> io::Result<usize> {
        let mut trace =
            tambo_proto::trace::Trace::new("DomainInfo.Reload", self.dir.display().to_string());
        let r = self.reload_traced(&mut trace);
        match &r {
            Ok(n) => trace.event(format!("{n} domains")),
            Err(e) => trace.error(format!("not read: {e}")),
        }
        r
    }

    fn reload_traced(&self, trace: &mut tambo_proto::trace::Trace) -> io::Result<usize> {
        // No write between the read and the swap: it would be undone.
        let _writing = self.writing();
        let mut map: HashMap<String, Levels> = HashMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with("s:") {
                continue;
            }
            let path = entry.path();
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| parse(&t))
            {
                Ok((domain, levels)) => {
                    let l = map.entry(key(&domain)).or_default();
                    l.incoming = l.incoming.max(levels.incoming);
                    l.outgoing = l.outgoing.max(levels.outgoing);
                }
                Err(e) => {
                    trace.error(format!("{}: {e}; ignored", path.display()));
                    tracing::error!("domaininfo {}: {e}; ignored", path.display())
                }
            }
        }
        let mut memory = self.lock();
        for (domain, levels) in map {
            let l = memory.entry(domain).or_default();
            l.incoming = l.incoming.max(levels.incoming);
            l.outgoing = l.outgoing.max(levels.outgoing);
        }
        Ok(memory.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Levels>> {
        self.levels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Taken before `levels` whenever both are held.
    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recorded levels of `domain` (PLAIN for an unknown one).
    pub fn get(&self, domain: &str) -> Levels {
        self.lock().get(&key(domain)).copied().unwrap_or_default()
    }

    /// The rule of REFERENCE §4.6 for a connection of level `seen`: lower
    /// than recorded → false; equal → true; higher → recorded (durably)
    /// and true. A failed write is logged; the check still passes, and the
    /// level is kept in memory so it is enforced until a restart. Writes
    /// and fsyncs on a raise: call it where blocking is allowed.
    pub fn check(&self, domain: &str, dir: Direction, seen: SecLevel) -> bool {
        let key = key(domain);
        let recorded = |l: &Levels| match dir {
            Direction::Incoming => l.incoming,
            Direction::Outgoing => l.outgoing,
        };
        {
            let map = self.lock();
            let now = map.get(&key).map(recorded).unwrap_or(SecLevel::Plain);
            if seen <= now {
                return seen == now;
            }
        }
        // A raise: in memory and on disk under the write lock, so raises
        // and reloads of one domain land in order.
        let _writing = self.writing();
        let mut map = self.lock();
        let levels = map.entry(key.clone()).or_default();
        let slot = match dir {
            Direction::Incoming => &mut levels.incoming,
            Direction::Outgoing => &mut levels.outgoing,
        };
        if seen < *slot {
            return false;
        }
        if seen > *slot {
            *slot = seen;
            let snapshot = *levels;
            drop(map);
            tracing::info!(
                "domaininfo: {key}: {} level raised to {}",
                match dir {
                    Direction::Incoming => "incoming",
                    Direction::Outgoing => "outgoing",
                },
                seen.name()
            );
            if let Err(e) = self.store(&key, snapshot) {
                tracing::error!("domaininfo: cannot record {key}: {e}");
            }
        }
        true
    }

    /// Resets both levels of a known domain to PLAIN, keeping its file
    /// (`domaininfo-remove`, not yet wired to the admin socket). False if
    /// the domain is unknown.
    #[allow(dead_code)]
    pub fn clear(&self, domain: &str) -> io::Result<bool> {
        let key = key(domain);
        let _writing = self.writing();
        {
            let mut map = self.lock();
            match map.get_mut(&key) {
                Some(l) => *l = Levels::default(),
                None => return Ok(false),
            }
        }
        self.store(&key, Levels::default())?;
        // Another spelling's file would bring the old level back at the
        // next reload.
        if let Ok(ascii) = idna::domain_to_ascii(&key)
            && ascii != key
        {
            match std::fs::remove_file(self.dir.join(format!("s:{}", escape(&ascii)))) {
                Ok(()) => safeio::fsync_dir(&self.dir)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes a record; the caller holds the write lock.
    fn store(&self, domain: &str, levels: Levels) -> io::Result<()> {
        let path = self.dir.join(format!("s:{}", escape(domain)));
        safeio::write_atomic(&path, format(domain, levels).as_bytes(), 0o600)
    }
}

/// One key per domain however it is spelt: Unicode, NFC, lower case (as
/// chasquid names its records), so `bücher.example` and
/// `xn--bcher-kva.example` share one record.
fn key(domain: &str) -> String {
    address::normalize_domain(domain).unwrap_or_else(|_| domain.to_lowercase())
}

/// Form-urlencoding of the name (REFERENCE §1.4): `A-Z a-z 0-9 - _ . ~`
/// kept, every other byte `%XX`.
pub fn escape(domain: &str) -> String {
    tambo_common::address::form_urlencode(domain)
}

fn format(domain: &str, l: Levels) -> String {
    let mut s = format!("name: {}\n", quote(domain));
    if l.incoming != SecLevel::Plain {
        s.push_str(&format!("incoming_sec_level: {}\n", l.incoming.name()));
    }
    if l.outgoing != SecLevel::Plain {
        s.push_str(&format!("outgoing_sec_level: {}\n", l.outgoing.name()));
    }
    s
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Parses chasquid's protobuf text form of a record.
fn parse(text: &str) -> Result<(String, Levels), String> {
    let mut name = None;
    let mut levels = Levels::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: expected `key: value`", n + 1))?;
        let value = value.trim();
        match key.trim() {
            "name" => {
                let v = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .ok_or_else(|| format!("line {}: name must be quoted", n + 1))?;
                name = Some(v.replace("\\\"", "\"").replace("\\\\", "\\"));
            }
            k @ ("incoming_sec_level" | "outgoing_sec_level") => {
                let level = SecLevel::from_name(value)
                    .ok_or_else(|| format!("line {}: unknown level {value:?}", n + 1))?;
                if k == "incoming_sec_level" {
                    levels.incoming = level;
                } else {
                    levels.outgoing = level;
                }
            }
            other => return Err(format!("line {}: unknown field {other:?}", n + 1)),
        }
    }
    let name = name.ok_or("no name")?;
    if name.is_empty() {
        return Err("empty name".into());
    }
    Ok((name, levels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_only_go_up_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let d = DomainInfo::load(dir.path()).unwrap();
        let out = Direction::Outgoing;
        assert!(d.check("Example.COM", out, SecLevel::Plain));
        assert!(d.check("example.com", out, SecLevel::TlsSecure));
        assert!(!d.check("example.com", out, SecLevel::TlsInsecure));
        assert!(!d.check("example.com", out, SecLevel::Plain));
        assert!(d.check("example.com", out, SecLevel::TlsSecure));
        // The incoming half is separate.
        assert!(d.check("example.com", Direction::Incoming, SecLevel::Plain));
        let again = DomainInfo::load(dir.path()).unwrap();
        assert_eq!(again.get("example.com").outgoing, SecLevel::TlsSecure);
        assert!(!again.check("example.com", out, SecLevel::Plain));
        assert!(again.clear("example.com").unwrap());
        assert!(!again.clear("unknown.example").unwrap());
        assert!(again.check("example.com", out, SecLevel::Plain));
    }

    #[test]
    fn reads_and_writes_chasquids_form() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("s:xn--bcher-kva.example"),
            "name:  \"xn--bcher-kva.example\"\nincoming_sec_level:  TLS_CLIENT\noutgoing_sec_level:  TLS_INSECURE\n",
        )
        .unwrap();
        // A broken record is skipped, not fatal.
        std::fs::write(dir.path().join("s:broken"), "name: unquoted\n").unwrap();
        let d = DomainInfo::load(dir.path()).unwrap();
        let l = d.get("bücher.example");
        assert_eq!(l.incoming, SecLevel::TlsClient);
        assert_eq!(l.outgoing, SecLevel::TlsInsecure);
        assert_eq!(d.get("broken"), Levels::default());
        d.check("bücher.example", Direction::Outgoing, SecLevel::TlsSecure);
        let file = dir.path().join("s:b%C3%BCcher.example");
        assert_eq!(
            std::fs::read_to_string(file).unwrap(),
            "name: \"bücher.example\"\nincoming_sec_level: TLS_CLIENT\noutgoing_sec_level: TLS_SECURE\n",
            "one record for both spellings"
        );
    }

    #[test]
    fn a_reload_never_lowers_a_level() {
        let dir = tempfile::tempdir().unwrap();
        let d = DomainInfo::load(dir.path()).unwrap();
        assert!(d.check("a.example", Direction::Outgoing, SecLevel::TlsSecure));
        // The file goes bad (or its write had failed): memory keeps it.
        std::fs::write(dir.path().join("s:a.example"), "garbage\n").unwrap();
        d.reload().unwrap();
        assert_eq!(d.get("a.example").outgoing, SecLevel::TlsSecure);
        // A legacy A-label file is merged, and cleared along with its
        // domain.
        std::fs::write(
            dir.path().join("s:xn--bcher-kva.example"),
            "name: \"xn--bcher-kva.example\"\noutgoing_sec_level: TLS_SECURE\n",
        )
        .unwrap();
        d.reload().unwrap();
        assert_eq!(d.get("bücher.example").outgoing, SecLevel::TlsSecure);
        assert!(d.clear("bücher.example").unwrap());
        assert!(!dir.path().join("s:xn--bcher-kva.example").exists());
        let fresh = DomainInfo::load(dir.path()).unwrap();
        assert_eq!(fresh.get("bücher.example").outgoing, SecLevel::Plain);
    }

    #[test]
    fn escaping_keeps_only_the_unreserved_bytes() {
        assert_eq!(escape("a-b_c.d~E9"), "a-b_c.d~E9");
        assert_eq!(escape("a/b:c%"), "a%2Fb%3Ac%25");
    }
}
