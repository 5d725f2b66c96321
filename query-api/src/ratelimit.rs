//! Rate limits of GraphQL requests (the `governor` crate's keyed GCRA limiters): one budget per
//! user (the token's subject) and, for requests without a valid token, one per client address.
//! A request over its budget is refused before it is parsed, with `RATE_LIMITED`, HTTP 429 and
//! `Retry-After`, and counted in `graphql_rate_limited_total{key="user"|"address"}`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use domain::UserId;

/// A budget: `per_second` requests a second on average, `burst` at once; 0 per second turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// The budgets of the query API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub per_user: Rate,
    /// For requests without a valid token, per client IP address.
    pub per_address: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self { per_user: Rate { per_second: 20_000, burst: 20_000 }, per_address: Rate { per_second: 50, burst: 100 } }
    }
}

/// The caller is over their budget; try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many requests: the rate limit of this {key} is reached; retry in {} s", retry_after_secs(*.retry_after))]
pub struct RateLimited {
    pub key: &'static str,
    pub retry_after: Duration,
}

/// Whole seconds, at least 1 (the unit of `Retry-After`).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

/// Entries kept before forgetting keys whose budget is full again.
const MAX_KEYS: usize = 100_000;

#[derive(Clone)]
pub struct RateLimiter {
    users: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    addresses: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(rate: Rate) -> Option<Arc<DefaultKeyedRateLimiter<K>>> {
    let per_second = NonZeroU32::new(rate.per_second)?;
    let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
    Some(Arc::new(DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))))
}

fn check<K: std::hash::Hash + Eq + Clone>(limiter: &Option<Arc<DefaultKeyedRateLimiter<K>>>, key: &K, name: &'static str) -> Result<(), RateLimited> {
    let Some(limiter) = limiter else { return Ok(()) };
    if limiter.len() > MAX_KEYS {
        limiter.retain_recent();
    }
    limiter.check_key(key).map_err(|not_until| {
        metrics::counter!("graphql_rate_limited_total", "key" => name).increment(1);
        RateLimited { key: name, retry_after: not_until.wait_time_from(DefaultClock::default().now()) }
    })
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        Self { users: limiter(limits.per_user), addresses: limiter(limits.per_address) }
    }

    pub fn check_user(&self, user: &UserId) -> Result<(), RateLimited> {
        check(&self.users, &user.to_string(), "user")
    }

    /// A request without a valid token, from `address` (unknown when not served over TCP).
    pub fn check_address(&self, address: Option<IpAddr>) -> Result<(), RateLimited> {
        check(&self.addresses, &address.unwrap_or(IpAddr::from([0, 0, 0, 0])), "address")
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
        let limiter = RateLimiter::new(RateLimits { per_user: Rate { per_second: 1, burst: 3 }, ..RateLimits::default() });
        let (alice, bob) = (UserId::parse("alice".to_owned()).unwrap(), UserId::parse("bob".to_owned()).unwrap());
        let results: Vec<bool> = (0..5).map(|_| limiter.check_user(&alice).is_ok()).collect();
        assert_eq!(results, [true, true, true, false, false]);
        assert!(limiter.check_user(&bob).is_ok());
    }
}
