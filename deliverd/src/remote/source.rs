//! Outgoing TCP connections from `[tambo] outgoing_source_address`: the
//! one place that decides the source address, for remote SMTP and for
//! MTA-STS policy fetches alike (a host that must send from one address
//! must fetch from it too: firewalls and policy hosts see the same IP).

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr` from the configured source address of its family,
/// if there is one (at most one per family is configured); else from
/// whatever address the system picks.
pub async fn connect_from(sources: &[IpAddr], addr: SocketAddr) -> io::Result<TcpStream> {
    let Some(&src) = sources.iter().find(|s| s.is_ipv4() == addr.is_ipv4()) else {
        return TcpStream::connect(addr).await;
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(addr).await
}
