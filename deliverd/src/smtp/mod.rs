//! The client side of SMTP (RFC 5321) and LMTP (RFC 2033), shared by
//! remote delivery and native LMTP.
//!
//! - [`reply`]: parsing replies.
//! - [`conn`]: the connection: bounded reply reading, commands, deadlines.
//! - [`data`]: the message after DATA (dot-stuffing, CRLF), streamed.
//! - [`client`]: greeting, EHLO/HELO/LHLO, one mail transaction.
//! - [`failure`]: failure texts and their classification.
//!
//! No pipelining: every command waits for its reply, which keeps the
//! reading of replies trivially in step with the commands.

pub mod client;
pub mod conn;
pub mod data;
pub mod failure;
pub mod reply;
#[cfg(test)]
pub mod testserver;

pub use client::{Extensions, Protocol, Transaction};
pub use conn::{Conn, Stream};
pub use failure::{Failure, Stage};
