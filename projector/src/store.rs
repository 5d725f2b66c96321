//! PostgreSQL side of the projections: load rows, write a folded batch with UNNEST, and move the
//! per-partition offsets in the same transaction (with a compare-and-set, so two projector
//! instances can never both apply the same records). SQL only: it writes every record it is
//! given; which records wait behind a dead letter is decided above it, in `dlq`. Imports `model`.

use std::collections::HashMap;

use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use domain::{DomainEvent, TaskId};

use domain::user::UserEvent;

use crate::model::{Batch, Effects, NotificationRow, Reaction, Recorded, RecordedUser, RowState, TaskRow};

/// Whether events are applied live (reactions are recorded for the reactor) or replayed (never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    Live,
    Replay,
}

pub use platform::projections::{NOTIFICATIONS_CHANNEL, PROGRESS_CHANNEL, PROJECTIONS, TASK_CHANGES_CHANNEL};

/// The PostgreSQL advisory lock of the rebuild: a rebuild holds it exclusively while it runs; a
/// dead-letter release (shared) and the live projector's check for new projections (exclusive, for
/// one transaction) only try it, so none of them overlaps a rebuild.
pub const REBUILD_LOCK_KEY: i64 = 0x7473_7265_6275_696c;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another projector instance moved the offsets of topic {topic}; re-reading them")]
    Fenced { topic: String },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The data keys could not be read (Kafka away): transient.
    #[error("the data keys are unavailable: {0}")]
    Keys(String),
}

impl StoreError {
    /// A failure that the same records would meet again (bad data or a violated constraint), as
    /// opposed to a transient one (connection lost, database restarting, timeout, deadlock).
    pub fn is_deterministic(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => e.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            _ => false,
        }
    }
}

/// Makes sure every (projection, partition) has an offset row (a new partition starts at 0; a new
/// projection at the others' offsets, and `rebuild::new_projections` rebuilds it) and returns
/// the next offset to apply for each of `partitions` (the minimum across projections).
pub async fn init_offsets(pool: &PgPool, topic: &str, partitions: &[i32]) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let names: Vec<String> = PROJECTIONS.iter().map(|s| s.to_string()).collect();
    sqlx::query(
        "INSERT INTO projection_offsets (projection, topic, partition, next_offset)
         SELECT n, $2, p, COALESCE((SELECT min(o.next_offset) FROM projection_offsets o
                                    WHERE o.topic = $2 AND o.partition = p AND o.projection = ANY($1)), 0)
         FROM UNNEST($1::text[]) AS n CROSS JOIN UNNEST($3::int4[]) AS p
         ON CONFLICT (projection, topic, partition) DO NOTHING",
    )
    .bind(&names)
    .bind(topic)
    .bind(partitions)
    .execute(pool)
    .await?;
    let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, min(next_offset), max(next_offset) FROM projection_offsets
         WHERE topic = $1 AND projection = ANY($2) AND partition = ANY($3) GROUP BY partition",
    )
    .bind(topic)
    .bind(&names)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::new();
    for (p, min, max) in rows {
        if min != max {
            // Projections are written together, so they only differ when one was added later;
            // replaying from the lower offset is safe (both writes are idempotent by version/id),
            // and the offset compare-and-set accepts a projection that is behind.
            tracing::info!(partition = p, min, max, "projections are at different offsets; resuming from the lowest");
        }
        out.insert(p, min);
    }
    Ok(out)
}

/// The rows a batch folds onto. Live, they are locked until the batch commits; a replay is the only
/// writer of its copies and does not lock (a row lock is a write: it dirties the page and logs WAL).
async fn load_rows(tx: &mut Transaction<'_, Postgres>, ids: &[Uuid], mode: ApplyMode) -> Result<HashMap<TaskId, TaskRow>, sqlx::Error> {
    const SELECT: &str = "SELECT id, user_id, title, description, status, priority, due_at, timezone, recurrence, remind_before,
                remind_at, tags, version, created_at, updated_at, completed_at, recurrence_parent_id, occurrence,
                reminded_for
         FROM tasks WHERE id = ANY($1)";
    let sql = match mode {
        ApplyMode::Live => format!("{SELECT} FOR UPDATE"),
        ApplyMode::Replay => SELECT.to_owned(),
    };
    let rows: Vec<TaskRow> = sqlx::query_as(&sql).bind(ids).fetch_all(&mut **tx).await?;
    Ok(rows.into_iter().map(|r| (TaskId::from_uuid(r.id), r)).collect())
}

/// What a committed batch produced.
#[derive(Debug, Default)]
pub struct Applied {
    /// Reaction commands recorded in the outbox (live mode only).
    pub reactions: usize,
    /// Webhook deliveries enqueued (live mode only).
    pub deliveries: usize,
    /// Decoded records in the batch.
    pub records: usize,
}

/// Applies a batch to every projection and advances their offsets from `from` to `batch.to`
/// (per partition), all in one transaction. In live mode the reactions the events call for are
/// recorded in the outbox in the same transaction. Every record of the batch is written: which
/// records wait behind a dead letter is decided above (`dlq::apply_live`).
pub async fn apply_batch(pool: &PgPool, topic: &str, batch: &Batch, from: &HashMap<i32, i64>, mode: ApplyMode) -> Result<Applied, StoreError> {
    let mut tx = pool.begin().await?;
    let applied = apply_batch_in(&mut tx, topic, batch, from, mode).await?;
    tx.commit().await?;
    Ok(applied)
}

/// [`apply_batch`] inside a transaction that the caller holds and commits.
pub async fn apply_batch_in(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    batch: &Batch,
    from: &HashMap<i32, i64>,
    mode: ApplyMode,
) -> Result<Applied, StoreError> {
    let mut applied = apply_records(tx, batch, mode).await?;
    advance_offsets(tx, topic, from, &batch.to, mode).await?;
    applied.records = batch.len();
    Ok(applied)
}

/// Writes the decoded records of a batch to every projection (no offsets).
pub async fn apply_records(tx: &mut Transaction<'_, Postgres>, batch: &Batch, mode: ApplyMode) -> Result<Applied, sqlx::Error> {
    let mut ids: Vec<Uuid> = batch.tasks.iter().map(|r| *r.envelope.subject.as_uuid()).collect();
    ids.sort_unstable();
    ids.dedup();
    let loaded = load_rows(tx, &ids, mode).await?;
    let (folded, Effects { reactions, notifications }) = crate::model::fold_with_effects(loaded, &batch.tasks);
    write_schedule(tx, &ids, &folded).await?;
    write_tasks(tx, folded).await?;
    write_history(tx, &batch.tasks).await?;
    write_user_events(tx, &batch.users, mode).await?;
    write_notifications(tx, &notifications).await?;
    let applied = match mode {
        ApplyMode::Live => {
            Applied { reactions: write_outbox(tx, &reactions).await?, deliveries: enqueue_deliveries(tx, &notifications).await?, ..Applied::default() }
        }
        ApplyMode::Replay => Applied::default(),
    };
    if mode == ApplyMode::Live {
        announce_changes(tx, &batch.tasks, &notifications).await?;
    }
    Ok(applied)
}

/// NOTIFYs (delivered at commit, so a subscriber that re-queries sees the change) for live updates.
async fn announce_changes(tx: &mut Transaction<'_, Postgres>, tasks: &[Recorded], notifications: &[NotificationRow]) -> Result<(), sqlx::Error> {
    let changes: Vec<serde_json::Value> = tasks
        .iter()
        .map(|r| {
            let e = &r.envelope;
            let kind = e.event.event_type().trim_start_matches("task.");
            json!({"user": e.meta.user_id.as_ref(), "task_id": e.subject, "kind": kind, "version": e.meta.sequence})
        })
        .collect();
    let created: Vec<serde_json::Value> = notifications.iter().map(|n| json!({"user": n.user_id, "id": n.id})).collect();
    // NOTIFY payloads are limited to 8000 bytes: send JSON arrays of at most ~7000.
    for (channel, items) in [(TASK_CHANGES_CHANNEL, changes), (NOTIFICATIONS_CHANNEL, created)] {
        let mut payloads: Vec<String> = Vec::new();
        let mut current = String::new();
        for item in items {
            let text = item.to_string();
            if !current.is_empty() && current.len() + text.len() + 2 > 7000 {
                payloads.push(format!("[{current}]"));
                current.clear();
            }
            if !current.is_empty() {
                current.push(',');
            }
            current.push_str(&text);
        }
        if !current.is_empty() {
            payloads.push(format!("[{current}]"));
        }
        if !payloads.is_empty() {
            sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p").bind(channel).bind(&payloads).execute(&mut **tx).await?;
        }
    }
    Ok(())
}

/// Notification read marks and webhook registrations.
async fn write_user_events(tx: &mut Transaction<'_, Postgres>, users: &[RecordedUser], mode: ApplyMode) -> Result<(), sqlx::Error> {
    for r in users {
        let e = &r.envelope;
        let version = i32::try_from(e.meta.sequence).unwrap_or(i32::MAX);
        match &e.event {
            // The row came from the reminder's `task.reminder_due` (logs written before this event
            // existed have none); the user stream's own record of it changes no row.
            UserEvent::NotificationCreated(_) => {}
            UserEvent::NotificationRead(n) => {
                sqlx::query(
                    "INSERT INTO notification_reads (notification_id, user_id, read_at) VALUES ($1, $2, $3)
                     ON CONFLICT (notification_id) DO NOTHING",
                )
                .bind(n.notification_id)
                .bind(e.meta.user_id.as_ref())
                .bind(e.meta.occurred_at)
                .execute(&mut **tx)
                .await?;
            }
            UserEvent::Erased(erased) => erase_user(tx, e.meta.user_id.as_ref(), &erased.data_keys, mode).await?,
            UserEvent::WebhookRegistered(_) | UserEvent::WebhookRemoved => {
                let (url, secret) = match &e.event {
                    UserEvent::WebhookRegistered(w) => (Some(w.url.as_ref().to_owned()), Some(w.secret.clone())),
                    _ => (None, None),
                };
                sqlx::query(
                    "INSERT INTO webhooks (user_id, url, secret, version, updated_at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (user_id) DO UPDATE
                     SET url = EXCLUDED.url, secret = EXCLUDED.secret, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
                     WHERE webhooks.version < EXCLUDED.version",
                )
                .bind(e.meta.user_id.as_ref())
                .bind(url)
                .bind(secret)
                .bind(version)
                .bind(e.meta.occurred_at)
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    Ok(())
}

/// One delivery per new notification whose user has a webhook registered.
async fn enqueue_deliveries(tx: &mut Transaction<'_, Postgres>, rows: &[NotificationRow]) -> Result<usize, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = rows.iter().map(|n| n.id).collect();
    let users: Vec<&str> = rows.iter().map(|n| n.user_id.as_str()).collect();
    let payloads: Vec<serde_json::Value> = rows
        .iter()
        .map(|n| {
            json!({
                "type": "notification.created",
                "notification": {
                    "id": n.id, "task_id": n.task_id, "kind": n.kind, "message": n.message, "created_at": n.created_at,
                },
                "user_id": n.user_id,
            })
        })
        .collect();
    let n = sqlx::query(
        "INSERT INTO webhook_deliveries (id, notification_id, user_id, url, payload)
         SELECT v.id, v.id, v.user_id, w.url, v.payload
         FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[]) AS v(id, user_id, payload)
         JOIN webhooks w ON w.user_id = v.user_id AND w.url IS NOT NULL
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .bind(users)
    .bind(payloads)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n as usize)
}

/// Keeps `reminder_schedule` in step with the rows: one row per pending reminder.
async fn write_schedule(tx: &mut Transaction<'_, Postgres>, touched: &[Uuid], folded: &HashMap<TaskId, Option<RowState>>) -> Result<(), sqlx::Error> {
    let mut ids = Vec::new();
    let mut users = Vec::new();
    let mut ats = Vec::new();
    for state in folded.values() {
        if let Some(RowState::Present(r)) = state {
            if let Some(at) = r.pending_reminder() {
                ids.push(r.id);
                users.push(r.user_id.clone());
                ats.push(at);
            }
        }
    }
    sqlx::query("DELETE FROM reminder_schedule WHERE task_id = ANY($1) AND NOT (task_id = ANY($2))").bind(touched).bind(&ids).execute(&mut **tx).await?;
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO reminder_schedule (task_id, user_id, remind_at)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[])
             ON CONFLICT (task_id) DO UPDATE SET remind_at = EXCLUDED.remind_at",
        )
        .bind(&ids)
        .bind(&users)
        .bind(&ats)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn write_notifications(tx: &mut Transaction<'_, Postgres>, rows: &[NotificationRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = rows.iter().map(|n| n.id).collect();
    let users: Vec<&str> = rows.iter().map(|n| n.user_id.as_str()).collect();
    let tasks: Vec<Uuid> = rows.iter().map(|n| n.task_id).collect();
    let kinds: Vec<&str> = rows.iter().map(|n| n.kind).collect();
    let messages: Vec<&str> = rows.iter().map(|n| n.message.as_str()).collect();
    let created: Vec<chrono::DateTime<chrono::Utc>> = rows.iter().map(|n| n.created_at).collect();
    let events: Vec<Uuid> = rows.iter().map(|n| n.event_id).collect();
    sqlx::query(
        "INSERT INTO notifications (id, user_id, task_id, kind, message, created_at, event_id)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[], $7::uuid[])
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .bind(users)
    .bind(tasks)
    .bind(kinds)
    .bind(messages)
    .bind(created)
    .bind(events)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_outbox(tx: &mut Transaction<'_, Postgres>, reactions: &[Reaction]) -> Result<usize, sqlx::Error> {
    if reactions.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = reactions.iter().map(|r| r.id).collect();
    let kinds: Vec<&str> = reactions.iter().map(|r| r.kind).collect();
    let users: Vec<&str> = reactions.iter().map(|r| r.user_id.as_str()).collect();
    let tasks: Vec<Uuid> = reactions.iter().map(|r| r.task_id).collect();
    let payloads: Vec<serde_json::Value> = reactions.iter().map(|r| r.payload.clone()).collect();
    let causes: Vec<Uuid> = reactions.iter().map(|r| r.causation_id).collect();
    let corrs: Vec<Option<&str>> = reactions.iter().map(|r| r.correlation_id.as_deref()).collect();
    let traces: Vec<Option<&str>> = reactions.iter().map(|r| r.traceparent.as_deref()).collect();
    let n = sqlx::query(
        "INSERT INTO reaction_outbox (id, kind, user_id, task_id, payload, causation_id, correlation_id, traceparent)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::jsonb[], $6::uuid[], $7::text[], $8::text[])
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .bind(kinds)
    .bind(users)
    .bind(tasks)
    .bind(payloads)
    .bind(causes)
    .bind(corrs)
    .bind(traces)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n as usize)
}

async fn write_tasks(tx: &mut Transaction<'_, Postgres>, folded: HashMap<TaskId, Option<RowState>>) -> Result<(), sqlx::Error> {
    let mut removed: Vec<Uuid> = Vec::new();
    let mut rows: Vec<TaskRow> = Vec::new();
    for (id, state) in folded {
        match state {
            Some(RowState::Present(r)) => rows.push(r),
            Some(RowState::Removed) => removed.push(*id.as_uuid()),
            None => {}
        }
    }
    if !removed.is_empty() {
        sqlx::query("DELETE FROM tasks WHERE id = ANY($1)").bind(&removed).execute(&mut **tx).await?;
    }
    if rows.is_empty() {
        return Ok(());
    }
    // Stable order avoids deadlocks between concurrent writers.
    rows.sort_unstable_by_key(|r| r.id);
    let mut c = TaskColumns::default();
    for r in rows {
        c.push(r);
    }
    sqlx::query(
        "INSERT INTO tasks (id, user_id, title, description, status, priority, due_at, timezone, recurrence,
                            remind_before, remind_at, tags, version, created_at, updated_at, completed_at,
                            recurrence_parent_id, occurrence, reminded_for)
         SELECT v.id, v.user_id, v.title, v.description, v.status, v.priority, v.due_at, v.timezone, v.recurrence,
                v.remind_before, v.remind_at,
                ARRAY(SELECT e FROM jsonb_array_elements_text(v.tags) WITH ORDINALITY AS t(e, i) ORDER BY i),
                v.version, v.created_at, v.updated_at, v.completed_at, v.parent, v.occurrence, v.reminded_for
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::timestamptz[],
                     $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::jsonb[], $13::int4[],
                     $14::timestamptz[], $15::timestamptz[], $16::timestamptz[], $17::uuid[], $18::int4[],
                     $19::timestamptz[])
              AS v(id, user_id, title, description, status, priority, due_at, timezone, recurrence, remind_before,
                   remind_at, tags, version, created_at, updated_at, completed_at, parent, occurrence, reminded_for)
         ON CONFLICT (id) DO UPDATE SET
            user_id = EXCLUDED.user_id, title = EXCLUDED.title, description = EXCLUDED.description,
            status = EXCLUDED.status, priority = EXCLUDED.priority, due_at = EXCLUDED.due_at,
            timezone = EXCLUDED.timezone, recurrence = EXCLUDED.recurrence, remind_before = EXCLUDED.remind_before,
            remind_at = EXCLUDED.remind_at, tags = EXCLUDED.tags, version = EXCLUDED.version,
            created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, completed_at = EXCLUDED.completed_at,
            recurrence_parent_id = EXCLUDED.recurrence_parent_id, occurrence = EXCLUDED.occurrence,
            reminded_for = EXCLUDED.reminded_for
         WHERE tasks.version < EXCLUDED.version",
    )
    .bind(c.id)
    .bind(c.user_id)
    .bind(c.title)
    .bind(c.description)
    .bind(c.status)
    .bind(c.priority)
    .bind(c.due_at)
    .bind(c.timezone)
    .bind(c.recurrence)
    .bind(c.remind_before)
    .bind(c.remind_at)
    .bind(c.tags)
    .bind(c.version)
    .bind(c.created_at)
    .bind(c.updated_at)
    .bind(c.completed_at)
    .bind(c.parent)
    .bind(c.occurrence)
    .bind(c.reminded_for)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(Default)]
struct TaskColumns {
    id: Vec<Uuid>,
    user_id: Vec<String>,
    title: Vec<String>,
    description: Vec<Option<String>>,
    status: Vec<String>,
    priority: Vec<i16>,
    due_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    timezone: Vec<String>,
    recurrence: Vec<Option<String>>,
    remind_before: Vec<Option<String>>,
    remind_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    tags: Vec<serde_json::Value>,
    version: Vec<i32>,
    created_at: Vec<chrono::DateTime<chrono::Utc>>,
    updated_at: Vec<chrono::DateTime<chrono::Utc>>,
    completed_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    parent: Vec<Option<Uuid>>,
    occurrence: Vec<Option<i32>>,
    reminded_for: Vec<Option<chrono::DateTime<chrono::Utc>>>,
}

impl TaskColumns {
    fn push(&mut self, r: TaskRow) {
        self.id.push(r.id);
        self.user_id.push(r.user_id);
        self.title.push(r.title);
        self.description.push(r.description);
        self.status.push(r.status);
        self.priority.push(r.priority);
        self.due_at.push(r.due_at);
        self.timezone.push(r.timezone);
        self.recurrence.push(r.recurrence);
        self.remind_before.push(r.remind_before);
        self.remind_at.push(r.remind_at);
        self.tags.push(json!(r.tags));
        self.version.push(r.version);
        self.created_at.push(r.created_at);
        self.updated_at.push(r.updated_at);
        self.completed_at.push(r.completed_at);
        self.parent.push(r.recurrence_parent_id);
        self.occurrence.push(r.occurrence);
        self.reminded_for.push(r.reminded_for);
    }
}

async fn write_history(tx: &mut Transaction<'_, Postgres>, batch: &[Recorded]) -> Result<(), sqlx::Error> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut event_id = Vec::with_capacity(batch.len());
    let mut task_id = Vec::with_capacity(batch.len());
    let mut user_id = Vec::with_capacity(batch.len());
    let mut version = Vec::with_capacity(batch.len());
    let mut event_type = Vec::with_capacity(batch.len());
    let mut schema_version = Vec::with_capacity(batch.len());
    let mut occurred_at = Vec::with_capacity(batch.len());
    let mut data = Vec::with_capacity(batch.len());
    let mut correlation = Vec::with_capacity(batch.len());
    let mut causation = Vec::with_capacity(batch.len());
    let mut partition = Vec::with_capacity(batch.len());
    let mut offset = Vec::with_capacity(batch.len());
    let mut data_key = Vec::with_capacity(batch.len());
    for r in batch {
        let e = &r.envelope;
        event_id.push(e.meta.event_id);
        task_id.push(*e.subject.as_uuid());
        user_id.push(e.meta.user_id.to_string());
        version.push(i32::try_from(e.meta.sequence).unwrap_or(i32::MAX));
        event_type.push(e.event.event_type());
        schema_version.push(e.event.schema_version() as i32);
        occurred_at.push(e.meta.occurred_at);
        // The event's JSON as text, cast to jsonb by PostgreSQL (no parse into a Value here).
        data.push(String::from_utf8(e.event.to_json()).unwrap_or_else(|_| "null".to_owned()));
        correlation.push(e.meta.correlation_id.clone());
        causation.push(e.meta.causation_id.clone());
        partition.push(r.position.partition);
        offset.push(r.position.offset);
        data_key.push(e.meta.data_key);
    }
    sqlx::query(
        "INSERT INTO task_history (event_id, task_id, user_id, version, event_type, schema_version, occurred_at, data,
                                   correlation_id, causation_id, log_partition, log_offset, data_key)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::int4[], $7::timestamptz[],
                              $8::text[]::jsonb[], $9::text[], $10::text[], $11::int4[], $12::int8[], $13::uuid[])
         ON CONFLICT DO NOTHING",
    )
    .bind(event_id)
    .bind(task_id)
    .bind(user_id)
    .bind(version)
    .bind(event_type)
    .bind(schema_version)
    .bind(occurred_at)
    .bind(data)
    .bind(correlation)
    .bind(causation)
    .bind(partition)
    .bind(offset)
    .bind(data_key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `user.erased`: every row of the user's erased identity goes. Task rows are found by the data
/// keys the erasure destroys (through `task_history.data_key`; rows written before sealing, without
/// a key, go too), so a task of the user's fresh identity stays whichever partition is applied
/// first; the user's own rows (read marks, webhook, deliveries) go in their stream's order.
/// The live-only tables (reactions, deliveries) are cleared in live mode (a replay has none).
async fn erase_user(tx: &mut Transaction<'_, Postgres>, user: &str, data_keys: &[Uuid], mode: ApplyMode) -> Result<(), sqlx::Error> {
    let tasks: Vec<Uuid> = sqlx::query_scalar(
        // The two halves match the two partial indexes (migrations/20261201200000_erasure.sql).
        "SELECT task_id FROM task_history WHERE event_type = 'task.created' AND data_key IS NOT NULL AND data_key = ANY($2) AND user_id = $1
         UNION SELECT task_id FROM task_history WHERE event_type = 'task.created' AND data_key IS NULL AND user_id = $1",
    )
    .bind(user)
    .bind(data_keys)
    .fetch_all(&mut **tx)
    .await?;
    let live = mode == ApplyMode::Live;
    let by_task: &[&str] = if live {
        &[
            "DELETE FROM notifications WHERE user_id = $1 AND task_id = ANY($2)",
            "DELETE FROM reminder_schedule WHERE user_id = $1 AND task_id = ANY($2)",
            "DELETE FROM reaction_outbox WHERE user_id = $1 AND task_id = ANY($2)",
            "DELETE FROM tasks WHERE user_id = $1 AND id = ANY($2)",
            "DELETE FROM task_history WHERE user_id = $1 AND task_id = ANY($2)",
        ]
    } else {
        &[
            "DELETE FROM notifications WHERE user_id = $1 AND task_id = ANY($2)",
            "DELETE FROM reminder_schedule WHERE user_id = $1 AND task_id = ANY($2)",
            "DELETE FROM tasks WHERE user_id = $1 AND id = ANY($2)",
            "DELETE FROM task_history WHERE user_id = $1 AND task_id = ANY($2)",
        ]
    };
    for sql in by_task {
        sqlx::query(sql).bind(user).bind(&tasks).execute(&mut **tx).await?;
    }
    if live {
        sqlx::query("DELETE FROM reminder_attempts WHERE task_id = ANY($1)").bind(&tasks).execute(&mut **tx).await?;
    }
    let by_user: &[&str] = if live {
        &[
            "DELETE FROM notification_reads WHERE user_id = $1",
            "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE user_id = $1)",
            "DELETE FROM webhook_deliveries WHERE user_id = $1",
            "DELETE FROM webhooks WHERE user_id = $1",
        ]
    } else {
        &["DELETE FROM notification_reads WHERE user_id = $1", "DELETE FROM webhooks WHERE user_id = $1"]
    };
    for sql in by_user {
        sqlx::query(sql).bind(user).execute(&mut **tx).await?;
    }
    metrics::counter!("projector_users_erased_total").increment(1);
    Ok(())
}

async fn advance_offsets(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    from: &HashMap<i32, i64>,
    to: &HashMap<i32, i64>,
    mode: ApplyMode,
) -> Result<(), StoreError> {
    if to.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    let mut olds = Vec::new();
    let mut news = Vec::new();
    for (p, new) in to {
        parts.push(*p);
        olds.push(*from.get(p).unwrap_or(&0));
        news.push(*new);
    }
    let names: Vec<String> = PROJECTIONS.iter().map(|s| s.to_string()).collect();
    let updated = sqlx::query(
        "UPDATE projection_offsets o SET next_offset = v.new, updated_at = now()
         FROM UNNEST($3::int4[], $4::int8[], $5::int8[]) AS v(partition, old, new)
         WHERE o.projection = ANY($1) AND o.topic = $2 AND o.partition = v.partition AND o.next_offset <= v.old",
    )
    .bind(&names)
    .bind(topic)
    .bind(&parts)
    .bind(&olds)
    .bind(&news)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if updated != (parts.len() * PROJECTIONS.len()) as u64 {
        return Err(StoreError::Fenced { topic: topic.to_owned() });
    }
    if mode == ApplyMode::Replay {
        // A replay writes copies that nobody reads yet: nothing to announce.
        return Ok(());
    }
    let offsets: Vec<[i64; 2]> = parts.iter().zip(&news).map(|(p, n)| [i64::from(*p), *n]).collect();
    for name in PROJECTIONS {
        let payload = json!({ "topic": topic, "projection": name, "offsets": offsets }).to_string();
        sqlx::query("SELECT pg_notify($1, $2)").bind(PROGRESS_CHANNEL).bind(payload).execute(&mut **tx).await?;
    }
    Ok(())
}
