//! chasquid.conf (a `config.Config` in protobuf text) to tambo.conf.
//!
//! tambo's keys are chasquid's names in TOML (REFERENCE §1.1), so most
//! settings carry over as they are, with two differences of meaning:
//! chasquid ignores zero numbers, empty strings and empty lists (they
//! mean "the default") where tambo takes any key present, so only what
//! chasquid would have used is written; and `data_dir` is chasquid's
//! state, which tambo must not share (its queue files are another
//! format), so only a relative one, which then names a new directory
//! beside tambo.conf, carries over.

use std::path::{Path, PathBuf};

use tambo_common::config::Config;

use super::prototext::{self, Field, single};

/// The kind of each chasquid key, which says when chasquid ignores it.
#[derive(Clone, Copy)]
enum Kind {
    /// Ignored when empty.
    Str,
    /// `optional string`: taken when present, even empty.
    OptStr,
    /// Ignored when zero.
    Int,
    /// Ignored when false (the default).
    Bool,
    /// `repeated string`, ignored when empty.
    List,
}

const KEYS: &[(&str, Kind)] = &[
    ("hostname", Kind::Str),
    ("max_data_size_mb", Kind::Int),
    ("smtp_address", Kind::List),
    ("submission_address", Kind::List),
    ("submission_over_tls_address", Kind::List),
    ("monitoring_address", Kind::Str),
    ("mail_delivery_agent_bin", Kind::Str),
    ("mail_delivery_agent_args", Kind::List),
    ("data_dir", Kind::Str),
    ("suffix_separators", Kind::OptStr),
    ("drop_characters", Kind::OptStr),
    ("mail_log_path", Kind::Str),
    ("dovecot_auth", Kind::Bool),
    ("dovecot_userdb_path", Kind::Str),
    ("dovecot_client_path", Kind::Str),
    ("haproxy_incoming", Kind::Bool),
    ("max_queue_items", Kind::Int),
    ("give_up_send_after", Kind::Str),
];

/// chasquid's default `data_dir`.
const CHASQUID_DATA_DIR: &str = "/var/lib/chasquid";

/// Most a message may take of tambo's default `[tambo]
/// max_data_in_flight_mb`, which must hold one message of the largest size.
const IN_FLIGHT_DEFAULT_MB: i128 = 512;

/// A converted chasquid.conf.
#[derive(Debug)]
pub struct Converted {
    /// tambo.conf's text.
    pub text: String,
    /// The keys written.
    pub keys: Vec<String>,
    /// What was not carried over, and why.
    pub notes: Vec<String>,
    /// chasquid's data directory, as chasquid resolved it.
    pub chasquid_data_dir: PathBuf,
    /// The new tambo.conf as tambo reads it, relative paths resolved.
    pub config: Config,
}

/// Converts chasquid.conf's contents (`path` names it in errors) from the
/// config directory `from`, for a tambo config directory `to`.
pub fn convert(data: &[u8], path: &Path, from: &Path, to: &Path) -> Result<Converted, String> {
    let at = |e: prototext::Error| e.at(path);
    let fields = prototext::parse(data).map_err(at)?;
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut notes = Vec::new();
    let mut chasquid_data_dir = PathBuf::from(CHASQUID_DATA_DIR);
    let mut seen: Vec<&str> = Vec::new();
    for f in &fields {
        if seen.contains(&f.name.as_str()) {
            continue;
        }
        seen.push(&f.name);
        let Some((key, kind)) = KEYS.iter().find(|(k, _)| *k == f.name) else {
            notes.push(format!(
                "not carried over: chasquid.conf's {} (line {}: no such key in tambo)",
                f.name, f.line
            ));
            continue;
        };
        let value = match kind {
            Kind::List => {
                let all: Vec<String> = fields
                    .iter()
                    .filter(|g| g.name == f.name)
                    .map(Field::string)
                    .collect::<Result<_, _>>()
                    .map_err(at)?;
                (!all.is_empty()).then(|| {
                    let items: Vec<String> = all.iter().map(|s| toml_str(s)).collect();
                    format!("[{}]", items.join(", "))
                })
            }
            _ => {
                let f = single(&fields, &f.name).map_err(at)?.unwrap_or(f);
                scalar(f, *kind).map_err(at)?
            }
        };
        let Some(value) = value else { continue };
        if *key == "data_dir" {
            let dir = f.string().map_err(at)?;
            chasquid_data_dir = PathBuf::from(&dir);
            if chasquid_data_dir.is_absolute() {
                notes.push(format!(
                    "not carried over: data_dir = {value} (chasquid's state; tambo keeps its own, \
                     where the domaininfo is imported; chasquid's queue is not: let it drain first)"
                ));
                continue;
            }
        }
        match check(to, key, &value) {
            Ok(()) => lines.push((key.to_string(), value)),
            Err(problem) => notes.push(format!("not carried over: {key} = {value} ({problem})")),
        }
    }
    if chasquid_data_dir.is_relative() {
        chasquid_data_dir = from.join(chasquid_data_dir);
    }
    let mut text = format!(
        "# Converted from {}\n\
         # by `tambo import-chasquid`: chasquid's settings in TOML; every other\n\
         # key is tambo's default (docs/config.md).\n",
        path.display()
    );
    for (k, v) in &lines {
        text.push_str(&format!("{k} = {v}\n"));
    }
    if let Some(extra) = in_flight(&lines) {
        text.push_str(&extra);
    }
    let cfg = Config::from_str(to, &to.join("tambo.conf"), &text)
        .map_err(|e| format!("the converted tambo.conf would not load: {e}"))?;
    if cfg.tambo.sender_bound_to_login {
        notes.push(
            "note: tambo lets an authenticated user send only as their own addresses \
             ([tambo] sender_bound_to_login = true); chasquid let them use any sender: \
             set it to false to keep that"
                .into(),
        );
    }
    Ok(Converted {
        text,
        keys: lines.into_iter().map(|(k, _)| k).collect(),
        notes,
        chasquid_data_dir,
        config: cfg.resolve_paths(),
    })
}

/// The TOML value of a singular field, or None where chasquid would have
/// used its default.
fn scalar(f: &Field, kind: Kind) -> Result<Option<String>, prototext::Error> {
    Ok(match kind {
        Kind::Str => Some(f.string()?)
            .filter(|s| !s.is_empty())
            .map(|s| toml_str(&s)),
        Kind::OptStr => Some(toml_str(&f.string()?)),
        Kind::Int => Some(f.int_as::<i64>()?)
            .filter(|n| *n != 0)
            .map(|n| n.to_string()),
        Kind::Bool => f.bool()?.then(|| "true".to_string()),
        Kind::List => None,
    })
}

/// `[tambo] max_data_in_flight_mb`, when max_data_size_mb is over its
/// default (tambo refuses a message size larger than what may be in
/// flight at once).
fn in_flight(lines: &[(String, String)]) -> Option<String> {
    let (_, size) = lines.iter().find(|(k, _)| k == "max_data_size_mb")?;
    let size: i128 = size.parse().ok()?;
    (size > IN_FLIGHT_DEFAULT_MB).then(|| format!("\n[tambo]\nmax_data_in_flight_mb = {size}\n"))
}

/// Whether tambo takes `key = value`, by the parser the daemons use; the
/// problem as it would say it otherwise.
fn check(to: &Path, key: &str, value: &str) -> Result<(), String> {
    let line = vec![(key.to_string(), value.to_string())];
    let text = format!("{key} = {value}\n{}", in_flight(&line).unwrap_or_default());
    Config::from_str(to, Path::new("tambo.conf"), &text)
        .map(|_| ())
        .map_err(|e| e.problem)
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert_str(text: &str) -> Result<Converted, String> {
        convert(
            text.as_bytes(),
            Path::new("/etc/chasquid/chasquid.conf"),
            Path::new("/etc/chasquid"),
            Path::new("/etc/tambo"),
        )
    }

    #[test]
    fn settings_carry_over_and_defaults_stay_out() {
        let c = convert_str(
            "# a comment\n\
             hostname: \"mx.example.org\"\n\
             max_data_size_mb: 1024\n\
             smtp_address: \":25\"\n\
             smtp_address: \"[::1]:2525\"\n\
             submission_address: []\n\
             monitoring_address: \"\"\n\
             mail_delivery_agent_args: [\"-d\", \"%to_user%\", \"a\\\"b\"]\n\
             suffix_separators: \"\"\n\
             drop_characters: \"._\"\n\
             dovecot_auth: true\n\
             haproxy_incoming: false\n\
             max_queue_items: 0\n\
             give_up_send_after: \"48h\"\n\
             data_dir: \"state\"\n",
        )
        .unwrap();
        assert_eq!(
            c.keys,
            [
                "hostname",
                "max_data_size_mb",
                "smtp_address",
                "mail_delivery_agent_args",
                "suffix_separators",
                "drop_characters",
                "dovecot_auth",
                "give_up_send_after",
                "data_dir"
            ]
        );
        assert!(
            c.text
                .contains("smtp_address = [\":25\", \"[::1]:2525\"]\n"),
            "{}",
            c.text
        );
        assert!(
            c.text.contains("[\"-d\", \"%to_user%\", \"a\\\"b\"]"),
            "{}",
            c.text
        );
        assert!(c.text.contains("suffix_separators = \"\"\n"), "{}", c.text);
        assert!(
            c.text.contains("[tambo]\nmax_data_in_flight_mb = 1024\n"),
            "{}",
            c.text
        );
        assert_eq!(c.chasquid_data_dir, Path::new("/etc/chasquid/state"));
        assert_eq!(c.config.data_dir, Path::new("/etc/tambo/state"));
        let cfg = Config::from_str(Path::new("/etc/tambo"), Path::new("t"), &c.text).unwrap();
        assert_eq!(cfg.drop_characters, "._");
        assert_eq!(cfg.suffix_separators, "");
        assert_eq!(cfg.give_up_send_after.as_secs(), 48 * 3600);
        assert_eq!(cfg.max_queue_items, 200);
        assert_eq!(c.notes.len(), 1, "only the sender note: {:?}", c.notes);
    }

    #[test]
    fn what_tambo_lacks_or_refuses_is_named() {
        let c = convert_str(
            "hostname: \"mx example\"\n\
             give_up_send_after: \"2d\"\n\
             smtp_address: \"localhost:25\"\n\
             data_dir: \"/var/lib/chasquid\"\n\
             some_future_option: 3\n",
        )
        .unwrap();
        assert!(c.keys.is_empty(), "{:?}", c.keys);
        let notes = c.notes.join("\n");
        for needle in [
            "not carried over: hostname = \"mx example\" (must be a host name",
            "not carried over: give_up_send_after = \"2d\" (",
            "not carried over: smtp_address = [\"localhost:25\"] (",
            "not carried over: data_dir = \"/var/lib/chasquid\" (chasquid's state",
            "not carried over: chasquid.conf's some_future_option (line 5: no such key in tambo)",
        ] {
            assert!(notes.contains(needle), "{needle}\n{notes}");
        }
        assert_eq!(c.chasquid_data_dir, Path::new("/var/lib/chasquid"));
        assert_eq!(c.config.data_dir, Path::new("/var/lib/tambo"));
        // An empty chasquid.conf (Debian's, all comments) is all defaults.
        let c = convert_str("# nothing\n").unwrap();
        assert!(c.keys.is_empty());
        assert_eq!(c.chasquid_data_dir, Path::new("/var/lib/chasquid"));
    }

    #[test]
    fn a_broken_chasquid_conf_is_one_error_line() {
        for (text, needle) in [
            (
                "hostname: mx\n",
                "/etc/chasquid/chasquid.conf:1: hostname: expected a quoted string",
            ),
            (
                "\nhostname: \"a\"\nhostname: \"b\"\n",
                "chasquid.conf:3: hostname: given twice",
            ),
            (
                "max_data_size_mb: \"50\"\n",
                ":1: max_data_size_mb: expected a name or a number",
            ),
            (
                "dovecot_auth: yes\n",
                ":1: dovecot_auth: \"yes\" is not true or false",
            ),
            (
                "smtp_address: \":25\"\nsmtp_address: 25\n",
                ":2: smtp_address: expected a quoted string",
            ),
            ("hostname: \"mx\n", ":1: unterminated string"),
            ("hostname {\n", ":1: expected a field name or '}'"),
        ] {
            let e = convert_str(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
