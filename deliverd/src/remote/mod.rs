//! Remote SMTP delivery (REFERENCE §4.5–4.8): every recipient of a job
//! (one remote domain, or one `via` list) in one transaction per host.
//!
//! - [`mx`]: MX selection and address lookups.
//! - [`session`]: connect, EHLO, STARTTLS, the security checks.
//! - [`tls`]: the certificate verdict (TLS_SECURE or TLS_INSECURE).
//! - [`pool`]: connections kept open for the next job.
//! - [`source`]: the source address of outgoing connections (MTA-STS
//!   fetches use it too).
//!
//! The hosts are tried in order. Recipients with a final result
//! (delivered, or refused with a 5xx) are done; those with a temporary
//! one go on to the next host, unless a host may have taken their message
//! (the connection was lost after the final dot); a permanent failure of
//! the whole transaction stops the attempt.

mod meter;
mod mx;
mod pool;
mod session;
mod source;
#[cfg(test)]
mod tests;
mod tls;

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use rustls::RootCertStore;
use tokio::time::Instant;

use tambo_common::address;
use tambo_common::config::Config;
use tambo_proto::deliver::{Job, Outcome, SecLevel, Target};
use tambo_proto::metrics::names;

use crate::smtp::client::transaction;
use crate::smtp::{Failure, Protocol, Transaction};
use crate::sts::{Mode, Policy, Sts};

use meter::Meter;
use mx::AddrError;
use pool::Pool;
use session::{Dialer, Session, Timeouts};
use tls::TlsClient;

pub(crate) use source::connect_from;

/// How long deliverd waits for an MTA-STS policy during a delivery
/// (REFERENCE §4.7); the cache bounds its own fetch too.
pub(crate) const STS_WAIT: Duration = Duration::from_secs(60);

/// An attempt's sessions end by this long after its first host was tried,
/// and no host is tried after it: queued fails a job without a result
/// after 60 minutes and retries it, and a delivery still going on here
/// then could deliver it twice. (Five MX hosts each slow to their
/// 10-minute session limit, plus DNS and MTA-STS waits, come close.)
pub(crate) const ATTEMPT_LIMIT: Duration = Duration::from_secs(50 * 60);

/// A connection with less reply budget left than this is not kept: its
/// next transaction could run out in the middle.
const MIN_BUDGET_TO_KEEP: usize = 256 * 1024;

/// What every remote delivery shares: the resolver, the TLS setup, the
/// MTA-STS cache, the open connections.
pub struct Remote {
    resolver: TokioResolver,
    sts: Arc<Sts>,
    dialer: Dialer,
    pool: Arc<Pool>,
    /// 25, or `[testing] smtp_port`.
    port: u16,
}

/// Where a job goes, as far as connection reuse and MTA-STS care.
#[derive(Debug, Clone)]
pub(crate) struct Dest {
    /// What cached connections are filed under: the MX set of a domain,
    /// or one `via` list.
    pub key: String,
    /// The recipient domain, for the failure texts.
    pub domain: String,
    /// The domain's MTA-STS policy, if any (never for `via`).
    pub policy: Option<Arc<Policy>>,
}

impl Dest {
    fn sts_enforce(&self) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|p| p.mode == Mode::Enforce)
    }

    /// Whether a session at `level` passes the checks of a job that
    /// requires `required` (what [`Dialer::check`] decides).
    fn fits(&self, level: SecLevel, required: SecLevel) -> bool {
        level >= required && (!self.sts_enforce() || level == SecLevel::TlsSecure)
    }
}

/// One host to try.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    /// The MX or `via` name (or IP address): SNI, the name the
    /// certificate must have, and what the texts name.
    pub name: String,
    /// Known addresses; None: look them up.
    pub addrs: Option<Vec<SocketAddr>>,
    /// The domain itself for lack of MX: no address at all then means
    /// the domain cannot get mail.
    pub implicit: bool,
}

/// How one host went.
enum HostResult {
    /// The same for every recipient tried there.
    All(Failure),
    /// One result per recipient tried, in order, and whether the host may
    /// have taken the message despite a failure (see
    /// [`Transaction::Each`]).
    Each {
        results: Vec<Result<(), Failure>>,
        doubt: Vec<bool>,
    },
}

impl Remote {
    pub fn new(
        cfg: Arc<Config>,
        resolver: TokioResolver,
        roots: Arc<RootCertStore>,
        sts: Arc<Sts>,
    ) -> Self {
        let hello = idna::domain_to_ascii(&cfg.hostname).unwrap_or_else(|_| cfg.hostname.clone());
        // Here, where the configuration meets the cache: policy fetches
        // leave from the same address as the mail they are for.
        sts.set_source_addresses(&cfg.tambo.outgoing_source_address);
        Remote {
            resolver,
            sts,
            dialer: Dialer {
                hello,
                sources: cfg.tambo.outgoing_source_address.clone(),
                timeouts: Timeouts::new(cfg.testing.smtp_out_timeout),
                tls: TlsClient::new(roots),
                meter: Meter::default(),
            },
            pool: Pool::new(cfg.tambo.smtp_connection_cache_time),
            port: cfg.testing.smtp_port.unwrap_or(25),
        }
    }

    /// One attempt for every recipient of a Remote or Forward job: one
    /// outcome per recipient, in order, and the security level of the
    /// connection used once it passed the job's check.
    pub async fn deliver(&self, job: &Job, message: File) -> (Vec<Outcome>, Option<SecLevel>) {
        let mut message = tokio::fs::File::from_std(message);
        match &job.target {
            Target::Remote => self.deliver_mx(job, &mut message).await,
            Target::Forward(via) => {
                let dest = Dest {
                    key: format!("via {}", via.join(" ")),
                    domain: job_domain(job),
                    policy: None,
                };
                // As many as MX hosts: the attempt's time is bounded.
                if via.len() > mx::MAX_MX {
                    tracing::warn!(id = %job.queue_id, "a via list of {} servers: only the first {} are tried", via.len(), mx::MAX_MX);
                }
                let hosts = via
                    .iter()
                    .take(mx::MAX_MX)
                    .map(|v| self.via_host(v))
                    .collect();
                self.deliver_to(job, &mut message, &dest, hosts).await
            }
            Target::Local | Target::Pipe(_) => {
                let f = Failure::temporary("internal error: not a remote job");
                (vec![f.into_outcome(); job.to.len()], None)
            }
        }
    }

    /// Through the MX hosts of the recipients' domain, as MTA-STS allows.
    async fn deliver_mx(
        &self,
        job: &Job,
        message: &mut tokio::fs::File,
    ) -> (Vec<Outcome>, Option<SecLevel>) {
        let all = |f: Failure| (vec![f.into_outcome(); job.to.len()], None);
        let domain = job.to.first().map_or("", |to| address::split(to).1);
        let ascii = match idna::domain_to_ascii(domain) {
            Ok(d) if !d.is_empty() => d,
            _ => {
                return all(Failure::permanent(format!(
                    "5.1.3 {domain:?} is not a valid domain name"
                )));
            }
        };
        // queued groups recipients by domain; were that ever wrong, mail
        // for one domain must still never go to another's MX.
        let same =
            |to: &String| idna::domain_to_ascii(address::split(to).1).is_ok_and(|d| d == ascii);
        if !job.to.iter().all(same) {
            return all(Failure::temporary(
                "internal error: the recipients of one job are in different domains",
            ));
        }
        let mut mx = match mx::lookup_mx(&self.resolver, &ascii).await {
            Ok(mx) => mx,
            Err(f) => return all(f),
        };
        let key = format!("mx {ascii}");
        // Only reorders within a preference; whether a pooled connection
        // may carry this job is decided when it is taken.
        mx::prefer_pooled(&mut mx, &self.pool.hosts(&key, |_| true));
        let policy = tokio::time::timeout(STS_WAIT, self.sts.policy(&ascii))
            .await
            .ok()
            .flatten();
        let (names, policy) = match self.apply_sts(&ascii, mx.hosts, policy).await {
            Ok(v) => v,
            Err(f) => return all(f),
        };
        let dest = Dest {
            key,
            domain: job_domain(job),
            policy,
        };
        let hosts = names
            .into_iter()
            .map(|name| Host {
                name,
                addrs: None,
                implicit: mx.implicit,
            })
            .collect();
        self.deliver_to(job, message, &dest, hosts).await
    }

    /// Counts the policy's mode and, in `enforce`, keeps only the MX hosts
    /// it names. None left: the policy is fetched again first (RFC 8461
    /// §5), as it may have changed along with the MX records.
    async fn apply_sts(
        &self,
        domain: &str,
        hosts: Vec<String>,
        policy: Option<Arc<Policy>>,
    ) -> Result<(Vec<String>, Option<Arc<Policy>>), Failure> {
        let Some(mut policy) = policy else {
            return Ok((hosts, None));
        };
        self.dialer
            .meter
            .inc_label(names::SMTP_OUT_STS_MODE, policy.mode.name());
        for refetched in [false, true] {
            if refetched {
                match tokio::time::timeout(STS_WAIT, self.sts.refetch(domain)).await {
                    Ok(Some(p)) => policy = p,
                    // The cached policy stays in force (RFC 8461 §5.1).
                    _ => break,
                }
            }
            if policy.mode != Mode::Enforce {
                return Ok((hosts, Some(policy)));
            }
            let allowed: Vec<String> = hosts
                .iter()
                .filter(|h| policy.matches(h))
                .cloned()
                .collect();
            if !allowed.is_empty() {
                return Ok((allowed, Some(policy)));
            }
        }
        Err(Failure::temporary(format!(
            "no MX matches the MTA-STS policy of {domain} (MX: {}; policy: {})",
            hosts.join(", "),
            policy.mx.join(", ")
        )))
    }

    /// A `via` entry: an IP address (bare or in brackets) or a host name.
    fn via_host(&self, via: &str) -> Host {
        let bare = via.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => Host {
                name: ip.to_string(),
                addrs: Some(vec![SocketAddr::new(ip, self.port)]),
                implicit: false,
            },
            // A name that IDNA refuses stays as given: its lookup fails,
            // temporarily, and the text names it.
            Err(_) => Host {
                name: idna::domain_to_ascii(via.trim_end_matches('.'))
                    .unwrap_or_else(|_| via.to_string()),
                addrs: None,
                implicit: false,
            },
        }
    }

    /// Tries `hosts` in order until every recipient has a final result
    /// (REFERENCE §4.5 step 4). Tests call this with hosts of their own.
    ///
    /// Always in preference order: a cached connection is used only when
    /// its host's turn comes. Trying hosts with one first would keep mail
    /// on a backup MX for as long as steady traffic keeps its connection
    /// alive, long after the primary is back.
    pub(crate) async fn deliver_to(
        &self,
        job: &Job,
        message: &mut tokio::fs::File,
        dest: &Dest,
        hosts: Vec<Host>,
    ) -> (Vec<Outcome>, Option<SecLevel>) {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; job.to.len()];
        // Recipients whose message a host may have taken (the connection
        // was lost after the final dot): no other host gets it in this
        // attempt, as that could deliver it twice; the next attempt may.
        let mut in_doubt = vec![false; job.to.len()];
        // The check is against the recorded level, raised by every session
        // that passes it, as chasquid's domaininfo does within a delivery.
        let mut required = job.security.as_ref().map_or(SecLevel::Plain, |s| s.1);
        let mut seen = None;
        let started = Instant::now();
        // No session of this attempt outlives it, a cached one included.
        let until = started + ATTEMPT_LIMIT;
        for host in &hosts {
            if started.elapsed() >= ATTEMPT_LIMIT {
                tracing::info!(id = %job.queue_id, host = %host.name, "attempt time used up; the remaining hosts wait for the next round");
                break;
            }
            let pending: Vec<usize> = (0..job.to.len())
                .filter(|&i| !in_doubt[i])
                .filter(|&i| matches!(outcomes[i], None | Some(Outcome::TempFail(_))))
                .collect();
            if pending.is_empty() {
                break;
            }
            let to: Vec<String> = pending.iter().map(|&i| job.to[i].clone()).collect();
            let (result, level) = self
                .try_host(job, message, dest, host, &to, &mut required, until)
                .await;
            seen = seen.max(level);
            match result {
                HostResult::All(f) => {
                    tracing::info!(id = %job.queue_id, host = %host.name, "{}", f.text());
                    let stop = f.is_permanent();
                    for &i in &pending {
                        outcomes[i] = Some(f.clone().into_outcome());
                    }
                    if stop {
                        break;
                    }
                }
                HostResult::Each { results, doubt } => {
                    for ((&i, r), d) in pending.iter().zip(results).zip(doubt) {
                        if d {
                            tracing::info!(id = %job.queue_id, host = %host.name, to = %job.to[i],
                                "connection lost after the message was sent; no other host tried in this attempt");
                        }
                        in_doubt[i] = d;
                        outcomes[i] =
                            Some(r.map_or_else(Failure::into_outcome, |()| Outcome::Delivered));
                    }
                }
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::TempFail("no host to deliver to".into())))
            .collect();
        (outcomes, seen)
    }

    /// One host: its cached connection if one fits and still works, else
    /// a new one. The level is that of the session used, if it passed the
    /// checks.
    #[allow(clippy::too_many_arguments)]
    async fn try_host(
        &self,
        job: &Job,
        message: &mut tokio::fs::File,
        dest: &Dest,
        host: &Host,
        to: &[String],
        required: &mut SecLevel,
        until: Instant,
    ) -> (HostResult, Option<SecLevel>) {
        let enforce = dest.sts_enforce();
        let need = *required;
        if let Some(s) = self
            .pool
            .take(&dest.key, &host.name, |l| dest.fits(l, need))
            && let Some(done) = self
                .try_cached(job, message, dest, host, to, s, required, until)
                .await
        {
            return done;
        }
        // A new connection gets a whole session, whatever time a dead
        // cached one took, within the attempt's limit.
        let deadline = (Instant::now() + self.dialer.timeouts.session).min(until);
        let addrs = match &host.addrs {
            Some(a) => a.clone(),
            None => match mx::lookup_addrs(&self.resolver, &host.name, self.port).await {
                Ok(a) => a,
                Err(AddrError::NoAddress) if host.implicit => {
                    let f = Failure::permanent(format!(
                        "5.1.2 {} has no MX and no A/AAAA record",
                        host.name
                    ));
                    return (HostResult::All(f), None);
                }
                Err(AddrError::NoAddress) => {
                    let f =
                        Failure::temporary(format!("connect: no A/AAAA record for {}", host.name));
                    return (HostResult::All(f), None);
                }
                Err(AddrError::Failed(e)) => {
                    let f = Failure::temporary(format!(
                        "connect: address lookup for {} failed: {e}",
                        host.name
                    ));
                    return (HostResult::All(f), None);
                }
            },
        };
        let mut s = match self.dialer.open(&host.name, &addrs, deadline).await {
            Ok(s) => s,
            Err(f) => return (HostResult::All(f), None),
        };
        if let Err(f) = self
            .dialer
            .check(s.level, need, &dest.domain, enforce, &host.name)
        {
            tokio::spawn(s.conn.quit());
            return (HostResult::All(f), None);
        }
        let tx = transaction(
            &mut s.conn,
            s.ext,
            Protocol::Smtp,
            &job.from,
            to,
            message,
            &host.name,
        )
        .await;
        self.finish(dest, host, s, tx, required).await
    }

    /// A transaction on a cached connection. None: the connection turned
    /// out dead (closed or talking out of turn while idle, or MAIL got no
    /// answer or a 4xx within [`Timeouts::reuse`]); that is no failure of
    /// the host or of the delivery, and a new connection follows.
    #[allow(clippy::too_many_arguments)]
    async fn try_cached(
        &self,
        job: &Job,
        message: &mut tokio::fs::File,
        dest: &Dest,
        host: &Host,
        to: &[String],
        mut s: Session,
        required: &mut SecLevel,
        until: Instant,
    ) -> Option<(HostResult, Option<SecLevel>)> {
        if let Err(e) = s.conn.check_idle().await {
            tracing::debug!(host = %host.name, "cached connection unusable: {e}");
            tokio::spawn(s.conn.quit());
            return None;
        }
        s.conn
            .set_deadline((Instant::now() + self.dialer.timeouts.session).min(until));
        // Passes by construction; run so the checks are counted per job.
        if let Err(f) = self.dialer.check(
            s.level,
            *required,
            &dest.domain,
            dest.sts_enforce(),
            &host.name,
        ) {
            tokio::spawn(s.conn.quit());
            return Some((HostResult::All(f), None));
        }
        s.conn.limit_next_reply(self.dialer.timeouts.reuse);
        let tx = transaction(
            &mut s.conn,
            s.ext,
            Protocol::Smtp,
            &job.from,
            to,
            message,
            &host.name,
        )
        .await;
        match tx {
            // Closed, stuck or limited (421 after n messages, say) while
            // idle: a new connection may well work.
            Transaction::Whole { failure } if !failure.is_permanent() => {
                tracing::debug!(host = %host.name, "cached connection failed: {}", failure.text());
                tokio::spawn(s.conn.quit());
                None
            }
            tx => {
                self.dialer.meter.inc(names::SMTP_OUT_REUSED);
                Some(self.finish(dest, host, s, tx, required).await)
            }
        }
    }

    /// After a transaction on a session that passed the checks: keep the
    /// connection if it is fit for another, else QUIT (in the background:
    /// the result need not wait for it).
    async fn finish(
        &self,
        dest: &Dest,
        host: &Host,
        mut s: Session,
        tx: Transaction,
        required: &mut SecLevel,
    ) -> (HostResult, Option<SecLevel>) {
        *required = (*required).max(s.level);
        let level = Some(s.level);
        match tx {
            Transaction::Whole { failure } => {
                tokio::spawn(s.conn.quit());
                (HostResult::All(failure), level)
            }
            Transaction::Each {
                results,
                reusable,
                in_doubt,
            } => {
                // Bytes the server sent after its last reply would be
                // taken for the reply to the next job's MAIL.
                if reusable
                    && s.conn.budget_left() >= MIN_BUDGET_TO_KEEP
                    && s.conn.check_idle().await.is_ok()
                {
                    self.pool.put(&dest.key, &host.name, s);
                } else {
                    tokio::spawn(s.conn.quit());
                }
                let each = HostResult::Each {
                    results,
                    doubt: in_doubt,
                };
                (each, level)
            }
        }
    }
}

/// The recipients' domain (they share one), as queued gave it.
fn job_domain(job: &Job) -> String {
    match &job.security {
        Some((domain, _)) => domain.clone(),
        None => job
            .to
            .first()
            .map_or_else(String::new, |to| address::split(to).1.to_string()),
    }
}
