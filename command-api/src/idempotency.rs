//! `Idempotency-Key`: the one place that decides whether a command runs or is answered from an
//! earlier run (`IdempotencyCache::execute`), over a bounded moka cache keyed by (user, key). Concurrent requests with
//! the same key are coalesced (one executes, the others wait for its answer). Keys and a digest of
//! the request are also recorded in the events' headers, so a restarted command API still answers a
//! retry of a command it accepted before (see `Actor::recover`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use domain::{IdempotencyTag, Receipt, UserId};

use crate::error::ApiError;
use crate::extract::RequestDigest;
use platform::position::Position;

/// What a command is answered with: what it names (its receipt), the version after it, and where
/// its last event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub receipt: Receipt,
    pub version: u32,
    pub position: Position,
}

impl Answer {
    pub fn new(receipt: Receipt, version: u32, position: Position) -> Self {
        Self { receipt, version, position }
    }
}

/// The answer of an executed command, and whether it is the replay of an earlier one.
#[derive(Debug)]
pub struct Executed {
    pub answer: Answer,
    pub replayed: bool,
}

#[derive(Debug)]
pub struct Stored {
    pub request_digest: String,
    pub answer: Answer,
}

#[derive(Clone)]
pub struct IdempotencyCache {
    cache: Cache<(UserId, String), Arc<Stored>>,
}

impl IdempotencyCache {
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        Self { cache: Cache::builder().max_capacity(max_entries).time_to_live(ttl).build() }
    }

    /// Runs `command` under the caller's `Idempotency-Key`: without a key it simply runs; with one,
    /// concurrent requests with the same key are coalesced (one runs, the others wait for its
    /// answer), a repeat of the same request gets the first answer (`replayed`), and another request
    /// under the same key is refused. A failed command remembers nothing, so it can be retried.
    pub async fn execute<F>(&self, user: &UserId, key: Option<&str>, digest: &RequestDigest, command: F) -> Result<Executed, ApiError>
    where
        F: Future<Output = Result<Answer, ApiError>>,
    {
        let Some(key) = key else {
            return command.await.map(|answer| Executed { answer, replayed: false });
        };
        let init = async {
            let answer = command.await?;
            Ok::<_, ApiError>(Arc::new(Stored { request_digest: digest.digest.clone(), answer }))
        };
        match self.cache.entry((user.clone(), key.to_owned())).or_try_insert_with(init).await {
            Ok(entry) if entry.is_fresh() => Ok(Executed { answer: entry.value().answer.clone(), replayed: false }),
            Ok(entry) if digest.matches(&entry.value().request_digest) => Ok(Executed { answer: entry.value().answer.clone(), replayed: true }),
            Ok(_) => Err(ApiError::IdempotencyKeyReused),
            Err(e) => Err((*e).clone()),
        }
    }

    /// Records an answer found in the log at restore.
    pub async fn remember(&self, user: &UserId, tag: &IdempotencyTag, answer: Answer) {
        let stored = Arc::new(Stored { request_digest: tag.request_digest.clone(), answer });
        self.cache.insert((user.clone(), tag.key.clone()), stored).await;
    }
}
