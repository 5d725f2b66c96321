//! Retry delays, defined once for every retry loop of the services: exponential backoff (the base
//! delay doubled per attempt) with a cap, and optional jitter so that several instances retrying
//! the same dependency spread out instead of arriving together.
//!
//! A [`Policy`] names the schedule (base, cap, jitter) and is a `const` at its call site; loops that
//! sleep between attempts hold a [`Backoff`] (`next_delay()` / `reset()`); code that stores the
//! attempt count elsewhere (an outbox row) asks [`Policy::delay`] for attempt `n`. [`delay`] is the
//! pure, un-jittered schedule.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How the scheduled delay is spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// The scheduled delay as is.
    None,
    /// Uniform in [0.75, 1.25) times the scheduled delay (+-25 %).
    PlusMinus25,
    /// Uniform in [0.5, 1.0) times the scheduled delay: never later than the schedule, never
    /// sooner than half of it ("equal jitter").
    Equal,
}

impl Jitter {
    /// `d` spread by this jitter, `unit` being a number in [0, 1) (random in use, fixed in tests).
    pub fn apply(self, d: Duration, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        match self {
            Jitter::None => d,
            Jitter::PlusMinus25 => d.mul_f64(0.75 + unit / 2.0),
            Jitter::Equal => d.mul_f64(0.5 + unit / 2.0),
        }
    }
}

/// A backoff schedule: `base`, doubled per attempt, at most `cap`, then spread by `jitter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub base: Duration,
    pub cap: Duration,
    pub jitter: Jitter,
}

impl Policy {
    /// The schedule without jitter.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, jitter: Jitter::None }
    }

    pub const fn with_jitter(self, jitter: Jitter) -> Self {
        Self { jitter, ..self }
    }

    /// The (jittered) delay before retry number `attempt`, counted from 0.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.jitter.apply(delay(attempt, self.base, self.cap), unit_random())
    }

    /// A fresh backoff following this schedule.
    pub fn backoff(&self) -> Backoff {
        Backoff { policy: *self, attempt: 0 }
    }
}

/// The scheduled delay before retry number `attempt` (from 0): `base * 2^attempt`, at most `cap`.
pub fn delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

/// The state of one retry loop: each `next_delay()` is one attempt later in the schedule, until
/// `reset()` after a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: Policy,
    attempt: u32,
}

impl Backoff {
    /// The delay to wait now; the next call returns the following step of the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.policy.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the start or the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// A number in [0, 1), fresh per call, without a random-number dependency: std's `RandomState`
/// is seeded randomly per process and steps per instance, and its hash mixes the key well.
fn unit_random() -> f64 {
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_base_up_to_cap() {
        let delays: Vec<_> = (0..8).map(|a| delay(a, 100 * MS, Duration::from_secs(5))).collect();
        let ms: Vec<_> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn huge_attempts_saturate_at_cap() {
        let cap = Duration::from_secs(300);
        assert_eq!(delay(31, Duration::from_secs(1), cap), cap);
        assert_eq!(delay(32, Duration::from_secs(1), cap), cap);
        assert_eq!(delay(u32::MAX, Duration::from_secs(1), cap), cap);
    }

    #[test]
    fn jitter_bounds() {
        let d = Duration::from_secs(4);
        assert_eq!(Jitter::None.apply(d, 0.7), d);
        assert_eq!(Jitter::PlusMinus25.apply(d, 0.0), Duration::from_secs(3));
        assert_eq!(Jitter::PlusMinus25.apply(d, 1.0), Duration::from_secs(5));
        assert_eq!(Jitter::Equal.apply(d, 0.0), Duration::from_secs(2));
        assert_eq!(Jitter::Equal.apply(d, 1.0), d);
    }

    #[test]
    fn jittered_delays_stay_within_their_band() {
        let policy = Policy::new(Duration::from_secs(1), Duration::from_secs(256)).with_jitter(Jitter::PlusMinus25);
        for attempt in 0..12 {
            let nominal = delay(attempt, policy.base, policy.cap);
            for _ in 0..50 {
                let d = policy.delay(attempt);
                assert!(d >= nominal.mul_f64(0.75) && d <= nominal.mul_f64(1.25), "{d:?} for {nominal:?}");
            }
        }
        let equal = Policy::new(200 * MS, Duration::from_secs(10)).with_jitter(Jitter::Equal);
        for _ in 0..50 {
            let d = equal.delay(0);
            assert!(d >= 100 * MS && d <= 200 * MS, "{d:?}");
        }
    }

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let draws: Vec<f64> = (0..100).map(|_| unit_random()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn backoff_steps_and_resets() {
        let mut b = Policy::new(100 * MS, Duration::from_secs(5)).backoff();
        let steps: Vec<_> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1600, 3200, 5000]);
        assert_eq!(b.attempts(), 7);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(), 100 * MS);
    }
}
