//! monitor.sock: every process → monitord, one way. monitord never answers
//! after the hello, so it can never slow or steer mail.

use serde::{Deserialize, Serialize};

use crate::Role;

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
    /// Counter increases since the last message.
    Deltas(Vec<Delta>),
}
