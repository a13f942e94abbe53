//! tambo-common: the little code that more than one tambo process needs.
//!
//! # Layout
//! - [`config`]: `tambo.conf` (chasquid-compatible keys), defaults, validation.
//! - [`duration`]: Go-style durations (`1h30m`), as chasquid.conf uses them.
//! - [`address`]: address splitting and normalisation (domains, user parts).
//! - [`users`], [`aliases`]: the per-domain files.
//! - [`cidr`]: networks, for `[tambo] relay_networks`.
//! - [`authres`]: the Authentication-Results header, every piece escaped.
//! - [`domains`]: loading `domains/` into one read-only snapshot.
//! - [`safeio`]: atomic file writes (temp + fsync + rename + dir fsync), and
//!   directories created durably.
//! - [`lockfile`]: exclusive locks held for a process's life.
//! - [`loglimit`]: at most one log line a second per kind of event a peer
//!   can cause.
//! - [`sockets`]: the IPC sockets, who may connect to each, binding them.
//! - [`sandbox`]: what each role may still do (Landlock, seccomp).
//! - [`build`]: version and build time; [`daemon`]: the startup sequence,
//!   signals and accept loops every daemon shares.
//! - `dkimkey` (feature `dkim`, for queued and the CLI only): the DKIM key
//!   file format and selector rule.
//! - `dns` (feature `dns`, for smtpd and deliverd only): the resolver, built
//!   from resolv.conf or the tests' `[testing] dns_server`.
//!
//! - `profile` (feature `profile`, in every daemon by default): CPU and
//!   heap profiles; its `cpu` (the SIGPROF handler) and `heap` (the
//!   sampling allocator) modules are the only ones here with `unsafe`.
//!
//! Nothing here runs a program: it is safe to link into every process,
//! including the internet-facing one.
#![deny(unsafe_code)]

pub mod address;
pub mod aliases;
pub mod authres;
pub mod build;
pub mod cidr;
pub mod config;
pub mod daemon;
#[cfg(feature = "dkim")]
pub mod dkimkey;
#[cfg(feature = "dkim")]
pub mod dkimsign;
#[cfg(feature = "dkimverify")]
pub mod dkimverify;
#[cfg(feature = "dns")]
pub mod dns;
pub mod domains;
pub mod duration;
pub mod lockfile;
pub mod loglimit;
#[cfg(feature = "password")]
pub mod password;
#[cfg(feature = "profile")]
pub mod profile;
pub mod safeio;
pub mod sandbox;
pub mod sockets;
pub mod users;
