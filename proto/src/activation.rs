//! Socket activation: listening sockets created by someone else and
//! inherited across exec, as systemd passes them (sd_listen_fds(3):
//! `LISTEN_FDS` descriptors from 3 on, named by `LISTEN_FDNAMES`).
//!
//! `tambo run` hands its daemons their sockets the same way, so a daemon
//! has one code path whether systemd or tambo's supervisor started it. The
//! one difference: systemd sets `LISTEN_PID` to the child's pid after
//! fork, which a supervisor using `std::process::Command` cannot know, so
//! without `LISTEN_PID` the sockets are taken only when our parent is the
//! supervisor named by `TAMBO_SUPERVISOR_PID`. Either way a grandchild that
//! inherited the variables takes nothing.

use std::os::fd::OwnedFd;

use crate::fd::adopt_inherited_socket;

/// The first inherited descriptor (SD_LISTEN_FDS_START).
pub const FIRST_FD: i32 = 3;

/// Set by `tambo run` in its children's environment: its own pid.
pub const SUPERVISOR_ENV: &str = "TAMBO_SUPERVISOR_PID";

/// Inherited sockets, each with its name (`unknown` when none was given).
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<(String, OwnedFd)>,
}

impl Inherited {
    /// Takes every socket this process was handed. Call once, first thing,
    /// before the process opens any socket itself.
    pub fn take() -> std::io::Result<Self> {
        let var = |k: &str| std::env::var(k).ok();
        Self::take_from(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            var(SUPERVISOR_ENV).as_deref(),
            std::process::id(),
            nix::unistd::getppid().as_raw(),
        )
    }

    fn take_from(
        listen_pid: Option<&str>,
        listen_fds: Option<&str>,
        names: Option<&str>,
        supervisor: Option<&str>,
        pid: u32,
        ppid: i32,
    ) -> std::io::Result<Self> {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let Some(count) = listen_fds else {
            return Ok(Self::default());
        };
        let for_us = match listen_pid {
            Some(p) => p.parse::<u32>().ok() == Some(pid),
            None => supervisor.and_then(|s| s.parse::<i32>().ok()) == Some(ppid),
        };
        if !for_us {
            return Ok(Self::default());
        }
        let count: i32 = count
            .parse()
            .ok()
            .filter(|n| (0..=64).contains(n))
            .ok_or_else(|| invalid(format!("LISTEN_FDS={count:?} is not a count")))?;
        let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
        let mut sockets = Vec::new();
        for i in 0..count {
            let fd = adopt_inherited_socket(FIRST_FD + i).map_err(|e| {
                invalid(format!(
                    "inherited descriptor {} (LISTEN_FDS={count}): {e}",
                    FIRST_FD + i
                ))
            })?;
            let name = names.get(i as usize).copied().unwrap_or("unknown");
            sockets.push((name.to_string(), fd));
        }
        Ok(Self { sockets })
    }

    /// Removes and returns every socket named `name`.
    pub fn take_named(&mut self, name: &str) -> Vec<OwnedFd> {
        let (mine, rest) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.sockets = rest;
        mine.into_iter().map(|(_, fd)| fd).collect()
    }

    /// Names of the sockets nobody took.
    pub fn leftover(&self) -> Vec<&str> {
        self.sockets.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_without_the_variables_or_for_someone_else() {
        assert!(
            Inherited::take_from(None, None, None, None, 10, 1)
                .unwrap()
                .is_empty()
        );
        // LISTEN_PID names another process (we are a grandchild).
        assert!(
            Inherited::take_from(Some("9"), Some("2"), None, None, 10, 1)
                .unwrap()
                .is_empty()
        );
        // No LISTEN_PID, and our parent is not the supervisor.
        assert!(
            Inherited::take_from(None, Some("2"), None, Some("5"), 10, 1)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_counts_are_errors() {
        assert!(Inherited::take_from(Some("10"), Some("x"), None, None, 10, 1).is_err());
        assert!(Inherited::take_from(Some("10"), Some("-1"), None, None, 10, 1).is_err());
        assert!(Inherited::take_from(Some("10"), Some("1000"), None, None, 10, 1).is_err());
        // (Descriptors that are not open sockets are refused by
        // fd::adopt_inherited_socket, tested there; adopting the test
        // harness's own descriptors here would not be sound.)
    }

    #[test]
    fn names_pick_sockets() {
        let mut inh = Inherited::default();
        for name in ["smtp", "submission", "smtp"] {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            inh.sockets.push((name.into(), a.into()));
        }
        assert_eq!(inh.take_named("smtp").len(), 2);
        assert_eq!(inh.leftover(), ["submission"]);
        assert!(inh.take_named("smtp").is_empty());
    }
}
