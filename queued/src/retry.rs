//! When to try again: chasquid's schedule (REFERENCE §3.3).
//!
//! | age of the item | < 1 min | < 5 min | < 10 min | otherwise |
//! |-----------------|---------|---------|----------|-----------|
//! | next delay      | 1 min   | 5 min   | 10 min   | 20 min    |
//!
//! plus a uniform random 0–60 s, so a restart does not retry every item at
//! the same moment.

use std::time::Duration;

pub const DEFAULT_DELAYS: [Duration; 4] = [
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(10 * 60),
    Duration::from_secs(20 * 60),
];
pub const DEFAULT_JITTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub delays: [Duration; 4],
    pub jitter: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            delays: DEFAULT_DELAYS,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl Schedule {
    /// The delay before the next round, without jitter.
    pub fn base_delay(&self, age: Duration) -> Duration {
        let min = Duration::from_secs(60);
        if age < min {
            self.delays[0]
        } else if age < 5 * min {
            self.delays[1]
        } else if age < 10 * min {
            self.delays[2]
        } else {
            self.delays[3]
        }
    }

    /// The delay before the next round, jitter included.
    pub fn next_delay(&self, age: Duration) -> Duration {
        self.base_delay(age) + self.jitter.mul_f64(random_unit())
    }
}

/// A uniform number in [0, 1); 0.5 if the OS has no randomness to give.
/// Also draws AUTH's timing jitter.
pub(crate) fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chasquid_schedule() {
        let s = Schedule::default();
        let m = |n: u64| Duration::from_secs(60 * n);
        assert_eq!(s.base_delay(Duration::ZERO), m(1));
        assert_eq!(s.base_delay(m(1)), m(5));
        assert_eq!(s.base_delay(m(4)), m(5));
        assert_eq!(s.base_delay(m(5)), m(10));
        assert_eq!(s.base_delay(m(10)), m(20));
        assert_eq!(s.base_delay(m(600)), m(20));
    }

    #[test]
    fn jitter_is_bounded() {
        let s = Schedule::default();
        for _ in 0..1000 {
            let d = s.next_delay(Duration::ZERO);
            assert!(
                d >= Duration::from_secs(60) && d < Duration::from_secs(120),
                "{d:?}"
            );
        }
    }
}
