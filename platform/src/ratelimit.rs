//! Request budgets of the APIs (the `governor` crate's keyed GCRA limiters): one budget per user
//! (the token's subject) and, for requests without a valid token, one per client address. Each API
//! checks them before it does any work and answers a refusal in its own shape (the command API
//! 429 problem+json, the query API 429 `RATE_LIMITED`), both with `Retry-After`
//! ([`retry_after_secs`]); refusals are counted in the Prometheus counter the API names, labelled
//! `key="user"|"address"`.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

use domain::UserId;

/// A budget: `per_second` requests a second on average, `burst` at once; 0 per second turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// The budgets of one API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub per_user: Rate,
    /// For requests without a valid token, per client IP address.
    pub per_address: Rate,
}

impl Default for RateLimits {
    /// The settings' defaults of both APIs: per user high enough that `./dev bench` (thousands of
    /// requests a second from a few users) measures the API rather than the limit.
    fn default() -> Self {
        Self { per_user: Rate { per_second: 20_000, burst: 20_000 }, per_address: Rate { per_second: 50, burst: 100 } }
    }
}

/// The caller is over their budget; try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many requests: the rate limit of this {key} is reached; retry in {} s", retry_after_secs(*.retry_after))]
pub struct RateLimited {
    /// Whose budget: `user` or `address`.
    pub key: &'static str,
    pub retry_after: Duration,
}

/// Whole seconds, at least 1 (the unit of `Retry-After`).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

/// Entries kept before forgetting keys whose budget is full again.
const MAX_KEYS: usize = 100_000;

type Keyed<K> = Option<Arc<DefaultKeyedRateLimiter<K>>>;

/// The budgets of one API; clones share them.
#[derive(Clone)]
pub struct RateLimiter {
    users: Keyed<String>,
    addresses: Keyed<IpAddr>,
    /// The counter of refusals (e.g. `graphql_rate_limited_total`).
    metric: &'static str,
}

fn limiter<K: Hash + Eq + Clone>(rate: Rate) -> Keyed<K> {
    let per_second = NonZeroU32::new(rate.per_second)?;
    let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
    Some(Arc::new(DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))))
}

impl RateLimiter {
    /// Budgets of `limits`; refusals are counted in `metric`.
    pub fn new(limits: RateLimits, metric: &'static str) -> Self {
        Self { users: limiter(limits.per_user), addresses: limiter(limits.per_address), metric }
    }

    /// A request with a valid token of `user`.
    pub fn check_user(&self, user: &UserId) -> Result<(), RateLimited> {
        self.check(&self.users, &user.to_string(), "user")
    }

    /// A request without a valid token, from `address` (unknown when not served over TCP: those
    /// share one budget).
    pub fn check_address(&self, address: Option<IpAddr>) -> Result<(), RateLimited> {
        self.check(&self.addresses, &address.unwrap_or(IpAddr::from([0, 0, 0, 0])), "address")
    }

    fn check<K: Hash + Eq + Clone>(&self, limiter: &Keyed<K>, key: &K, name: &'static str) -> Result<(), RateLimited> {
        let Some(limiter) = limiter else { return Ok(()) };
        if limiter.len() > MAX_KEYS {
            limiter.retain_recent();
        }
        limiter.check_key(key).map_err(|not_until| {
            metrics::counter!(self.metric, "key" => name).increment(1);
            RateLimited { key: name, retry_after: not_until.wait_time_from(limiter.clock().now()) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2_100)), 3);
    }

    #[test]
    fn a_burst_over_the_budget_is_refused_and_other_users_are_not() {
        let limiter = RateLimiter::new(RateLimits { per_user: Rate { per_second: 1, burst: 3 }, ..RateLimits::default() }, "test_rate_limited_total");
        let (alice, bob) = (UserId::parse("alice".to_owned()).unwrap(), UserId::parse("bob".to_owned()).unwrap());
        let results: Vec<bool> = (0..5).map(|_| limiter.check_user(&alice).is_ok()).collect();
        assert_eq!(results, [true, true, true, false, false]);
        assert!(limiter.check_user(&bob).is_ok());
    }

    #[test]
    fn addresses_have_budgets_of_their_own_and_zero_turns_a_limit_off() {
        let limiter = RateLimiter::new(
            RateLimits { per_user: Rate { per_second: 0, burst: 0 }, per_address: Rate { per_second: 1, burst: 2 } },
            "test_rate_limited_total",
        );
        let (a, b) = (Some(IpAddr::from([10, 0, 0, 1])), Some(IpAddr::from([10, 0, 0, 2])));
        let results: Vec<bool> = (0..3).map(|_| limiter.check_address(a).is_ok()).collect();
        assert_eq!(results, [true, true, false]);
        assert_eq!(limiter.check_address(a).unwrap_err().key, "address");
        assert!(limiter.check_address(b).is_ok());
        let alice = UserId::parse("alice".to_owned()).unwrap();
        assert!((0..1_000).all(|_| limiter.check_user(&alice).is_ok()));
    }
}
