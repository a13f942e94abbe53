//! monitor.sock: every process → monitord, one way. monitord never answers
//! after the hello, so it can never slow or steer mail.

use serde::{Deserialize, Serialize};

use crate::Role;

/// Longest variable name or label monitord keeps; longer ones are dropped
/// and counted.
pub const MAX_NAME: usize = 128;

/// Most deltas in one frame; a pusher splits larger batches.
pub const MAX_DELTAS_PER_FRAME: usize = 512;

/// Largest frame on monitor.sock: a full batch of deltas with names at the
/// limit, or a registration with its flags.
pub const MAX_MONITOR_FRAME: usize = 160 * 1024;

/// One counter increase: `var` (e.g. `chasquid/smtpIn/commandCount`), the
/// map key for map variables, and how much to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub var: String,
    pub label: Option<String>,
    pub value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitorMessage {
    /// First after the hello.
    Register {
        role: Role,
        pid: u32,
        version: String,
        /// Flags as given on the command line, name → value.
        flags: Vec<(String, String)>,
    },
    /// Counter increases since the last message. An empty list is a
    /// heartbeat: pushers send one when idle, so monitord can close
    /// connections whose peer went silent.
    Deltas(Vec<Delta>),
}
