//! chasquid's domaininfo (`<data_dir>/domaininfo/s:<domain>`, a
//! `domaininfo.Domain` in protobuf text) to tambo's, so the TLS each
//! domain was seen with keeps being required (REFERENCE §4.6).
//!
//! tambo reads the same text form, but with a simpler reader than Go's
//! (it knows only `\"` and `\\` in the name, and level names), and keys
//! its files by the normalised domain. So each record is parsed fully
//! here and written as queued itself writes it (queued/src/domaininfo.rs
//! `store`): `s:<escaped normalised domain>`, PLAIN levels left out. Two
//! records that normalise to one domain merge, the higher level winning,
//! as queued merges them.

use std::collections::BTreeMap;
use std::path::Path;

use tambo_common::address;

use super::prototext::{self, single};

const LEVELS: [&str; 4] = ["PLAIN", "TLS_CLIENT", "TLS_INSECURE", "TLS_SECURE"];

/// The records to write, and what was left out.
#[derive(Debug, Default)]
pub struct Records {
    /// (file name, contents), one per domain.
    pub files: Vec<(String, String)>,
    pub notes: Vec<String>,
}

/// Reads every `s:*` record of chasquid's domaininfo directory `dir` (the
/// files chasquid itself reads; others are not its records). A record
/// that cannot be read is left out with a note, as chasquid would have
/// refused to start rather than guess.
pub fn convert_dir(dir: &Path) -> Result<Records, String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: cannot read: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("s:"))
        })
        .collect();
    names.sort();
    let mut merged: BTreeMap<String, [usize; 2]> = BTreeMap::new();
    let mut out = Records::default();
    for path in names {
        let record = std::fs::read(&path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|data| parse(&data).map_err(|e| e.at(&path)));
        match record {
            Ok((domain, levels)) => {
                let m = merged.entry(domain).or_default();
                m[0] = m[0].max(levels[0]);
                m[1] = m[1].max(levels[1]);
            }
            Err(e) => out
                .notes
                .push(format!("not carried over: domaininfo record {e}")),
        }
    }
    for (domain, levels) in merged {
        out.files
            .push((format!("s:{}", escape(&domain)), format(&domain, levels)));
    }
    Ok(out)
}

/// A record: its normalised domain, incoming and outgoing levels.
fn parse(data: &[u8]) -> Result<(String, [usize; 2]), prototext::Error> {
    let fields = prototext::parse(data)?;
    let mut levels = [0; 2];
    for f in &fields {
        let slot = match f.name.as_str() {
            "name" => continue,
            "incoming_sec_level" => 0,
            "outgoing_sec_level" => 1,
            _ => return Err(f.error("unknown field of a domaininfo record")),
        };
        single(&fields, &f.name)?;
        let w = f.word()?;
        levels[slot] = LEVELS
            .iter()
            .position(|l| *l == w)
            .or_else(|| f.int_as::<usize>().ok().filter(|n| *n < LEVELS.len()))
            .ok_or_else(|| f.error(format!("unknown security level {w:?}")))?;
    }
    let name = single(&fields, "name")?.ok_or_else(|| prototext::Error {
        line: 1,
        problem: "no name".into(),
    })?;
    let raw = name.string()?;
    let domain = address::normalize_domain(&raw)
        .ok()
        .filter(|d| !d.is_empty())
        .ok_or_else(|| name.error(format!("{raw:?} is not a domain")))?;
    Ok((domain, levels))
}

/// Form-urlencoding, as queued names its files (REFERENCE §1.4).
fn escape(domain: &str) -> String {
    tambo_common::address::form_urlencode(domain)
}

/// The record as queued writes it.
fn format(domain: &str, levels: [usize; 2]) -> String {
    let quoted = domain.replace('\\', "\\\\").replace('"', "\\\"");
    let mut s = format!("name: \"{quoted}\"\n");
    if levels[0] > 0 {
        s.push_str(&format!("incoming_sec_level: {}\n", LEVELS[levels[0]]));
    }
    if levels[1] > 0 {
        s.push_str(&format!("outgoing_sec_level: {}\n", LEVELS[levels[1]]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_normalised_merged_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        // As chasquid's prototext writes them (two spaces after the colon
        // at random), one spelling in A-labels, one in Unicode.
        put(
            "s:xn--bcher-kva.example",
            "name:  \"xn--bcher-kva.example\"\nincoming_sec_level:  TLS_CLIENT\n",
        );
        put(
            "s:b%C3%BCcher.example",
            "name: \"bücher.example\"\noutgoing_sec_level: 2\n",
        );
        put("s:plain.example", "name: \"Plain.Example\"\n");
        put(
            "s:bad",
            "name: \"bad.example\"\noutgoing_sec_level: TLS_MAYBE\n",
        );
        put("s:noname", "incoming_sec_level: TLS_CLIENT\n");
        put("README", "not a record\n");
        let r = convert_dir(dir.path()).unwrap();
        assert_eq!(
            r.files,
            [
                (
                    "s:b%C3%BCcher.example".to_string(),
                    "name: \"bücher.example\"\nincoming_sec_level: TLS_CLIENT\noutgoing_sec_level: TLS_INSECURE\n"
                        .to_string()
                ),
                (
                    "s:plain.example".to_string(),
                    "name: \"plain.example\"\n".to_string()
                ),
            ]
        );
        let notes = r.notes.join("\n");
        assert!(
            notes.contains("s:bad:2: outgoing_sec_level: unknown security level \"TLS_MAYBE\""),
            "{notes}"
        );
        assert!(notes.contains("s:noname:1: no name"), "{notes}");
        assert_eq!(r.notes.len(), 2);
        assert!(convert_dir(&dir.path().join("none")).is_err());
    }
}
