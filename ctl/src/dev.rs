//! `tambo dev`: a whole tambo on loopback ports, as the current user, with
//! a config and state directory created on first use (kept afterwards, so
//! edits to it stick).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use password_hash::{PasswordHasher, SaltString};
use tambo_proto::activation::Inherited;

pub const DOMAIN: &str = "tambo.test";
pub const USER: &str = "user";
pub const PASSWORD: &str = "tambo-dev-password";
/// The ports written into a new dev config; `tambo dev` prints what it
/// actually bound, since the config may have been edited since.
pub const SMTP_PORT: u16 = 2525;
pub const SUBMISSION_PORT: u16 = 2587;
pub const SUBMISSION_TLS_PORT: u16 = 2465;
pub const MONITORING: &str = "127.0.0.1:1099";

pub async fn run(state_dir: &Path, overrides: Option<String>, inherited: Inherited) -> ExitCode {
    let state = match absolute(state_dir) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{}: {e}", state_dir.display());
            return ExitCode::FAILURE;
        }
    };
    let config_dir = state.join("config");
    if let Err(e) = create(&state, &config_dir) {
        tracing::error!("cannot create the dev state in {}: {e}", state.display());
        return ExitCode::FAILURE;
    }
    if let Err(e) = ensure_certificate(&config_dir) {
        tracing::error!("cannot create the dev certificate: {e}");
        return ExitCode::FAILURE;
    }
    let maildir = state.join("mail").join(DOMAIN).join(USER);
    // Bind first, then print what was bound: the config may have been
    // edited since it was written.
    let prepared = match crate::supervisor::prepare(&config_dir, overrides, inherited) {
        Ok(p) => p,
        Err(e) => return tambo_common::daemon::startup_failed(e),
    };
    let bound = prepared.smtp_addrs();
    let of = |mode: &str| -> Vec<std::net::SocketAddr> {
        bound
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, a)| *a)
            .collect()
    };
    let list = |addrs: &[std::net::SocketAddr]| -> String {
        if addrs.is_empty() {
            "none".to_string()
        } else {
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let (smtp, submission, tls) = (of("smtp"), of("submission"), of("submission_tls"));
    let monitoring = match prepared.monitoring_addr() {
        Some(a) => format!("http://{a}/  (counters: http://{a}/debug/vars)"),
        None => "none (monitoring_address is empty)".to_string(),
    };
    let mut try_it = String::new();
    if let Some(a) = smtp.first() {
        try_it.push_str(&format!(
            "send a test message:\n  swaks --server {a} --from you@example.test --to {USER}@{DOMAIN}\n"
        ));
    }
    if let Some(a) = submission.first() {
        try_it.push_str(&format!(
            "submit one as the test user (STARTTLS, AUTH; the certificate is self-signed):\n  swaks --server {a} --tls --auth PLAIN --auth-user {USER}@{DOMAIN} --auth-password {PASSWORD} --from {USER}@{DOMAIN} --to someone@example.com\n"
        ));
    }
    println!(
        "\ntambo dev: everything runs as you, state in {state}
  SMTP:        {smtp}
  submission:  {submission} (STARTTLS), {tls} (TLS)
  monitoring:  {monitoring}
  config:      {config}
  test user:   {USER}@{DOMAIN} (password {PASSWORD})
  Maildir:     {maildir}
{try_it}stop with Ctrl-C.\n",
        smtp = list(&smtp),
        submission = list(&submission),
        tls = list(&tls),
        state = state.display(),
        config = config_dir.display(),
        maildir = maildir.display(),
    );
    crate::supervisor::serve(prepared).await
}

fn absolute(p: &Path) -> std::io::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// Writes the dev config unless it already exists.
fn create(state: &Path, config_dir: &Path) -> Result<(), String> {
    let conf = config_dir.join("tambo.conf");
    if conf.exists() {
        return Ok(());
    }
    let domain_dir = config_dir.join("domains").join(DOMAIN);
    std::fs::create_dir_all(&domain_dir).map_err(|e| format!("{}: {e}", domain_dir.display()))?;
    for sub in ["data", "run", "mail"] {
        std::fs::create_dir_all(state.join(sub)).map_err(|e| e.to_string())?;
    }
    let text = format!(
        "# tambo development config, written by `tambo dev`. Edit freely: it is
# kept across runs. Reference: docs/config.md.
hostname = \"localhost\"
smtp_address = [\"127.0.0.1:{SMTP_PORT}\"]
submission_address = [\"127.0.0.1:{SUBMISSION_PORT}\"]
submission_over_tls_address = [\"127.0.0.1:{SUBMISSION_TLS_PORT}\"]
monitoring_address = \"{MONITORING}\"
data_dir = \"{data}\"
mail_log_path = \"<stderr>\"

[tambo]
runtime_dir = \"{run}\"
maildir = \"{mail}/%to_domain%/%to_user%\"
# Development: every daemon runs as you, so the IPC uid check cannot tell
# them apart (tambo says so at startup). A real installation gives each
# its own user (docs/architecture.md).
smtpd_user = \"{me}\"
queued_user = \"{me}\"
deliverd_user = \"{me}\"
monitord_user = \"{me}\"
",
        data = state.join("data").display(),
        run = state.join("run").display(),
        mail = state.join("mail").display(),
        me = current_user()?,
    );
    let hash = hash_password(PASSWORD)?;
    std::fs::write(
        domain_dir.join("users"),
        format!("# user <PHC hash>\n{USER} {hash}\n"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        domain_dir.join("aliases"),
        format!("# Role accounts go to the test user.\npostmaster: {USER}\nabuse: {USER}\n"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))
}

/// A self-signed certificate for `localhost` (the dev host name), made at
/// the first start, or whenever `certs/` is gone.
fn ensure_certificate(config_dir: &Path) -> Result<(), String> {
    let dir = config_dir.join("certs").join("localhost");
    // Certificates of the developer's own are kept; an empty certs/ (or
    // one whose pair was never finished) gets ours.
    let has_any = std::fs::read_dir(config_dir.join("certs"))
        .map(|mut d| d.any(|e| e.is_ok_and(|e| e.path().join("privkey.pem").exists())))
        .unwrap_or(false);
    if has_any {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string()]).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost (tambo dev)");
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    // The chain first, the key (private: umask 077) last: a directory with
    // its key holds a whole pair, which is what the check above trusts.
    std::fs::write(dir.join("fullchain.pem"), cert.pem())
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(dir.join("privkey.pem"), key.serialize_pem())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// The name of the user running `tambo dev`.
fn current_user() -> Result<String, String> {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => Ok(u.name),
        _ => Err(format!("uid {uid} has no user name; tambo dev needs one")),
    }
}

/// A PHC scrypt hash with chasquid's parameters (N=2^14, r=8, p=1, 32-byte
/// key, 16-byte salt).
pub fn hash_password(pw: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    let params = scrypt::Params::new(14, 8, 1, 32).map_err(|e| e.to_string())?;
    scrypt::Scrypt
        .hash_password_customized(pw.as_bytes(), None, None, params, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}
