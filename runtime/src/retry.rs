//! How [`Store::transact_with_retry`](crate::Store::transact_with_retry) re-runs work after a
//! concurrency conflict.

use std::time::Duration;

/// A retry policy: how many attempts, and how long to wait between them.
///
/// The wait before attempt `n + 1` is a random duration up to `base_delay × 2ⁿ⁻¹`, capped at
/// `max_delay` ("full jitter"), so contending writers spread out instead of colliding again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all, the first included. At least 1.
    pub max_attempts: u32,
    /// The cap of the first wait.
    pub base_delay: Duration,
    /// The cap of every wait.
    pub max_delay: Duration,
}

impl Default for Retry {
    /// 10 attempts, waits from up to 1 ms growing to at most 100 ms.
    fn default() -> Self {
        Retry {
            max_attempts: 10,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(100),
        }
    }
}

impl Retry {
    /// The default policy with `max_attempts` attempts in all.
    pub fn attempts(max_attempts: u32) -> Self {
        Retry {
            max_attempts: max_attempts.max(1),
            ..Retry::default()
        }
    }

    /// Sets the waits' caps.
    pub fn delays(mut self, base: Duration, max: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = max;
        self
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        let cap = self.base_delay.saturating_mul(factor).min(self.max_delay);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(jitter() % nanos)
    }
}

/// A cheap random number: a per-thread xorshift seeded from the clock and the thread.
fn jitter() -> u64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, RandomState};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(std::time::SystemTime::now()) | 1);
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}
