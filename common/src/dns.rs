//! The DNS resolver of the processes that may resolve: smtpd (SPF) and
//! deliverd (MX, A/AAAA, MTA-STS TXT, DKIM keys).
//!
//! It reads /etc/resolv.conf, as every resolver on the machine does; tests
//! (and only tests) replace every server with one of their own through
//! `[testing] dns_server`, so no test ever asks the real DNS.

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

use crate::config::Config;

/// Builds the resolver from the config; an error names what is wrong
/// (an unreadable resolv.conf, say).
pub fn resolver(cfg: &Config) -> Result<TokioResolver, String> {
    let builder = match cfg.testing.dns_server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            let mut b = Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            );
            // The test's server is the only truth: /etc/hosts must not
            // answer for names the test serves.
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        }
        None => match Resolver::builder_tokio() {
            Ok(b) => b,
            // glibc's rule when /etc/resolv.conf is missing or unreadable:
            // ask a resolver on this machine. Never a public one silently.
            Err(e) => {
                tracing::warn!(
                    "cannot read the system's DNS configuration ({e}); asking 127.0.0.1:53, as the C library does"
                );
                let ns = NameServerConfig::udp_and_tcp(std::net::Ipv4Addr::LOCALHOST.into());
                Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
        },
    };
    builder
        .with_tls_config(no_tls()?)
        .build()
        .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}

/// We never ask a name server over TLS, but with TLS compiled in (mail-auth
/// turns it on) the resolver would build a client config from the system's
/// CA store when it is built, and refuse to start on a host without one
/// (a minimal Debian without ca-certificates). An empty one is never used.
fn no_tls() -> Result<rustls::ClientConfig, String> {
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("cannot set up the DNS resolver: {e}"))?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    Ok(config)
}
