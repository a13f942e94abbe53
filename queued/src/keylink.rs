//! smtpd's key link: the connection over which smtpd gets the certificate
//! chains and asks for each TLS handshake signature (DESIGN: the TLS keys
//! never enter smtpd). Only handshake-shaped inputs are signed
//! ([`crate::handshake`]), at most [`RATE`] a second per link (with bursts
//! of [`BURST`]), on the shared bounded [`crate::pool::CpuPool`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use tambo_proto::Error;
use tambo_proto::frame::{FrameReader, MAX_SMALL_FRAME, write_frame};
use tambo_proto::metrics::{self, names};
use tambo_proto::submit::{SubmitReply, SubmitRequest};

use crate::certs::Certs;
use crate::pool::CpuPool;

/// Signatures per second one key link may ask for, on average.
pub const RATE: f64 = 500.0;
/// How many it may ask for at once after a quiet spell.
pub const BURST: f64 = 1000.0;

/// A token bucket: `RATE` a second, at most `BURST` saved up.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Self {
            tokens: BURST,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE).min(BURST);
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
    pub certs: std::sync::RwLock<Arc<Certs>>,
    pub pool: Arc<CpuPool>,
}

impl KeyService {
    fn certs(&self) -> Arc<Certs> {
        self.certs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Serves a key link after its `KeyLink` request, until it closes.
pub async fn serve(
    keys: &KeyService,
    mut reader: FrameReader<OwnedReadHalf>,
    mut writer: OwnedWriteHalf,
    idle: Duration,
    write_timeout: Duration,
) -> Result<(), Error> {
    let mut bucket = Bucket::new(Instant::now());
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
                if !bucket.take(Instant::now()) {
                    metrics::inc_label(names::TLS_SIGN_REFUSED, "rate");
                    SubmitReply::SignRefused("over the signature rate of this link".into())
                } else {
                    let certs = keys.certs();
                    let signed = keys
                        .pool
                        .run(move || certs.sign(&cert, scheme, &message))
                        .await
                        .map_err(Error::Decode)?;
                    match signed {
                        Ok(sig) => {
                            metrics::inc(names::TLS_SIGNATURES);
                            SubmitReply::Signature(sig)
                        }
                        Err(e) => {
                            metrics::inc_label(names::TLS_SIGN_REFUSED, "input");
                            tracing::warn!("key link: refused to sign: {e}");
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
        let mut b = Bucket::new(t0);
        for _ in 0..BURST as usize {
            assert!(b.take(t0));
        }
        assert!(!b.take(t0), "the burst is spent");
        // 10 ms later: 5 more.
        let t1 = t0 + Duration::from_millis(10);
        let mut n = 0;
        while b.take(t1) {
            n += 1;
        }
        assert_eq!(n, (RATE / 100.0) as usize);
    }
}
