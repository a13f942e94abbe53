//! `tambo import-chasquid <chasquid_dir> [--to <tambo_dir>]`: a chasquid
//! installation's configuration, turned into tambo's, so switching is one
//! command and nobody resets a password.
//!
//! chasquid.conf becomes tambo.conf ([`conf`]), each users file is
//! converted ([`userdb`]: scrypt entries become PHC hashes, `denied` users
//! receive-only), aliases, DKIM keys, certificates and hooks are copied,
//! and the domaininfo in chasquid's data directory is rewritten into
//! tambo's ([`domaininfo`]). What cannot be carried over is named, one
//! line each, never dropped silently.
//!
//! Everything is read and checked first (with tambo's own parsers, so
//! what is written loads), and only then written: an error leaves the
//! target as it was. No file is ever replaced (each is linked into place
//! only if its name is free), except the package's untouched default
//! tambo.conf; chasquid's directory is only read.

mod conf;
mod domaininfo;
mod prototext;
mod userdb;
mod write;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tambo_common::aliases::Aliases;
use tambo_common::config::Config;
use tambo_common::{dkimkey, domains};

use write::{Plan, Reader, What};

/// An admin command's failure: one line for stderr.
pub type Error = String;

/// `tambo import-chasquid`.
pub fn run(from: &Path, to: &Path) -> Result<String, Error> {
    let absolute = |p: &Path| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
    let (from, to) = (absolute(from)?, absolute(to)?);
    let conf_path = from.join("chasquid.conf");
    let data = fs::read(&conf_path).map_err(|e| {
        format!(
            "{}: cannot read: {e} (is {} chasquid's configuration directory?)",
            conf_path.display(),
            from.display()
        )
    })?;
    if write::real(&to).starts_with(write::real(&from)) {
        return Err(format!(
            "{}: inside chasquid's directory, which the import never changes: choose another --to",
            to.display()
        ));
    }
    let conf = conf::convert(&data, &conf_path, &from, &to)?;
    let mut plan = Plan::new(&to, &conf.config);
    plan.notes.extend(conf.notes.iter().cloned());
    plan.add(
        to.join("tambo.conf"),
        What::file(conf.text.as_bytes(), 0o644),
    );
    plan.done.push(format!(
        "tambo.conf: {}",
        if conf.keys.is_empty() {
            "no settings (chasquid's defaults are tambo's)".to_string()
        } else {
            conf.keys.join(", ")
        }
    ));
    others(&from, &conf.chasquid_data_dir, &mut plan)?;
    import_domains(&from, &to, &conf.config, &mut plan)?;
    import_certs(&from, &to, &mut plan)?;
    import_hooks(&from, &to, &mut plan)?;
    import_state(&conf, &mut plan)?;
    plan.check()?;
    plan.write()?;
    let mut out = format!("Imported {} into {}:\n", from.display(), to.display());
    for line in &plan.done {
        out.push_str(&format!("  {line}\n"));
    }
    // What was left out first, then the differences worth knowing.
    let (notes, lost): (Vec<&String>, Vec<&String>) =
        plan.notes.iter().partition(|n| n.starts_with("note:"));
    for line in lost.into_iter().chain(notes) {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "Check it with: tambo check-config --config_dir {}\n",
        to.display()
    ));
    Ok(out)
}

/// "1 alias", "2 aliases".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The names in `dir`, sorted, or an error line.
fn entries(dir: &Path) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| format!("{}: cannot read: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("{}: cannot read: {e}", dir.display()))?;
        match e.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => {
                return Err(format!(
                    "{}: a name that is not UTF-8: {n:?}",
                    dir.display()
                ));
            }
        }
    }
    names.sort();
    Ok(names)
}

/// A file's bytes and permission bits.
fn read(path: &Path) -> Result<(Vec<u8>, u32), Error> {
    let cannot = |e: std::io::Error| format!("{}: cannot read: {e}", path.display());
    let mode = fs::metadata(path).map_err(cannot)?.permissions().mode() & 0o777;
    Ok((fs::read(path).map_err(cannot)?, mode))
}

/// What a symbolic link points to, absolute: relative to where it was, so
/// the copy points to the same file (a Let's Encrypt `live/` entry keeps
/// following renewals).
fn link_target(link: &Path) -> Result<PathBuf, Error> {
    let t = fs::read_link(link).map_err(|e| format!("{}: {e}", link.display()))?;
    Ok(match link.parent() {
        Some(dir) if t.is_relative() => dir.join(t),
        _ => t,
    })
}

/// Top-level entries of chasquid's directory tambo has no use for (its
/// data directory, if it is there, is [`import_state`]'s).
fn others(from: &Path, data_dir: &Path, plan: &mut Plan) -> Result<(), Error> {
    let data_dir = write::real(data_dir);
    for name in entries(from)? {
        let known = matches!(
            name.as_str(),
            "chasquid.conf" | "certs" | "domains" | "hooks"
        );
        if !known && write::real(&from.join(&name)) != data_dir {
            plan.notes
                .push(format!("not carried over: {name} (tambo does not read it)"));
        }
    }
    Ok(())
}

/// `domains/<domain>/`: users converted, aliases and DKIM keys checked
/// with tambo's parsers and copied. A directory tambo would refuse is an
/// error (fix it in chasquid's directory, which both then accept).
fn import_domains(from: &Path, to: &Path, cfg: &Config, plan: &mut Plan) -> Result<(), Error> {
    let src = from.join("domains");
    let scan = if src.is_dir() {
        domains::scan_domain_dirs(&src).map_err(|e| {
            format!("{e} (tambo would refuse it: fix it in chasquid's directory first)")
        })?
    } else {
        domains::DomainDirs::default()
    };
    for (path, why) in &scan.ignored {
        plan.notes
            .push(format!("not carried over: {} ({why})", path.display()));
    }
    if scan.found.is_empty() {
        plan.notes.push(
            "not carried over: domains (chasquid's directory has none; tambo needs at least one domain)"
                .into(),
        );
    }
    for (domain, dir) in &scan.found {
        let Some(name) = dir.file_name() else {
            continue;
        };
        let dest = to.join("domains").join(name);
        plan.add(dest.clone(), What::Dir);
        let mut parts = Vec::new();
        let mut keys = 0;
        for file in entries(dir)? {
            let path = dir.join(&file);
            if file == "users" {
                let (data, mode) = read(&path)?;
                let users = userdb::convert(&data, &path, domain)?;
                parts.push(format!(
                    "{} ({} receive-only)",
                    count(users.total, "user", "users"),
                    users.receive_only
                ));
                plan.notes.extend(users.notes);
                // Never more open than chasquid had it, never group-writable.
                plan.add_read_by(
                    dest.join("users"),
                    users.text.as_bytes(),
                    mode & 0o640,
                    Reader::Queued,
                );
            } else if file == "aliases" {
                let (data, mode) = read(&path)?;
                let text = String::from_utf8(data.clone())
                    .map_err(|_| format!("{}: not UTF-8", path.display()))?;
                let aliases = Aliases::parse(
                    &text,
                    &path,
                    domain,
                    &cfg.drop_characters,
                    &cfg.suffix_separators,
                )
                .map_err(|e| {
                    format!("{e} (tambo would refuse it: fix it in chasquid's file first)")
                })?;
                parts.push(count(aliases.len(), "alias", "aliases"));
                plan.add_read_by(dest.join("aliases"), &data, mode, Reader::Queued);
            } else if let Some(selector) = dkimkey::selector_of(&file) {
                let (data, mode) = read(&path)?;
                let problem = if !dkimkey::valid_selector(selector) {
                    Some(format!("selector {selector:?} is not a DNS label"))
                } else {
                    dkimkey::parse(&data).err()
                };
                match problem {
                    // queued would refuse to start with it.
                    Some(why) => plan
                        .notes
                        .push(format!("not carried over: {} ({why})", path.display())),
                    None => {
                        keys += 1;
                        plan.add_read_by(dest.join(&file), &data, mode, Reader::Queued);
                    }
                }
            } else if file == "dkim_selector" {
                plan.notes.push(format!(
                    "not carried over: {} (DKIM signing by the post-data hook; tambo signs \
                     itself with domains/{domain}/dkim:<selector>.pem: see docs/operations.md, DKIM)",
                    path.display()
                ));
            } else {
                plan.notes.push(format!(
                    "not carried over: {} (tambo does not read it)",
                    path.display()
                ));
            }
        }
        if keys > 0 {
            parts.push(count(keys, "DKIM key", "DKIM keys"));
        }
        if parts.is_empty() {
            parts.push("empty".into());
        }
        plan.done
            .push(format!("domain {domain}: {}", parts.join(", ")));
    }
    Ok(())
}

/// `certs/<name>/`: copied file by file, or, where chasquid had a link
/// (to /etc/letsencrypt/live/<name>, say), linked to the same place, so
/// renewals reach tambo too.
fn import_certs(from: &Path, to: &Path, plan: &mut Plan) -> Result<(), Error> {
    let src = from.join("certs");
    let Ok(meta) = fs::symlink_metadata(&src) else {
        plan.notes.push(
            "not carried over: certs (chasquid's directory has none; tambo needs a certificate)"
                .into(),
        );
        return Ok(());
    };
    // A linked certs/ (to /etc/letsencrypt/live) is followed, and each
    // certificate linked where it really is.
    let (base, linked) = if meta.is_symlink() {
        (link_target(&src)?, true)
    } else {
        (src, false)
    };
    let mut certificates = 0;
    for name in entries(&base)? {
        let path = base.join(&name);
        let dest = to.join("certs").join(&name);
        let is_link = fs::symlink_metadata(&path).is_ok_and(|m| m.is_symlink());
        if !path.is_dir() {
            plan.notes.push(format!(
                "not carried over: {} (not a certificate directory)",
                path.display()
            ));
        } else if is_link || linked {
            let target = if is_link { link_target(&path)? } else { path };
            plan.done.push(format!(
                "certificate {name}: a link to {}",
                target.display()
            ));
            plan.add(dest, What::Link(target));
            certificates += 1;
        } else {
            for file in entries(&path)? {
                copy_entry(&path.join(&file), &dest.join(&file), Reader::Queued, plan)?;
            }
            plan.done.push(format!("certificate {name}"));
            certificates += 1;
        }
    }
    if certificates == 0 {
        plan.notes.push(
            "not carried over: certificates (chasquid's certs/ has none; tambo needs one)".into(),
        );
    }
    Ok(())
}

/// `hooks/`: every hook (and any helper beside them) as it is, modes
/// included; tambo runs chasquid's hooks with chasquid's arguments and
/// environment (REFERENCE §6).
fn import_hooks(from: &Path, to: &Path, plan: &mut Plan) -> Result<(), Error> {
    let src = from.join("hooks");
    if !src.is_dir() {
        return Ok(());
    }
    let names = entries(&src)?;
    for name in &names {
        copy_entry(
            &src.join(name),
            &to.join("hooks").join(name),
            Reader::Deliverd,
            plan,
        )?;
    }
    if !names.is_empty() {
        plan.done.push(format!("hooks: {}", names.join(", ")));
    }
    Ok(())
}

/// One file (its bytes and mode) or link (its target); a directory is
/// named, not copied.
fn copy_entry(src: &Path, dest: &Path, reader: Reader, plan: &mut Plan) -> Result<(), Error> {
    let meta = fs::symlink_metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if meta.is_symlink() {
        plan.add(dest.to_path_buf(), What::Link(link_target(src)?));
    } else if meta.is_file() {
        let (data, mode) = read(src)?;
        plan.add_read_by(dest.to_path_buf(), &data, mode, reader);
    } else {
        plan.notes
            .push(format!("not carried over: {} (not a file)", src.display()));
    }
    Ok(())
}

/// chasquid's data directory: the domaininfo carried into tambo's, and a
/// word about queued mail, which is not (another format).
fn import_state(conf: &conf::Converted, plan: &mut Plan) -> Result<(), Error> {
    let src = conf.chasquid_data_dir.join("domaininfo");
    let dest = conf.config.domaininfo_dir();
    if src.is_dir() && write::real(&src) != write::real(&dest) {
        let records = domaininfo::convert_dir(&src)?;
        plan.notes.extend(records.notes);
        plan.done.push(format!(
            "domaininfo: {}, from {} into {}",
            count(records.files.len(), "domain", "domains"),
            src.display(),
            dest.display()
        ));
        for (name, text) in records.files {
            // As queued writes them.
            plan.add(dest.join(name), What::file(text.as_bytes(), 0o600));
        }
    } else {
        plan.done
            .push(format!("domaininfo: none in {}", src.display()));
    }
    let queue = conf.chasquid_data_dir.join("queue");
    let queued = fs::read_dir(&queue)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("m:"))
                .count()
        })
        .unwrap_or(0);
    if queued > 0 {
        plan.notes.push(format!(
            "not carried over: {} in chasquid's queue, {} (tambo's queue is another \
             format: let chasquid deliver them before switching)",
            count(queued, "message", "messages"),
            queue.display()
        ));
    }
    Ok(())
}
