//! Where "now" comes from. Every reading of the wall clock for data (the time of a point
//! written without one, `INSERT` without `time`, COPY's default) goes through the engine's
//! [`Clock`], so tests of timing (alert rules, retention, view refresh) set the time instead
//! of waiting for it.

use std::fmt::Debug;
#[cfg(test)]
use std::sync::atomic::{AtomicI64, Ordering};

/// A source of the current time.
pub trait Clock: Send + Sync + Debug {
    /// Nanoseconds since the Unix epoch, UTC.
    fn now_ns(&self) -> i64;
}

/// The system's wall clock (the default).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> i64 {
        let since =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        i64::try_from(since.as_nanos()).unwrap_or(i64::MAX)
    }
}

/// A clock that stands still until told otherwise, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ns: AtomicI64,
}

#[cfg(test)]
impl ManualClock {
    pub fn new(now_ns: i64) -> ManualClock {
        ManualClock { now_ns: AtomicI64::new(now_ns) }
    }

    pub fn set(&self, now_ns: i64) {
        self.now_ns.store(now_ns, Ordering::SeqCst);
    }

    pub fn advance(&self, by: std::time::Duration) {
        let by = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        self.now_ns.fetch_add(by, Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now_ns(&self) -> i64 {
        self.now_ns.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ns(), 1_000);
        clock.advance(std::time::Duration::from_micros(2));
        assert_eq!(clock.now_ns(), 3_000);
        clock.set(7);
        assert_eq!(clock.now_ns(), 7);
        assert!(SystemClock.now_ns() > 1_600_000_000_000_000_000);
    }
}
