//! smtpd's key link: the connection over which smtpd gets the certificate
//! chains and asks for each TLS handshake signature (DESIGN: the TLS keys
//! never enter smtpd). Only handshake-shaped inputs are signed
//! ([`crate::handshake`]), at most `[tambo] max_tls_signatures_per_second`
//! over all links together (bursts of twice that), on the shared bounded
//! [`crate::pool::CpuPool`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use tambo_common::loglimit::{LogLimiter, skipped};
use tambo_proto::Error;
use tambo_proto::frame::{FrameReader, MAX_SMALL_FRAME, write_frame};
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{CertId, SubmitReply, SubmitRequest};

use crate::certs::{Certs, SignError};
use crate::pool::CpuPool;

/// A token bucket: `rate` a second, at most twice as many saved up. One
/// for all key links together, so opening more links gets smtpd nothing.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: 2.0 * rate,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the key links share.
pub struct KeyService {
    certs: std::sync::RwLock<Generations>,
    pool: Arc<CpuPool>,
    bucket: std::sync::Mutex<Bucket>,
    /// Refusals are logged at most once a second (all are counted).
    refusals: LogLimiter,
    /// How long the keys of replaced certificates still sign: smtpd learns
    /// of a reload on its next poll, and handshakes it began with the old
    /// certificate in between must not fail.
    grace: Duration,
}

/// The certificates in use, and those they replaced (until a deadline).
struct Generations {
    current: Arc<Certs>,
    /// Each replaced set with the end of its grace, newest first. Every
    /// set keeps its own deadline, so two reloads in a row (a renewal,
    /// then a SIGHUP from certbot's deploy hook) do not cut short the
    /// grace of the first.
    previous: Vec<(Arc<Certs>, Instant)>,
}

impl KeyService {
    /// `grace` should cover smtpd's poll period with room to spare;
    /// `rate` is `[tambo] max_tls_signatures_per_second`.
    pub fn new(certs: Certs, pool: Arc<CpuPool>, grace: Duration, rate: u32) -> Self {
        Self {
            bucket: std::sync::Mutex::new(Bucket::new(rate, Instant::now())),
            refusals: LogLimiter::new(),
            certs: std::sync::RwLock::new(Generations {
                current: Arc::new(certs),
                previous: Vec::new(),
            }),
            pool,
            grace,
        }
    }

    /// Loads the certificates again when their files changed (or when
    /// `force`, on SIGHUP). A broken new file keeps the old certificates in
    /// use, with one clear line; smtpd picks up new ones for new
    /// connections.
    pub fn reload(
        &self,
        config_dir: &std::path::Path,
        force: bool,
        last: &mut crate::certs::FilesState,
    ) {
        // Keys past their grace leave memory on the next tick, whatever
        // the files do.
        {
            let t = Instant::now();
            let mut g = self.certs.write().unwrap_or_else(|e| e.into_inner());
            g.previous.retain(|(_, until)| t < *until);
        }
        let now = crate::certs::files_state(config_dir);
        if !force && &now == last {
            return;
        }
        *last = now;
        match Certs::load(config_dir) {
            Ok(c) => {
                let now = Instant::now();
                let mut g = self.certs.write().unwrap_or_else(|e| e.into_inner());
                let old = std::mem::replace(&mut g.current, Arc::new(c));
                // The same certificates loaded again (a SIGHUP with nothing
                // new) need no grace: smtpd already has the current ids.
                if old.ids() != g.current.ids() {
                    g.previous.insert(0, (old, now + self.grace));
                }
                tracing::info!("certificates reloaded");
            }
            Err(e) => {
                tambo_proto::metrics::inc_label(
                    tambo_proto::metrics::names::CONFIG_RELOAD_ERRORS,
                    "certificates",
                );
                tracing::error!("certificates not reloaded, keeping the previous ones: {e}");
            }
        }
    }

    fn certs(&self) -> Arc<Certs> {
        self.certs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }

    /// Signs with the current certificates, or with those just replaced
    /// while their grace lasts.
    fn sign(&self, id: &CertId, scheme: u16, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let now = Instant::now();
        let sets: Vec<Arc<Certs>> = {
            let g = self.certs.read().unwrap_or_else(|e| e.into_inner());
            std::iter::once(g.current.clone())
                .chain(
                    g.previous
                        .iter()
                        .filter(|(_, until)| now < *until)
                        .map(|(c, _)| c.clone()),
                )
                .collect()
        };
        for certs in sets {
            match certs.sign(id, scheme, message) {
                Err(SignError::UnknownCert) => continue,
                r => return r,
            }
        }
        Err(SignError::UnknownCert)
    }
}

/// Serves a key link after its `KeyLink` request, until it closes.
pub async fn serve(
    keys: &Arc<KeyService>,
    mut reader: FrameReader<OwnedReadHalf>,
    mut writer: OwnedWriteHalf,
    idle: Duration,
    write_timeout: Duration,
) -> Result<(), Error> {
    let mut reply = SubmitReply::Certificates(keys.certs().entries());
    loop {
        tokio::time::timeout(write_timeout, write_frame(&mut writer, &reply))
            .await
            .map_err(|_| Error::Io(std::io::ErrorKind::TimedOut.into()))??;
        let req = match tokio::time::timeout(idle, reader.read(MAX_SMALL_FRAME)).await {
            Err(_) => return Err(Error::Idle(idle)),
            Ok(r) => match r? {
                Some(req) => req,
                None => return Ok(()),
            },
        };
        reply = match req {
            SubmitRequest::Certificates => SubmitReply::Certificates(keys.certs().entries()),
            SubmitRequest::Ping => SubmitReply::Ok,
            SubmitRequest::Sign {
                cert,
                scheme,
                message,
            } => {
                let allowed = keys
                    .bucket
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(Instant::now());
                if !allowed {
                    metrics::inc_label(names::TLS_SIGN_REFUSED, "rate");
                    SubmitReply::SignRefused("over max_tls_signatures_per_second".into())
                } else {
                    let k = keys.clone();
                    let signed = keys
                        .pool
                        .run(move || k.sign(&cert, scheme, &message))
                        .await
                        .unwrap_or_else(|e| {
                            Err(SignError::Failed(format!("the signing task: {e}")))
                        });
                    match signed {
                        Ok(sig) => {
                            metrics::inc(names::TLS_SIGNATURES);
                            SubmitReply::Signature(sig)
                        }
                        Err(e) => {
                            metrics::inc_label(names::TLS_SIGN_REFUSED, "input");
                            if let Some(n) = keys.refusals.allow() {
                                tracing::warn!("key link: refused to sign: {e}{}", skipped(n));
                            }
                            SubmitReply::SignRefused(e.to_string())
                        }
                    }
                }
            }
            _ => return Err(Error::Unexpected("a session request on a key link")),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_a_burst_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(500, t0);
        for _ in 0..1000 {
            assert!(b.take(t0));
        }
        assert!(!b.take(t0), "the burst is spent");
        // 10 ms later: 5 more.
        let t1 = t0 + Duration::from_millis(10);
        let mut n = 0;
        while b.take(t1) {
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn replaced_keys_sign_during_the_grace_only() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::tests::write_cert(dir.path(), "mx", "mx.example");
        let pool = Arc::new(CpuPool::new(1));
        let scheme = u16::from(rustls::SignatureScheme::ECDSA_NISTP256_SHA256);
        let cv = crate::handshake::tests::tls13_certificate_verify(32);
        for (grace, old_signs) in [(Duration::from_secs(60), true), (Duration::ZERO, false)] {
            let keys = KeyService::new(Certs::load(dir.path()).unwrap(), pool.clone(), grace, 10);
            let old = keys.certs().entries()[0].id;
            crate::certs::tests::write_cert(dir.path(), "mx", "mx.example");
            keys.reload(dir.path(), true, &mut Vec::new());
            let new = keys.certs().entries()[0].id;
            assert_ne!(old, new);
            assert!(keys.sign(&new, scheme, &cv).is_ok());
            assert_eq!(
                keys.sign(&old, scheme, &cv).is_ok(),
                old_signs,
                "grace {grace:?}"
            );
        }
    }

    #[test]
    fn each_replaced_set_keeps_its_own_grace() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::tests::write_cert(dir.path(), "mx", "mx.example");
        let keys = KeyService::new(
            Certs::load(dir.path()).unwrap(),
            Arc::new(CpuPool::new(1)),
            Duration::from_secs(60),
            10,
        );
        let scheme = u16::from(rustls::SignatureScheme::ECDSA_NISTP256_SHA256);
        let cv = crate::handshake::tests::tls13_certificate_verify(32);
        let first = keys.certs().entries()[0].id;
        // A renewal, then a SIGHUP that loads the same files again, then
        // another renewal: the first key still signs.
        crate::certs::tests::write_cert(dir.path(), "mx", "mx.example");
        keys.reload(dir.path(), false, &mut Vec::new());
        keys.reload(dir.path(), true, &mut Vec::new());
        crate::certs::tests::write_cert(dir.path(), "mx", "mx.example");
        keys.reload(dir.path(), false, &mut Vec::new());
        assert!(keys.sign(&first, scheme, &cv).is_ok());
        // Forced reloads of unchanged files add nothing to keep.
        let kept = keys.certs.read().unwrap().previous.len();
        keys.reload(dir.path(), true, &mut Vec::new());
        assert_eq!(keys.certs.read().unwrap().previous.len(), kept);
    }

    #[test]
    fn a_broken_renewal_keeps_the_certificates_in_use() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::tests::write_cert(dir.path(), "mx", "mx.example");
        let keys = KeyService::new(
            Certs::load(dir.path()).unwrap(),
            Arc::new(CpuPool::new(1)),
            Duration::ZERO,
            10,
        );
        let id = keys.certs().entries()[0].id;
        std::fs::write(dir.path().join("certs/mx/privkey.pem"), "not a key").unwrap();
        let mut last = Vec::new();
        keys.reload(dir.path(), false, &mut last);
        assert_eq!(keys.certs().entries()[0].id, id);
        assert!(
            !last.is_empty(),
            "the broken state is remembered, not retried each tick"
        );
    }
}
