//! tambo-smtpd: SMTP on 25, submission on 587 and 465; parses everything
//! the internet sends.
//!
//! Holds: its listening sockets, one submit.sock link per session (opened
//! at its first MAIL or AUTH), one key link to queued, and the certificate
//! chains — never a private key: queued signs each TLS handshake.
//! Must never: write a file, read the queue, users or any private key, exec,
//! or decide by itself whether a recipient is accepted — queued does, for
//! every RCPT.
//!
//! # Layout
//! - [`server`]: accept loop, session caps, one task per connection.
//! - [`proxy`]: the PROXY protocol header (`haproxy_incoming`).
//! - [`session`]: the SMTP state machine, limits and replies.
//! - [`command`]: command-line parsing (verbs, MAIL/RCPT paths).
//! - [`dotreader`]: DATA decoding (dot-unstuffing, strict CRLF).
//! - [`headers`]: the header section check of DATA, while it streams.
//! - [`spf`]: SPF at MAIL FROM, and the Received-SPF header.
//! - [`sasl`]: AUTH PLAIN/LOGIN response decoding (queued checks them).
//! - [`received`]: the Received header.
//! - [`queue`]: the per-session link to queued.
//! - [`maillog`]: what the mail log says of sessions, sent to queued.
//! - [`conn`]: a client connection, plain or TLS.
//! - [`tls`]: TLS with the keys held by queued (smtpd's key link).
#![forbid(unsafe_code)]

pub mod command;
pub mod conn;
pub mod dotreader;
pub mod headers;
pub mod maillog;
pub mod proxy;
pub mod queue;
pub mod received;
pub mod sasl;
pub mod server;
pub mod session;
pub mod spf;
pub mod tls;
