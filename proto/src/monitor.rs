//! monitor.sock: every process → monitord. The other way, monitord may
//! send one thing only: a [`ProfileRequest`], which the process answers
//! with a [`MonitorMessage::Profile`]. A request is 64 bytes at most and
//! asks for a bounded sample of the process's stacks, one at a time;
//! anything else from monitord closes the connection. So monitord can
//! make a process spend a little CPU on being profiled, never slow,
//! steer or read its mail.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Role;

/// Longest variable name or label monitord keeps; longer ones are dropped
/// and counted.
pub const MAX_NAME: usize = 128;

/// Most deltas in one frame; a pusher splits larger batches.
pub const MAX_DELTAS_PER_FRAME: usize = 512;

/// Largest frame on monitor.sock after the registration: a full batch of
/// deltas with names at the limit. A larger frame closes the connection.
pub const MAX_MONITOR_FRAME: usize = 160 * 1024;

// A queue snapshot fits in a frame.
const _: () = assert!(MAX_QUEUE_SNAPSHOT + 1024 <= MAX_MONITOR_FRAME);

/// Largest `Register` frame: a version, a couple of flags and the
/// effective config; a larger frame closes the connection.
pub const MAX_REGISTER_FRAME: usize = 16 * 1024 + MAX_CONFIG;

/// Longest effective config a process registers (`/debug/config`); a
/// longer one is cut, and says so.
pub const MAX_CONFIG: usize = 64 * 1024;

/// Longest queue snapshot queued pushes (`/debug/queue`); a longer one is
/// cut, and says so.
pub const MAX_QUEUE_SNAPSHOT: usize = 128 * 1024;

/// Most flags monitord keeps from one registration; the rest are dropped
/// and counted. Each flag name, and the version, is at most [`MAX_NAME`]
/// bytes, each flag value at most [`MAX_FLAG_VALUE`]: at the limits, a
/// registration still fits in [`MAX_REGISTER_FRAME`].
pub const MAX_FLAGS: usize = 12;

/// Longest flag value monitord keeps (`config_overrides` is the long one).
pub const MAX_FLAG_VALUE: usize = 1024;

/// Most new keys (variable, or map label) one monitor.sock connection may
/// add to monitord's totals. Past it, that connection's new keys are
/// dropped and counted; its increases to existing keys still apply.
pub const MAX_NEW_KEYS_PER_CONNECTION: usize = 1024;

/// Most keys all connections of one role may add to monitord's totals, over
/// monitord's lifetime: with four roles able to push, one role (say a
/// compromised smtpd opening many connections) can never take the room of
/// the others.
pub const MAX_KEYS_PER_ROLE: usize = 4096;

/// Most monitor.sock connections monitord serves at once (each process
/// holds one); over it a new connection is closed before its hello.
pub const MAX_MONITOR_CONNECTIONS: usize = 64;

/// A registered monitor.sock connection that sends nothing, not even a
/// heartbeat, for this long is closed.
pub const MONITOR_IDLE_TIMEOUT: Duration = Duration::from_secs(3 * 60);

// Only a dead or stuck pusher may reach the idle timeout: a live one sends
// a heartbeat every HEARTBEAT, so a few can be late or lost.
const _: () = assert!(MONITOR_IDLE_TIMEOUT.as_secs() >= 3 * crate::metrics::HEARTBEAT.as_secs());

/// The flags monitord keeps from a registration: the first [`MAX_FLAGS`]
/// whose name is 1 to [`MAX_NAME`] bytes and value at most
/// [`MAX_FLAG_VALUE`]. Pushers send only these, so an overlong
/// `--config_overrides` costs its line in `/debug/flags`, not every
/// counter of the process.
pub fn bounded_flags(flags: &[(String, String)]) -> Vec<(String, String)> {
    flags
        .iter()
        .filter(|(k, v)| !k.is_empty() && k.len() <= MAX_NAME && v.len() <= MAX_FLAG_VALUE)
        .take(MAX_FLAGS)
        .cloned()
        .collect()
}

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
        /// Drawn once per process run: tells monitord whether it has
        /// counted this process before (a reconnection) or not (monitord
        /// restarted, or the process is new).
        instance: u64,
        /// The effective config as TOML (`/debug/config`), at most
        /// [`MAX_CONFIG`] bytes.
        config: String,
    },
    /// Counter increases since the last message. An empty list is a
    /// heartbeat: pushers send one when idle, so monitord can close
    /// connections whose peer went silent.
    Deltas(Vec<Delta>),
    /// Right after `Register`, in as many frames as it takes: everything
    /// this process counted and pushed before, as running totals. A
    /// monitord that has not counted this instance yet (it restarted)
    /// adds them, so counters survive a restart of monitord alone; one
    /// that has ignores them.
    Baseline(Vec<Delta>),
    /// From queued only: the queue as `/debug/queue` shows it
    /// (REFERENCE §7.4), at most [`MAX_QUEUE_SNAPSHOT`] bytes.
    Queue(String),
    /// The process's runtime now (`/debug/tasks`): its tokio workers and
    /// tasks, CPU time and memory, as text of at most [`MAX_STATE`] bytes.
    State(String),
    /// Finished traces (`/debug/traces`), at most
    /// [`crate::trace::MAX_PER_FRAME`] a frame.
    Traces(Vec<crate::trace::TraceRecord>),
    /// The traces running now, as they are (at most
    /// [`crate::trace::MAX_ACTIVE`]); replaces the last such list.
    Active(Vec<crate::trace::TraceRecord>),
    /// The answer to a [`ProfileRequest`]: the profile (at most
    /// [`MAX_PROFILE`] bytes) or why there is none.
    Profile {
        id: u64,
        result: Result<Vec<u8>, String>,
    },
}

/// What monitord may ask of a process (`/debug/pprof/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRequest {
    /// Echoed in the answer.
    pub id: u64,
    pub kind: ProfileKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProfileKind {
    /// Sample the stacks on CPU for this many seconds (1 to
    /// [`MAX_PROFILE_SECONDS`]).
    Cpu { seconds: u32 },
    /// The sampled allocations still in use.
    Heap,
}

/// Longest CPU profile a process takes.
pub const MAX_PROFILE_SECONDS: u32 = 60;

/// Largest request frame a pusher reads from monitord.
pub const MAX_REQUEST_FRAME: usize = 64;

/// Largest profile a process sends (and monitord reads, only while it
/// waits for one): what fits a frame. A 30 s CPU profile of a busy smtpd
/// is far smaller; a larger one is refused, saying so.
pub const MAX_PROFILE: usize = crate::frame::MAX_FRAME - 1024;

/// What runs a profile in a process: takes the request, gives the pprof
/// protobuf or why not. Processes built without profiling have none.
pub type Profiler = fn(ProfileKind) -> ProfileFuture;

/// A profile being taken.
pub type ProfileFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>;

/// Longest runtime state a process pushes.
pub const MAX_STATE: usize = 8 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode;

    #[test]
    fn frames_at_the_limits_fit() {
        let name = "n".repeat(MAX_NAME);
        let reg = MonitorMessage::Register {
            role: Role::Smtpd,
            pid: u32::MAX,
            version: name.clone(),
            flags: vec![(name.clone(), "v".repeat(MAX_FLAG_VALUE)); MAX_FLAGS],
            instance: u64::MAX,
            config: "c".repeat(MAX_CONFIG),
        };
        assert!(encode(&reg).unwrap().len() - 4 <= MAX_REGISTER_FRAME);
        let batch = MonitorMessage::Deltas(vec![
            Delta {
                var: name.clone(),
                label: Some(name.clone()),
                value: u64::MAX,
            };
            MAX_DELTAS_PER_FRAME
        ]);
        assert!(encode(&batch).unwrap().len() - 4 <= MAX_MONITOR_FRAME);
        let req = ProfileRequest {
            id: u64::MAX,
            kind: ProfileKind::Cpu { seconds: u32::MAX },
        };
        assert!(encode(&req).unwrap().len() - 4 <= MAX_REQUEST_FRAME);
        let queue = MonitorMessage::Queue("q".repeat(MAX_QUEUE_SNAPSHOT));
        assert!(encode(&queue).unwrap().len() - 4 <= MAX_MONITOR_FRAME);
    }

    #[test]
    fn flags_are_bounded() {
        let mut flags = vec![
            ("long".to_string(), "v".repeat(MAX_FLAG_VALUE + 1)),
            (String::new(), "v".into()),
            ("k".repeat(MAX_NAME + 1), "v".into()),
        ];
        flags.extend((0..MAX_FLAGS + 1).map(|i| (format!("f{i}"), "v".repeat(MAX_FLAG_VALUE))));
        let kept = bounded_flags(&flags);
        assert_eq!(kept.len(), MAX_FLAGS);
        assert_eq!(kept[0].0, "f0");
    }
}
