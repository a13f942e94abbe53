//! `tambo check-config` and `tambo print-config`.
//!
//! check-config reads a config directory the way the daemons will: the
//! config file here, then every file queued reads at startup (users,
//! aliases, DKIM keys, certificates) by `tambo-queued --check_config`, the
//! same code with the same one-line errors, as queued's user (dropped to
//! when run as root). The mail log, the queue and the sockets are not
//! tried.

use std::path::Path;
use std::process::Command;

use tambo_common::config::Config;

/// `tambo print-config`: the effective config, defaults included, as TOML.
pub fn print(config_dir: &Path) -> Result<String, String> {
    let cfg = Config::load(config_dir, None).map_err(|e| e.to_string())?;
    Ok(cfg.to_toml())
}

/// `tambo check-config`: `Ok` with a summary when every daemon would start
/// with this config; `Err` with the error line otherwise (queued's own
/// errors are already on stderr then, and the line says so).
pub fn check(config_dir: &Path) -> Result<String, String> {
    Config::load(config_dir, None).map_err(|e| e.to_string())?;
    let queued = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("tambo-queued")))
        .filter(|p| p.is_file())
        .ok_or("tambo-queued is not installed beside tambo: cannot check the files it reads")?;
    let out = Command::new(&queued)
        .arg("--config_dir")
        .arg(config_dir)
        .arg("--check_config")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", queued.display()))?;
    // queued's warnings and errors, one per line, as it wrote them.
    let errors = String::from_utf8_lossy(&out.stderr);
    for line in errors.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("{line}");
    }
    if !out.status.success() {
        return Err(format!(
            "{}: not a working configuration",
            config_dir.display()
        ));
    }
    let mut summary = String::from_utf8_lossy(&out.stdout).into_owned();
    summary.push_str(&format!("{}: OK\n", config_dir.display()));
    Ok(summary)
}
