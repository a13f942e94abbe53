//! tambo-proto: the messages tambo's processes exchange, and how they are
//! framed on the wire. It is the only link between the daemons, as imsg is
//! in OpenSMTPD: a daemon depends on this crate, never on another daemon.
//!
//! # Layout
//! - [`frame`]: 4-byte big-endian length + one bincode message; the one
//!   encode/decode pair, with a hard size limit. Decoding never panics.
//! - [`hello`]: the first frame of every connection (version, role), and
//!   the uid check of the peer in both directions against [`identity`].
//! - [`identity`]: the uid each role runs as.
//! - [`activation`]: listening sockets inherited from systemd or `tambo run`.
//! - [`submit`], [`deliver`], [`monitor`]: one message enum per socket.
//! - [`fd`]: passing a read-only message file descriptor (SCM_RIGHTS) to
//!   deliverd, and adopting inherited sockets; the only module with
//!   `unsafe`.
//! - [`metrics`]: the counter-delta client every process uses to feed
//!   monitord, which never blocks mail.
//!
//! Any change to a message enum bumps [`hello::PROTOCOL_VERSION`].
#![deny(unsafe_code)]

pub mod activation;
pub mod deliver;
mod error;
#[allow(unsafe_code)]
pub mod fd;
pub mod frame;
pub mod hello;
pub mod identity;
pub mod metrics;
pub mod monitor;
pub mod submit;
pub mod trace;

pub use error::Error;
pub use hello::{PROTOCOL_VERSION, Role};

/// How often a client says something on a connection that would otherwise
/// be quiet, when its server closes connections quiet for `idle`: a third
/// of it (so two keepalives may be late), at most every 30 s.
pub fn keepalive_every(idle: std::time::Duration) -> std::time::Duration {
    (idle / 3).min(std::time::Duration::from_secs(30))
}
