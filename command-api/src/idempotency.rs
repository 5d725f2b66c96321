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
use platform::keys::{DataKeys, KeyRing};
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
            Ok::<_, ApiError>(Arc::new(Stored { request_digest: digest.recorded().to_owned(), answer }))
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

/// An answer as a partition snapshot keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeptAnswer {
    pub user: String,
    pub key: String,
    pub digest: String,
    pub id_field: String,
    pub id: uuid::Uuid,
    pub created: bool,
    pub etag: bool,
    /// A generated secret (SetWebhook's), sealed with `secret_key`, the user's data key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<uuid::Uuid>,
    pub version: u32,
    pub partition: i32,
    pub offset: i64,
}

/// The `id_field`s a receipt can name (`Receipt::id_field` is a static name).
fn id_field(name: &str) -> Option<&'static str> {
    ["task_id", "notification_id", "webhook_id", "erasure_id"].into_iter().find(|f| *f == name)
}

impl IdempotencyCache {
    /// Every answer remembered for a command of `partition`, for its snapshot (a generated secret
    /// sealed with its user's data key; an answer whose user has none any more is left out).
    pub fn export(&self, partition: i32, keys: &KeyRing) -> Vec<KeptAnswer> {
        self.cache
            .iter()
            .filter(|(_, v)| v.answer.position.partition == partition)
            .filter_map(|(k, v)| {
                let (user, key) = &*k;
                let a = &v.answer;
                let (secret, secret_key) = match a.receipt.secret.as_deref() {
                    None => (None, None),
                    Some(s) => {
                        let data_key = keys.current(user.as_ref())?;
                        (Some(data_key.seal(s)), Some(data_key.id))
                    }
                };
                Some(KeptAnswer {
                    user: user.to_string(),
                    key: key.clone(),
                    digest: v.request_digest.clone(),
                    id_field: a.receipt.id_field.to_owned(),
                    id: a.receipt.id,
                    created: a.receipt.created,
                    etag: a.receipt.etag,
                    secret,
                    secret_key,
                    version: a.version,
                    partition: a.position.partition,
                    offset: a.position.offset,
                })
            })
            .collect()
    }

    /// Remembers the answers of a snapshot (one whose sealed secret cannot be opened any more, its
    /// user erased, is left out).
    pub async fn import(&self, answers: Vec<KeptAnswer>, keys: &dyn DataKeys) {
        for k in answers {
            let (Some(id_field), Ok(user)) = (id_field(&k.id_field), UserId::parse(k.user)) else { continue };
            let secret = match (k.secret, k.secret_key) {
                (Some(sealed), Some(id)) => match keys.data_key(&id).and_then(|key| key.open(&sealed)) {
                    Ok(s) => Some(s),
                    Err(_) => continue,
                },
                (secret, _) => secret,
            };
            let receipt = Receipt { id_field, id: k.id, created: k.created, etag: k.etag, secret: secret.map(Arc::from) };
            let answer = Answer::new(receipt, k.version, Position { partition: k.partition, offset: k.offset });
            self.cache.insert((user, k.key), Arc::new(Stored { request_digest: k.digest, answer })).await;
        }
    }
}
