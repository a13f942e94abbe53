//! Remote delivery against fake SMTP servers on 127.0.0.1: the hosts are
//! given directly (MX lookups are tested end to end, with a test DNS
//! server), or as a `via` list of IP addresses.

mod dialog;
mod limits;
mod order;
mod reuse;
mod security;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use rustls::RootCertStore;

use tambo_common::config::Config;
use tambo_proto::deliver::{Job, Outcome, SecLevel, Target};

use super::{Dest, Host, Remote};
use crate::sts::{Fake, Mode, Policy, Sts};

/// A Remote for the tests, with the MTA-STS cache directory it owns.
pub struct TestRemote {
    remote: Remote,
    _sts_dir: tempfile::TempDir,
}

impl std::ops::Deref for TestRemote {
    type Target = Remote;
    fn deref(&self) -> &Remote {
        &self.remote
    }
}

/// `hostname` is `tambo.test`, no connection is kept unless `tweak` says
/// so, and DNS fails at once.
pub fn remote(roots: Arc<RootCertStore>, tweak: impl FnOnce(&mut Config)) -> TestRemote {
    with_sts(roots, tweak, |dir, resolver, roots| {
        Sts::new(dir.join("sts-cache"), resolver, roots, 443)
    })
}

/// As [`remote`], with MTA-STS policies from `fake`'s script.
pub fn remote_scripted(roots: Arc<RootCertStore>, fake: Arc<Fake>) -> TestRemote {
    with_sts(
        roots,
        |_| {},
        |dir, _, _| Sts::scripted(dir.join("sts-cache"), fake),
    )
}

fn with_sts(
    roots: Arc<RootCertStore>,
    tweak: impl FnOnce(&mut Config),
    sts: impl FnOnce(&Path, TokioResolver, Arc<RootCertStore>) -> Sts,
) -> TestRemote {
    let mut cfg = Config::defaults(Path::new("/nonexistent"));
    cfg.hostname = "tambo.test".into();
    cfg.tambo.smtp_connection_cache_time = Duration::ZERO;
    cfg.testing.smtp_out_timeout = Some(Duration::from_secs(20));
    tweak(&mut cfg);
    let resolver = dead_resolver();
    let dir = tempfile::tempdir().unwrap();
    let sts = Arc::new(sts(dir.path(), resolver.clone(), roots.clone()));
    TestRemote {
        remote: Remote::new(Arc::new(cfg), resolver, roots, sts),
        _sts_dir: dir,
    }
}

/// A resolver that gives up at once: no test here depends on DNS (MX
/// lookups are tested end to end), but the MTA-STS refetch does ask it.
fn dead_resolver() -> TokioResolver {
    let mut ns = NameServerConfig::udp_and_tcp(IpAddr::from([127, 0, 0, 1]));
    for c in &mut ns.connections {
        c.port = 9;
    }
    let mut b = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    b.options_mut().use_hosts_file = ResolveHosts::Never;
    b.options_mut().timeout = Duration::from_millis(50);
    b.options_mut().attempts = 1;
    b.build().unwrap()
}

pub fn no_roots() -> Arc<RootCertStore> {
    Arc::new(RootCertStore::empty())
}

pub fn job(to: &[&str]) -> Job {
    Job {
        job: 1,
        queue_id: "q1".into(),
        from: "ann@example.org".into(),
        to: to.iter().map(|s| s.to_string()).collect(),
        target: Target::Remote,
        security: Some(("example.net".into(), SecLevel::Plain)),
        maybe_delivered: false,
        positions: Vec::new(),
    }
}

pub fn message(text: &[u8]) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(text).unwrap();
    f
}

pub fn host(name: &str, addr: SocketAddr) -> Host {
    Host {
        name: name.into(),
        addrs: Some(vec![addr]),
        implicit: false,
    }
}

pub fn dest(policy: Option<Mode>) -> Dest {
    Dest {
        key: "mx example.net".into(),
        domain: "example.net".into(),
        policy: policy.map(|mode| {
            Arc::new(Policy {
                mode,
                max_age: Duration::from_secs(86400),
                mx: vec!["mx.test".into()],
            })
        }),
    }
}

/// Delivers `job` through `hosts` with `message`.
pub async fn deliver_to(
    r: &Remote,
    job: &Job,
    text: &[u8],
    dest: &Dest,
    hosts: Vec<Host>,
) -> (Vec<Outcome>, Option<SecLevel>) {
    let mut f = tokio::fs::File::from_std(message(text));
    r.deliver_to(job, &mut f, dest, hosts).await
}

/// [`deliver_to`] the common case: one recipient, `a@example.net`, no
/// MTA-STS policy, one host.
pub async fn deliver_one(r: &Remote, text: &[u8], to: Host) -> (Vec<Outcome>, Option<SecLevel>) {
    deliver_to(r, &job(&["a@example.net"]), text, &dest(None), vec![to]).await
}

/// A port nothing listens on.
pub async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}
