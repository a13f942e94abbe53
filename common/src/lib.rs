//! tambo-common: the little code that more than one tambo process needs.
//!
//! # Layout
//! - [`config`]: `tambo.conf` (chasquid-compatible keys), defaults, validation.
//! - [`duration`]: Go-style durations (`1h30m`), as chasquid.conf uses them.
//! - [`address`]: address splitting and normalisation (domains, user parts).
//! - [`users`], [`aliases`]: the per-domain files.
//! - [`domains`]: loading `domains/` into one read-only snapshot.
//! - [`safeio`]: atomic file writes (temp + fsync + rename + dir fsync).
//! - [`build`]: version and build time; [`daemon`]: flags and logging every
//!   daemon shares.
//!
//! Nothing here opens a socket or runs a program: it is safe to link into
//! every process, including the internet-facing one.
#![forbid(unsafe_code)]

pub mod address;
pub mod aliases;
pub mod build;
pub mod config;
pub mod daemon;
pub mod domains;
pub mod duration;
pub mod safeio;
pub mod users;
