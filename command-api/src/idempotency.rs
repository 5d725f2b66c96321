//! `Idempotency-Key` answers: a bounded moka cache keyed by (user, key). Concurrent requests with
//! the same key are coalesced (one executes, the others wait for its answer). Keys and a digest of
//! the request are also recorded in the events' headers, so a restarted command API still answers a
//! retry of a command it accepted before (see `Actor::recover`).

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use domain::UserId;
use uuid::Uuid;
use platform::codec::IdempotencyTag;
use platform::position::Position;

/// What a command is about: its answer names the id accordingly (`task_id`, `notification_id`,
/// `webhook_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    Task,
    Notification,
    Webhook,
}

impl AnswerKind {
    pub fn id_field(self) -> &'static str {
        match self {
            AnswerKind::Task => "task_id",
            AnswerKind::Notification => "notification_id",
            AnswerKind::Webhook => "webhook_id",
        }
    }
}

/// What a command is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub id: Uuid,
    pub kind: AnswerKind,
    pub version: u32,
    pub position: Position,
    pub created: bool,
    /// SetWebhook: the signing secret, returned with the answer (and with a replay of it).
    pub secret: Option<Arc<str>>,
}

impl Answer {
    pub fn new(id: Uuid, kind: AnswerKind, version: u32, position: Position, created: bool) -> Self {
        Self { id, kind, version, position, created, secret: None }
    }
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

    pub fn cache(&self) -> &Cache<(UserId, String), Arc<Stored>> {
        &self.cache
    }

    /// Records an answer found in the log at restore.
    pub async fn remember(&self, user: &UserId, tag: &IdempotencyTag, answer: Answer) {
        let stored = Arc::new(Stored { request_digest: tag.request_digest.clone(), answer });
        self.cache.insert((user.clone(), tag.key.clone()), stored).await;
    }
}
