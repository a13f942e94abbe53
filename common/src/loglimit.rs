//! At most one log line a second per kind of event, so whoever can cause
//! the event (any local user, for a refused connection) cannot flood the
//! log. Every event is still counted in a variable; the line says how many
//! were left out since the last one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest time between two lines.
pub const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct LogLimiter {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    /// Events since the last line that got none.
    skipped: u64,
}

impl LogLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// `Some(n)` if this event may be logged now, `n` being the events
    /// left unlogged since the last line; `None` if it must not be.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.last
            .is_some_and(|t| now.saturating_duration_since(t) < INTERVAL)
        {
            s.skipped = s.skipped.saturating_add(1);
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.skipped))
    }
}

/// The tail of a rate-limited line: empty, or how many were left out.
pub fn skipped(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more since the last such line)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_of_the_rest() {
        let l = LogLimiter::new();
        let t0 = Instant::now();
        assert_eq!(l.allow_at(t0), Some(0));
        for ms in [1, 500, 999] {
            assert_eq!(l.allow_at(t0 + Duration::from_millis(ms)), None);
        }
        let t1 = t0 + INTERVAL;
        assert_eq!(l.allow_at(t1), Some(3));
        assert_eq!(l.allow_at(t1 + Duration::from_millis(10)), None);
        assert_eq!(l.allow_at(t1 + Duration::from_secs(60)), Some(1));
        assert_eq!(skipped(0), "");
        assert_eq!(skipped(3), " (3 more since the last such line)");
    }
}
