//! `tambo dkim-verify [--txt=<record>]`: verifies the DKIM signatures of
//! the message on standard input with deliverd's verifier (the same code,
//! [`tambo_common::dkimverify`]) and prints the Authentication-Results
//! header it would add; `-v` adds one line per signature.
//!
//! The keys come from the DNS (the system's resolver), or, with `--txt`,
//! from the given record for every signature (to check a key before
//! publishing it).

use std::io::{Seek, Write};
use std::path::Path;
use std::sync::Arc;

use mail_auth::MessageAuthenticator;
use tambo_common::config::Config;
use tambo_common::dkimverify::{self, KeyError, KeySource};

/// Where the keys come from.
#[derive(Clone)]
enum Keys {
    /// `--txt`: this record, whatever the name.
    Given(Arc<Vec<u8>>),
    Dns(Arc<MessageAuthenticator>),
}

impl KeySource for Keys {
    async fn txt(&self, name: String) -> Result<Vec<Vec<u8>>, KeyError> {
        match self {
            Keys::Given(r) => Ok(vec![r.as_ref().clone()]),
            Keys::Dns(a) => a.txt(name).await,
        }
    }
}

/// The Authentication-Results header for `message`, and with `verbose`
/// one line per signature.
pub fn verify(
    config_dir: &Path,
    message: &[u8],
    txt: Option<String>,
    verbose: bool,
) -> Result<String, String> {
    let cfg = Config::load(config_dir, None)
        .map(Config::resolve_paths)
        .unwrap_or_else(|_| Config::defaults(config_dir));
    let mut file =
        tempfile::tempfile().map_err(|e| format!("cannot make a temporary file: {e}"))?;
    file.write_all(&crate::dkim::crlf(message))
        .and_then(|()| file.rewind())
        .map_err(|e| format!("cannot write a temporary file: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async {
        let resolver = tambo_common::dns::resolver(&cfg)?;
        let auth = Arc::new(MessageAuthenticator(resolver));
        let keys = match txt {
            Some(r) => Keys::Given(Arc::new(r.into_bytes())),
            None => Keys::Dns(auth.clone()),
        };
        let sigs = dkimverify::verify(&auth, &keys, Arc::new(file)).await?;
        let mut out =
            tambo_common::authres::header(&cfg.hostname, None, Some(&sigs)).unwrap_or_default();
        if verbose {
            for s in &sigs {
                out.push_str(&format!("# d={}: {:?}\n", s.domain, s.result));
            }
        }
        Ok(out)
    })
}
