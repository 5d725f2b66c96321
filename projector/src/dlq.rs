//! Dead letters: a record that cannot be decoded or applied goes to `<topic>.dlq` (with headers
//! naming the projection, the error and the original position) and to the `dead_letters` table;
//! the later records of the same key (task or user) are parked in `parked_records`, in log order,
//! until the dead letter is replayed (after a fix) or discarded. Other keys go on unaffected.
//! The live projector applies its batches through [`apply_live`], which makes these decisions and
//! hands the admitted records to `store` in the same transaction.
//!
//! Locking: the live projector reads the open dead letters of its batch's keys `FOR SHARE`, and a
//! replay/discard takes its dead letter `FOR UPDATE`, so a record is never parked behind a dead
//! letter that is being released at the same moment (it would never be applied).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{Connection, PgPool, Postgres, Transaction};

use platform::position::Position;
use platform::settings::KafkaSettings;

use platform::keys::KeyRing;

use crate::model::{Batch, FailedRecord, RawRecord};
use crate::store::{self, Applied, ApplyMode, StoreError, REBUILD_LOCK_KEY};

/// The projections a dead letter stops: all of them are applied together, in one transaction.
pub fn projection_label() -> String {
    store::PROJECTIONS.join(",")
}

/// Why a live batch could not be applied (with its dead letters and parked records).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not produce to the dead-letter topic: {0}")]
    DeadLetterTopic(String),
}

impl ApplyError {
    /// See [`StoreError::is_deterministic`]; the dead-letter topic being away is transient.
    pub fn is_deterministic(&self) -> bool {
        matches!(self, ApplyError::Store(e) if e.is_deterministic())
    }
}

impl From<sqlx::Error> for ApplyError {
    fn from(e: sqlx::Error) -> Self {
        ApplyError::Store(StoreError::Db(e))
    }
}

/// Produces dead letters to the dead-letter topic.
pub struct DeadLetterSink {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterSink {
    pub fn new(kafka: &KafkaSettings) -> anyhow::Result<Self> {
        let producer = platform::kafka::client_config(kafka, "taskstream-projector-dlq").set("enable.idempotence", "true").set("acks", "all").create()?;
        Ok(Self { producer, topic: kafka.dlq_topic() })
    }

    /// Sends one dead letter and waits until the broker has it.
    async fn send(&self, source_topic: &str, raw: &RawRecord, error: &str, id: i64) -> Result<(), ApplyError> {
        let mut headers = OwnedHeaders::new_with_capacity(raw.headers().len() + 6);
        for (key, value) in raw.headers() {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let label = projection_label();
        let (partition, offset, id) = (raw.position.partition.to_string(), raw.position.offset.to_string(), id.to_string());
        for (key, value) in [
            ("dlq_projection", label.as_str()),
            ("dlq_error", error),
            ("dlq_original_topic", source_topic),
            ("dlq_original_partition", partition.as_str()),
            ("dlq_original_offset", offset.as_str()),
            ("dlq_id", id.as_str()),
        ] {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(k) = raw.key() {
            record = record.key(k);
        }
        if let Some(p) = raw.payload() {
            record = record.payload(p);
        }
        self.producer.send(record, Duration::from_secs(10)).await.map(|_| ()).map_err(|(e, _)| ApplyError::DeadLetterTopic(e.to_string()))
    }
}

/// What `park` did to a batch.
#[derive(Debug, Default)]
pub struct Parking {
    pub dead_lettered: usize,
    pub parked: usize,
}

enum Blocker {
    Existing(i64),
    New(Position),
}

/// Applies a live batch in one transaction: its failed records become dead letters, the records
/// whose key waits behind an open dead letter are parked ([`park`]), the others are written, and
/// the offsets move to the end of the whole batch.
pub async fn apply_live(pool: &PgPool, topic: &str, batch: &Batch, from: &HashMap<i32, i64>, sink: &DeadLetterSink) -> Result<(Applied, Parking), ApplyError> {
    let mut tx = pool.begin().await?;
    // A stalled instance (stopped, cut off) must not hold its partitions' offsets rows for ever:
    // the new owner's positioning waits for them (rightly: this transaction may still commit).
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '30s'").execute(&mut *tx).await?;
    let (admitted, parking) = park(&mut tx, topic, batch, sink).await?;
    let mut applied = store::apply_batch_in(&mut tx, topic, &admitted, from, ApplyMode::Live).await?;
    tx.commit().await?;
    // Counted as before the split: every decoded record of the batch, parked ones included.
    applied.records = batch.len();
    Ok((applied, parking))
}

/// Within the batch's transaction: turns the batch's failed records into dead letters, parks every
/// record whose key has an open dead letter (older, or new in this batch), and returns the records
/// that may be applied.
pub async fn park<'b>(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    batch: &'b Batch,
    sink: &DeadLetterSink,
) -> Result<(Cow<'b, Batch>, Parking), ApplyError> {
    let mut keys: Vec<String> = batch.keys().map(|(k, _)| k).chain(batch.failed.iter().map(|f| f.raw.key_text())).collect();
    keys.sort_unstable();
    keys.dedup();
    let open: Vec<(String, i64)> =
        sqlx::query_as("SELECT record_key, id FROM dead_letters WHERE topic = $1 AND status = 'open' AND record_key = ANY($2) FOR SHARE")
            .bind(topic)
            .bind(&keys)
            .fetch_all(&mut **tx)
            .await?;
    if open.is_empty() && batch.failed.is_empty() {
        return Ok((Cow::Borrowed(batch), Parking::default()));
    }
    let mut blockers: HashMap<String, Blocker> = open.into_iter().map(|(k, id)| (k, Blocker::Existing(id))).collect();
    let is_blocked = |blockers: &HashMap<String, Blocker>, key: &str, at: Position| match blockers.get(key) {
        Some(Blocker::Existing(_)) => true,
        Some(Blocker::New(p)) => *p < at,
        None => false,
    };

    // Failed records in log order: the first of a free key becomes a dead letter, the rest park.
    let mut failed: Vec<&FailedRecord> = batch.failed.iter().collect();
    failed.sort_by_key(|f| f.raw.position);
    let mut to_park: Vec<&RawRecord> = Vec::new();
    let mut letters: Vec<&FailedRecord> = Vec::new();
    for f in failed {
        let key = f.raw.key_text();
        if is_blocked(&blockers, &key, f.raw.position) {
            to_park.push(&f.raw);
        } else {
            blockers.insert(key, Blocker::New(f.raw.position));
            letters.push(f);
        }
    }
    let raw_by_position: HashMap<Position, &RawRecord> = batch.raw.iter().map(|r| (r.position, r)).collect();
    let mut parked_messages: Vec<RawRecord> = Vec::new();
    let mut admitted = Batch { to: batch.to.clone(), ..Batch::default() };
    for r in &batch.tasks {
        if is_blocked(&blockers, &r.envelope.subject.to_string(), r.position) {
            parked_messages.push((*raw_by_position.get(&r.position).ok_or_else(|| missing_raw(r.position))?).clone());
        } else {
            admitted.tasks.push(r.clone());
        }
    }
    for r in &batch.users {
        if is_blocked(&blockers, r.envelope.meta.user_id.as_ref(), r.position) {
            parked_messages.push((*raw_by_position.get(&r.position).ok_or_else(|| missing_raw(r.position))?).clone());
        } else {
            admitted.users.push(r.clone());
        }
    }

    let mut letter_ids: HashMap<String, i64> = blockers
        .iter()
        .filter_map(|(k, b)| match b {
            Blocker::Existing(id) => Some((k.clone(), *id)),
            Blocker::New(_) => None,
        })
        .collect();
    for f in &letters {
        let id = insert_letter(tx, topic, f).await?;
        tracing::error!(
            dead_letter = id, partition = f.raw.position.partition, offset = f.raw.position.offset,
            key = %f.raw.key_text(), error.message = %f.error, "record dead-lettered; later records of its key are parked"
        );
        sink.send(topic, &f.raw, &f.error, id).await?;
        letter_ids.insert(f.raw.key_text(), id);
    }
    to_park.extend(parked_messages.iter());
    for raw in &to_park {
        let id = letter_ids[&raw.key_text()];
        insert_parked(tx, topic, raw, id).await?;
    }
    metrics::counter!("projector_dead_letters_total").increment(letters.len() as u64);
    metrics::counter!("projector_parked_records_total").increment(to_park.len() as u64);
    Ok((Cow::Owned(admitted), Parking { dead_lettered: letters.len(), parked: to_park.len() }))
}

fn missing_raw(p: Position) -> ApplyError {
    ApplyError::DeadLetterTopic(format!("internal: the raw record at {}/{} was not kept", p.partition, p.offset))
}

async fn insert_letter(tx: &mut Transaction<'_, Postgres>, topic: &str, f: &FailedRecord) -> Result<i64, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO dead_letters (topic, partition, log_offset, record_key, event_type, projection, error, header_names, header_values, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (topic, partition, log_offset) DO UPDATE SET error = EXCLUDED.error
         RETURNING id",
    )
    .bind(topic)
    .bind(f.raw.position.partition)
    .bind(f.raw.position.offset)
    .bind(f.raw.key_text())
    .bind(f.raw.event_type())
    .bind(projection_label())
    .bind(&f.error)
    .bind(f.raw.header_names())
    .bind(f.raw.header_values())
    .bind(f.raw.payload())
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}

async fn insert_parked(tx: &mut Transaction<'_, Postgres>, topic: &str, raw: &RawRecord, letter: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO parked_records (topic, partition, log_offset, record_key, dead_letter_id, header_names, header_values, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (topic, partition, log_offset) DO NOTHING",
    )
    .bind(topic)
    .bind(raw.position.partition)
    .bind(raw.position.offset)
    .bind(raw.key_text())
    .bind(letter)
    .bind(raw.header_names())
    .bind(raw.header_values())
    .bind(raw.payload())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Log positions a replay of the log must skip to build what the live projection has: records of
/// open or discarded dead letters, and parked records.
pub async fn skipped_positions(conn: &mut sqlx::PgConnection, topic: &str) -> Result<std::collections::HashSet<Position>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, log_offset FROM dead_letters WHERE topic = $1 AND status <> 'replayed'
         UNION ALL SELECT partition, log_offset FROM parked_records WHERE topic = $1",
    )
    .bind(topic)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(partition, offset)| Position { partition, offset }).collect())
}

/// One row of `projector dlq list`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub status: String,
    pub record_key: String,
    pub event_type: Option<String>,
    pub error: String,
    pub topic: String,
    pub partition: i32,
    pub log_offset: i64,
    pub parked: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

pub async fn list(pool: &PgPool, topic: &str, all: bool) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT d.id, d.status, d.record_key, d.event_type, d.error, d.topic, d.partition, d.log_offset, d.created_at,
                (SELECT count(*) FROM parked_records p WHERE p.dead_letter_id = d.id) AS parked
         FROM dead_letters d WHERE d.topic = $1 AND ($2 OR d.status = 'open') ORDER BY d.id",
    )
    .bind(topic)
    .bind(all)
    .fetch_all(pool)
    .await
}

pub fn render(letters: &[DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead letters\n".to_owned();
    }
    let mut out = format!("{:>6}  {:<9}  {:<36}  {:<22}  {:<24}  {:>6}  {}\n", "ID", "STATUS", "KEY", "TYPE", "POSITION", "PARKED", "ERROR");
    for d in letters {
        let position = format!("{}/{}/{}", d.topic, d.partition, d.log_offset);
        out.push_str(&format!(
            "{:>6}  {:<9}  {:<36}  {:<22}  {:<24}  {:>6}  {}\n",
            d.id,
            d.status,
            d.record_key,
            d.event_type.as_deref().unwrap_or("-"),
            position,
            d.parked,
            d.error.replace('\n', " ")
        ));
    }
    out
}

/// What to do with a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Apply it (after a fix), then its parked records.
    Replay,
    /// Drop it, then apply its parked records.
    Discard,
}

/// What releasing one dead letter did.
#[derive(Debug, Default)]
pub struct Released {
    pub applied: usize,
    /// A parked record that failed in turn: the new dead letter its key now waits behind.
    pub new_dead_letter: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("no dead letter {0}")]
    NotFound(i64),
    #[error("dead letter {0} is {1} already")]
    NotOpen(i64, String),
    #[error("a rebuild is running; replay or discard dead letters after it has finished")]
    RebuildRunning,
    #[error("dead letter {id} still fails, left as it was: {error}")]
    StillFails { id: i64, error: String },
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl From<StoreError> for ReleaseError {
    fn from(e: StoreError) -> Self {
        ReleaseError::Apply(ApplyError::Store(e))
    }
}

impl From<sqlx::Error> for ReleaseError {
    fn from(e: sqlx::Error) -> Self {
        ReleaseError::Apply(ApplyError::from(e))
    }
}

#[derive(sqlx::FromRow)]
struct StoredRecord {
    partition: i32,
    log_offset: i64,
    record_key: String,
    header_names: Vec<String>,
    header_values: Vec<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

impl StoredRecord {
    fn raw(&self) -> RawRecord {
        let headers: Vec<(&str, Option<&[u8]>)> =
            self.header_names.iter().zip(&self.header_values).map(|(name, value)| (name.as_str(), Some(value.as_slice()))).collect();
        RawRecord::new(Position { partition: self.partition, offset: self.log_offset }, Some(self.record_key.as_bytes()), &headers, self.payload.as_deref())
    }
}

/// Replays or discards one open dead letter and applies its parked records in log order, all in
/// one transaction (live mode: their reactions happen now). A parked record that fails in turn
/// becomes the new dead letter of its key, and the records after it stay parked behind it.
pub async fn release(pool: &PgPool, sink: &DeadLetterSink, id: i64, how: Release, keys: &KeyRing) -> Result<Released, ReleaseError> {
    let mut tx = pool.begin().await?;
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock_shared($1)").bind(REBUILD_LOCK_KEY).fetch_one(&mut *tx).await?;
    if !free {
        return Err(ReleaseError::RebuildRunning);
    }
    let letter: Option<(String, String, StoredRecord)> = sqlx::query_as::<_, (String, String, i32, i64, String, Vec<String>, Vec<Vec<u8>>, Option<Vec<u8>>)>(
        "SELECT status, topic, partition, log_offset, record_key, header_names, header_values, payload
         FROM dead_letters WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .map(|(status, topic, partition, log_offset, record_key, header_names, header_values, payload)| {
        (status, topic, StoredRecord { partition, log_offset, record_key, header_names, header_values, payload })
    });
    let Some((status, topic, letter)) = letter else {
        return Err(ReleaseError::NotFound(id));
    };
    if status != "open" {
        return Err(ReleaseError::NotOpen(id, status));
    }
    let parked: Vec<StoredRecord> = sqlx::query_as(
        "SELECT partition, log_offset, record_key, header_names, header_values, payload
         FROM parked_records WHERE dead_letter_id = $1 ORDER BY partition, log_offset",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;

    let mut released = Released::default();
    if how == Release::Replay {
        if let Err(error) = apply_one(&mut tx, &letter.raw(), keys).await? {
            return Err(ReleaseError::StillFails { id, error });
        }
        released.applied += 1;
    }
    let mut blocked_by: Option<i64> = None;
    for record in &parked {
        let raw = record.raw();
        if let Some(new_id) = blocked_by {
            sqlx::query("UPDATE parked_records SET dead_letter_id = $1 WHERE topic = $2 AND partition = $3 AND log_offset = $4")
                .bind(new_id)
                .bind(&topic)
                .bind(record.partition)
                .bind(record.log_offset)
                .execute(&mut *tx)
                .await?;
            continue;
        }
        sqlx::query("DELETE FROM parked_records WHERE topic = $1 AND partition = $2 AND log_offset = $3")
            .bind(&topic)
            .bind(record.partition)
            .bind(record.log_offset)
            .execute(&mut *tx)
            .await?;
        match apply_one(&mut tx, &raw, keys).await? {
            Ok(()) => released.applied += 1,
            Err(error) => {
                let failed = FailedRecord { raw, error };
                let new_id = insert_letter(&mut tx, &topic, &failed).await?;
                sink.send(&topic, &failed.raw, &failed.error, new_id).await?;
                blocked_by = Some(new_id);
                released.new_dead_letter = Some(new_id);
            }
        }
    }
    let new_status = match how {
        Release::Replay => "replayed",
        Release::Discard => "discarded",
    };
    sqlx::query("UPDATE dead_letters SET status = $2, resolved_at = now() WHERE id = $1").bind(id).bind(new_status).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(released)
}

/// Applies one stored record inside a savepoint: `Ok(Err(..))` when it cannot be decoded or applied
/// (the savepoint is rolled back), `Err` for a transient failure.
async fn apply_one(tx: &mut Transaction<'_, Postgres>, raw: &RawRecord, keys: &KeyRing) -> Result<Result<(), String>, StoreError> {
    let mut batch = Batch::default();
    batch.push(raw.clone(), keys).await.map_err(|e| StoreError::Keys(e.to_string()))?;
    if let Some(f) = batch.failed.pop() {
        return Ok(Err(f.error));
    }
    let mut sp = tx.begin().await?;
    match store::apply_records(&mut sp, &batch, ApplyMode::Live).await {
        Ok(_) => {
            sp.commit().await?;
            Ok(Ok(()))
        }
        Err(e) => {
            let e = StoreError::Db(e);
            if e.is_deterministic() {
                sp.rollback().await?;
                Ok(Err(format!("cannot apply: {e}")))
            } else {
                Err(e)
            }
        }
    }
}
