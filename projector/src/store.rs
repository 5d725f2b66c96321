//! PostgreSQL side of the projections: load rows, write a folded batch with UNNEST, and move the
//! per-partition offsets in the same transaction (with a compare-and-set, so two projector
//! instances can never both apply the same records). A rebuild's bulk phase writes with COPY
//! instead (`apply_bulk`, `flush_bulk`). SQL only: it writes every record it is
//! given; which records wait behind a dead letter is decided above it, in `dlq`. Imports `model`.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::encode::{Encode, IsNull};
use sqlx::postgres::{PgArgumentBuffer, PgCopyIn};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use domain::user::UserEvent;
use domain::{DomainEvent, TaskId};
use platform::projections::{NotificationNotice, TaskChangeNotice};

use crate::model::{Batch, DirtyRows, Effects, NotificationRow, Reaction, Recorded, RecordedUser, RowState, TaskRow, TaskTable};

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
    let existing: HashSet<TaskId> = loaded.keys().copied().collect();
    let (folded, effects) = crate::model::fold_with_effects(loaded, &batch.tasks);
    write_schedule(tx, &ids, &folded).await?;
    write_tasks(tx, folded, &existing).await?;
    let projected = effects.projected(&batch.tasks);
    add_rows(tx, NewRows::History(&projected)).await?;
    // What the task records produced goes in before the user events: an erasure among them then
    // finds (and deletes) the notifications and reactions of its own batch as well.
    write_notifications(tx, &effects.notifications).await?;
    let reactions = match mode {
        ApplyMode::Live => write_outbox(tx, &effects.reactions).await?,
        ApplyMode::Replay => 0,
    };
    write_user_events(tx, &batch.users, mode).await?;
    let applied = match mode {
        ApplyMode::Live => Applied { reactions, deliveries: enqueue_deliveries(tx, &effects.notifications).await?, ..Applied::default() },
        ApplyMode::Replay => Applied::default(),
    };
    if mode == ApplyMode::Live {
        announce_changes(tx, &projected, &effects.notifications).await?;
    }
    Ok(applied)
}

/// NOTIFYs (delivered at commit, so a subscriber that re-queries sees the change) for live updates.
async fn announce_changes(tx: &mut Transaction<'_, Postgres>, tasks: &[&Recorded], notifications: &[NotificationRow]) -> Result<(), sqlx::Error> {
    let changes = json_arrays(tasks.iter().map(|r| {
        let e = &r.envelope;
        TaskChangeNotice::<&str> {
            user: e.meta.user_id.as_ref(),
            task_id: *e.subject.as_uuid(),
            kind: e.event.event_type().trim_start_matches("task."),
            version: e.meta.sequence,
        }
    }));
    let created = json_arrays(notifications.iter().map(|n| NotificationNotice::<&str> { user: &n.user_id, id: n.id }));
    for (channel, payloads) in [(TASK_CHANGES_CHANNEL, changes), (NOTIFICATIONS_CHANNEL, created)] {
        if !payloads.is_empty() {
            sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p").bind(channel).bind(&payloads).execute(&mut **tx).await?;
        }
    }
    Ok(())
}

/// The items as JSON arrays of at most ~7 000 bytes each (a NOTIFY payload is limited to 8 000),
/// each item serialized straight into its array.
fn json_arrays<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    const MAX: usize = 7_000;
    let mut arrays = Vec::new();
    let mut current: Vec<u8> = Vec::with_capacity(MAX + 256);
    let mut item = Vec::with_capacity(256);
    for i in items {
        item.clear();
        serde_json::to_writer(&mut item, &i).expect("a notice serializes");
        if current.len() > 1 && current.len() + item.len() + 2 > MAX {
            current.push(b']');
            arrays.push(String::from_utf8(std::mem::replace(&mut current, Vec::with_capacity(MAX + 256))).expect("serde_json writes UTF-8"));
        }
        current.push(if current.is_empty() { b'[' } else { b',' });
        current.extend_from_slice(&item);
    }
    if !current.is_empty() {
        current.push(b']');
        arrays.push(String::from_utf8(current).expect("serde_json writes UTF-8"));
    }
    arrays
}

/// Notification read marks, webhook registrations and erasures; returns the ids of the task rows
/// that erasures deleted.
async fn write_user_events(tx: &mut Transaction<'_, Postgres>, users: &[RecordedUser], mode: ApplyMode) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut erased = Vec::new();
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
            UserEvent::Erased(keys) => erased.extend(erase_user(tx, e.meta.user_id.as_ref(), &keys.data_keys, mode).await?),
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
    Ok(erased)
}

/// One delivery per new notification whose user has a webhook registered (none for a notification
/// an erasure of the same batch deleted).
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
         JOIN notifications n ON n.id = v.id
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

/// `$1..$19` as the rows `v` of `tasks` that [`TaskColumns::bind`] binds.
macro_rules! task_columns_unnest {
    () => {
        "UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::timestamptz[],
                $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::text[], $13::int4[],
                $14::timestamptz[], $15::timestamptz[], $16::timestamptz[], $17::uuid[], $18::int4[],
                $19::timestamptz[])
         AS v(id, user_id, title, description, status, priority, due_at, timezone, recurrence, remind_before,
              remind_at, tags, version, created_at, updated_at, completed_at, parent, occurrence, reminded_for)"
    };
}

/// Writes the folded rows: deleted ones go, rows the batch found (`existing`, locked since
/// `load_rows` in live mode) are updated in place, new ones are inserted.
async fn write_tasks(tx: &mut Transaction<'_, Postgres>, folded: HashMap<TaskId, Option<RowState>>, existing: &HashSet<TaskId>) -> Result<(), sqlx::Error> {
    let mut removed: Vec<Uuid> = Vec::new();
    let (mut updated, mut inserted): (Vec<TaskRow>, Vec<TaskRow>) = (Vec::new(), Vec::new());
    for (id, state) in folded {
        match state {
            Some(RowState::Present(r)) if existing.contains(&id) => updated.push(r),
            Some(RowState::Present(r)) => inserted.push(r),
            Some(RowState::Removed) => removed.push(*id.as_uuid()),
            None => {}
        }
    }
    if !removed.is_empty() {
        sqlx::query("DELETE FROM tasks WHERE id = ANY($1)").bind(&removed).execute(&mut **tx).await?;
    }
    // Stable order avoids deadlocks between concurrent writers.
    updated.sort_unstable_by_key(|r| r.id);
    inserted.sort_unstable_by_key(|r| r.id);
    if !updated.is_empty() {
        // An UPDATE joined to the rows, not the upsert, which first tries each row as an insert
        // and then updates the conflicting one: about a fifth less time for a batch of 2 500 rows
        // that all exist (in a catch-up most events change a task already there). PostgreSQL plans the
        // first executions on a connection for the batch's arrays, and while `tasks` is small
        // next to a batch (2 500 rows of 200 000) such a plan reads the whole table instead of
        // probing the key (44-85 ms instead of ~20); from the sixth on it keeps the generic plan,
        // which probes. (Forcing generic plans from the first execution on was worse: catch-ups
        // at 11 700 and 32 000 events/s against 34 500 without.)
        TaskColumns::of(updated)
            .bind(sqlx::query(concat!(
                "UPDATE tasks AS t SET
                    user_id = v.user_id, title = v.title, description = v.description, status = v.status,
                    priority = v.priority, due_at = v.due_at, timezone = v.timezone, recurrence = v.recurrence,
                    remind_before = v.remind_before, remind_at = v.remind_at, tags = v.tags::text[],
                    version = v.version, created_at = v.created_at, updated_at = v.updated_at,
                    completed_at = v.completed_at, recurrence_parent_id = v.parent, occurrence = v.occurrence,
                    reminded_for = v.reminded_for
                 FROM ",
                task_columns_unnest!(),
                " WHERE t.id = v.id AND t.version < v.version"
            )))
            .execute(&mut **tx)
            .await?;
    }
    add_rows(tx, NewRows::Tasks(&inserted)).await
}

/// Inserts new task rows; a row that is there (a log that repeats a creation, or a fenced
/// instance's batch racing the owner's) is updated if it is older.
async fn upsert_tasks(tx: &mut Transaction<'_, Postgres>, rows: &[TaskRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    TaskColumns::of(rows.iter().cloned())
        .bind(sqlx::query(concat!(
            "INSERT INTO tasks (id, user_id, title, description, status, priority, due_at, timezone, recurrence,
                                remind_before, remind_at, tags, version, created_at, updated_at, completed_at,
                                recurrence_parent_id, occurrence, reminded_for)
             SELECT v.id, v.user_id, v.title, v.description, v.status, v.priority, v.due_at, v.timezone, v.recurrence,
                    v.remind_before, v.remind_at,
                    v.tags::text[],
                    v.version, v.created_at, v.updated_at, v.completed_at, v.parent, v.occurrence, v.reminded_for
             FROM ",
            task_columns_unnest!(),
            " ON CONFLICT (id) DO UPDATE SET
                user_id = EXCLUDED.user_id, title = EXCLUDED.title, description = EXCLUDED.description,
                status = EXCLUDED.status, priority = EXCLUDED.priority, due_at = EXCLUDED.due_at,
                timezone = EXCLUDED.timezone, recurrence = EXCLUDED.recurrence, remind_before = EXCLUDED.remind_before,
                remind_at = EXCLUDED.remind_at, tags = EXCLUDED.tags, version = EXCLUDED.version,
                created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, completed_at = EXCLUDED.completed_at,
                recurrence_parent_id = EXCLUDED.recurrence_parent_id, occurrence = EXCLUDED.occurrence,
                reminded_for = EXCLUDED.reminded_for
             WHERE tasks.version < EXCLUDED.version"
        )))
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
    /// Each row's tags as an array literal (`{"a","b"}`), cast by PostgreSQL: UNNEST takes only
    /// one-dimensional arrays, and rows have different numbers of tags.
    tags: Vec<String>,
    version: Vec<i32>,
    created_at: Vec<chrono::DateTime<chrono::Utc>>,
    updated_at: Vec<chrono::DateTime<chrono::Utc>>,
    completed_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    parent: Vec<Option<Uuid>>,
    occurrence: Vec<Option<i32>>,
    reminded_for: Vec<Option<chrono::DateTime<chrono::Utc>>>,
}

impl TaskColumns {
    fn of(rows: impl IntoIterator<Item = TaskRow>) -> Self {
        let mut c = Self::default();
        for r in rows {
            c.push(r);
        }
        c
    }

    /// Binds the columns as `$1..$19` ([`task_columns_unnest!`]).
    fn bind<'q>(self, q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        q.bind(self.id)
            .bind(self.user_id)
            .bind(self.title)
            .bind(self.description)
            .bind(self.status)
            .bind(self.priority)
            .bind(self.due_at)
            .bind(self.timezone)
            .bind(self.recurrence)
            .bind(self.remind_before)
            .bind(self.remind_at)
            .bind(self.tags)
            .bind(self.version)
            .bind(self.created_at)
            .bind(self.updated_at)
            .bind(self.completed_at)
            .bind(self.parent)
            .bind(self.occurrence)
            .bind(self.reminded_for)
    }

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
        self.tags.push(array_literal(&r.tags));
        self.version.push(r.version);
        self.created_at.push(r.created_at);
        self.updated_at.push(r.updated_at);
        self.completed_at.push(r.completed_at);
        self.parent.push(r.recurrence_parent_id);
        self.occurrence.push(r.occurrence);
        self.reminded_for.push(r.reminded_for);
    }
}

/// A PostgreSQL array literal of `items`, each quoted (so any text, `NULL` included, stays the
/// text it is).
fn array_literal(items: &[String]) -> String {
    let mut out = String::with_capacity(2 + items.iter().map(|t| t.len() + 3).sum::<usize>());
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// The columns of `task_history` in the order both of its writers send them (`write_history`'s
/// UNNEST and `copy_history`'s COPY), each value from [`HistoryRow::of`].
macro_rules! history_columns {
    () => {
        "event_id, task_id, user_id, version, event_type, schema_version, occurred_at, data, correlation_id, causation_id, log_partition, log_offset, data_key"
    };
}

/// The `task_history` row of a record, as both writers send it.
struct HistoryRow {
    event_id: Uuid,
    task_id: Uuid,
    user_id: String,
    version: i32,
    event_type: &'static str,
    schema_version: i32,
    occurred_at: DateTime<Utc>,
    /// The event's JSON as text, cast to jsonb by PostgreSQL (no parse into a Value here).
    data: String,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    log_partition: i32,
    log_offset: i64,
    data_key: Option<Uuid>,
}

impl HistoryRow {
    fn of(r: &Recorded) -> Self {
        let e = &r.envelope;
        Self {
            event_id: e.meta.event_id,
            task_id: *e.subject.as_uuid(),
            user_id: e.meta.user_id.to_string(),
            version: i32::try_from(e.meta.sequence).unwrap_or(i32::MAX),
            event_type: e.event.event_type(),
            schema_version: e.event.schema_version() as i32,
            occurred_at: e.meta.occurred_at,
            data: String::from_utf8(e.event.to_json()).unwrap_or_else(|_| "null".to_owned()),
            correlation_id: e.meta.correlation_id.clone(),
            causation_id: e.meta.causation_id.clone(),
            log_partition: r.position.partition,
            log_offset: r.position.offset,
            data_key: e.meta.data_key,
        }
    }

    /// One COPY row, the fields in [`history_columns!`] order.
    fn copy(self, out: &mut CopyRows<'_>) -> Result<(), sqlx::Error> {
        out.row(13);
        out.field(self.event_id)?;
        out.field(self.task_id)?;
        out.field(self.user_id)?;
        out.field(self.version)?;
        out.field(self.event_type)?;
        out.field(self.schema_version)?;
        out.field(self.occurred_at)?;
        out.jsonb(self.data.as_bytes())?;
        out.field(self.correlation_id)?;
        out.field(self.causation_id)?;
        out.field(self.log_partition)?;
        out.field(self.log_offset)?;
        out.field(self.data_key)
    }
}

async fn write_history(tx: &mut Transaction<'_, Postgres>, batch: &[&Recorded]) -> Result<(), sqlx::Error> {
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
        let h = HistoryRow::of(r);
        event_id.push(h.event_id);
        task_id.push(h.task_id);
        user_id.push(h.user_id);
        version.push(h.version);
        event_type.push(h.event_type);
        schema_version.push(h.schema_version);
        occurred_at.push(h.occurred_at);
        data.push(h.data);
        correlation.push(h.correlation_id);
        causation.push(h.causation_id);
        partition.push(h.log_partition);
        offset.push(h.log_offset);
        data_key.push(h.data_key);
    }
    sqlx::query(concat!(
        "INSERT INTO task_history (",
        history_columns!(),
        ")
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::int4[], $7::timestamptz[],
                              $8::text[]::jsonb[], $9::text[], $10::text[], $11::int4[], $12::int8[], $13::uuid[])
         ON CONFLICT DO NOTHING"
    ))
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

/// Batches that add fewer rows to a table than this insert them in one statement: COPY in a
/// savepoint takes four round trips to PostgreSQL instead of one, which only pays off over many
/// rows.
pub const COPY_MIN_ROWS: usize = 32;

/// Rows a batch adds to a table.
enum NewRows<'a> {
    History(&'a [&'a Recorded]),
    Tasks(&'a [TaskRow]),
}

impl NewRows<'_> {
    fn len(&self) -> usize {
        match self {
            NewRows::History(rows) => rows.len(),
            NewRows::Tasks(rows) => rows.len(),
        }
    }

    /// One statement that skips (history) or updates if older (tasks) the rows that are there.
    async fn insert(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        match self {
            NewRows::History(rows) => write_history(tx, rows).await,
            NewRows::Tasks(rows) => upsert_tasks(tx, rows).await,
        }
    }

    /// COPY: fails with a unique violation if a row is there.
    async fn copy(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        match self {
            NewRows::History(rows) => copy_history(tx, rows).await,
            NewRows::Tasks(rows) => copy_tasks(tx, rows).await,
        }
    }
}

/// Adds a batch's new rows to a table. Many rows go with COPY (no `ON CONFLICT` check of the
/// unique indexes before each row), in a savepoint, so that when a row is there already (the log
/// repeats an event, or a fenced instance's batch races the owner's) the savepoint is rolled back
/// and the rows are written again with [`NewRows::insert`]. A live projector at the head of the
/// log applies small batches: one statement.
async fn add_rows(tx: &mut Transaction<'_, Postgres>, rows: NewRows<'_>) -> Result<(), sqlx::Error> {
    use sqlx::Acquire;
    if rows.len() < COPY_MIN_ROWS {
        return rows.insert(tx).await;
    }
    let mut savepoint = tx.begin().await?;
    match rows.copy(&mut savepoint).await {
        Ok(()) => savepoint.commit().await,
        Err(e) if is_unique_violation(&e) => {
            savepoint.rollback().await?;
            rows.insert(tx).await
        }
        Err(e) => Err(e),
    }
}

/// `write_history` with COPY: the same rows, but a record whose event (or task and version) is
/// there already fails the COPY with a unique violation instead of being skipped (`add_rows`
/// then writes the batch again with `write_history`).
async fn copy_history(tx: &mut Transaction<'_, Postgres>, batch: &[&Recorded]) -> Result<(), sqlx::Error> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut out = CopyRows::begin(tx, concat!("COPY task_history (", history_columns!(), ") FROM STDIN (FORMAT binary)")).await?;
    for r in batch {
        HistoryRow::of(r).copy(&mut out)?;
        out.send_full().await?;
    }
    out.finish().await?;
    Ok(())
}

/// Rows streamed to a binary `COPY ... FROM STDIN`, each field encoded exactly as sqlx encodes the
/// same value bound to a query (so a copied value is the value an UNNEST insert would store).
/// Sent in chunks of about 1 MiB.
struct CopyRows<'c> {
    copy: PgCopyIn<&'c mut PgConnection>,
    buf: PgArgumentBuffer,
}

impl<'c> CopyRows<'c> {
    const CHUNK: usize = 1 << 20;

    async fn begin(conn: &'c mut PgConnection, statement: &str) -> Result<Self, sqlx::Error> {
        let copy = conn.copy_in_raw(statement).await?;
        let mut buf = PgArgumentBuffer::default();
        // Signature, flags (no OIDs), no header extension.
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Ok(Self { copy, buf })
    }

    fn row(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    /// A field: its length (-1 for NULL), then the value as sqlx encodes it.
    fn field<'q, T: Encode<'q, Postgres>>(&mut self, value: T) -> Result<(), sqlx::Error> {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let len = match value.encode(&mut self.buf).map_err(sqlx::Error::Encode)? {
            IsNull::No => i32::try_from(self.buf.len() - at - 4).map_err(|e| sqlx::Error::Encode(e.into()))?,
            IsNull::Yes => -1,
        };
        self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// A jsonb field from JSON text (jsonb's binary input: version 1, then the text).
    fn jsonb(&mut self, json: &[u8]) -> Result<(), sqlx::Error> {
        let len = i32::try_from(json.len() + 1).map_err(|e| sqlx::Error::Encode(e.into()))?;
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.push(1);
        self.buf.extend_from_slice(json);
        Ok(())
    }

    /// Sends what is buffered once it is a chunk.
    async fn send_full(&mut self) -> Result<(), sqlx::Error> {
        if self.buf.len() >= Self::CHUNK {
            self.copy.send(self.buf.as_slice()).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Ends the COPY; the rows copied.
    async fn finish(mut self) -> Result<u64, sqlx::Error> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.copy.send(self.buf.as_slice()).await?;
        self.copy.finish().await
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

/// A replayed batch in a rebuild's bulk phase, in one transaction: its history (with COPY), user
/// events and notifications as every batch writes them. Its task rows are not written: the caller
/// has folded them onto its [`TaskTable`], and `effects` are what that fold produced. No
/// offsets move (`flush_bulk` sets them when the phase ends).
///
/// With `table` (a batch with an erasure), the table's changed rows are written first, so the
/// erasure finds in PostgreSQL the rows it deletes; returns their ids, for the caller to drop from
/// the table (and to mark the rest written) once this has committed.
pub async fn apply_bulk(pool: &PgPool, batch: &Batch, effects: &Effects, table: Option<&TaskTable>) -> Result<Vec<Uuid>, StoreError> {
    let history = effects.projected(&batch.tasks);
    let mut tx = pool.begin().await?;
    add_rows(&mut tx, NewRows::History(&history)).await?;
    if let Some(table) = table {
        write_dirty(&mut tx, table.dirty()).await?;
    }
    // Before the user events, as `apply_records` does: an erasure deletes its batch's notifications too.
    write_notifications(&mut tx, &effects.notifications).await?;
    let erased = write_user_events(&mut tx, &batch.users, ApplyMode::Replay).await?;
    tx.commit().await?;
    Ok(erased)
}

/// Ends a rebuild's bulk phase in one transaction: the rows of `table` changed since it was last
/// written (with their reminder schedule), and the copies' offsets set to `at`, where the replay
/// stands. The caller then drops the table (`mark_written` is not needed).
pub async fn flush_bulk(pool: &PgPool, topic: &str, table: &TaskTable, at: &HashMap<i32, i64>) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    write_dirty(&mut tx, table.dirty()).await?;
    // The copies' offsets have not moved since they were created: any `from` at or past them passes.
    advance_offsets(&mut tx, topic, at, at, ApplyMode::Replay).await?;
    tx.commit().await?;
    Ok(())
}

/// Writes a [`TaskTable`]'s changed rows with COPY: the rows written before (deleted, or changed,
/// since) are deleted first, with their reminder schedule. A changed row is replaced rather than
/// upserted: the upsert keeps a stored row of a higher version, which a task deleted and created
/// again after it was written has. `reminder_schedule` follows: one row per pending reminder of the
/// rows written.
async fn write_dirty(tx: &mut Transaction<'_, Postgres>, dirty: DirtyRows<'_>) -> Result<(), sqlx::Error> {
    if dirty.is_empty() {
        return Ok(());
    }
    let DirtyRows { fresh, changed, mut removed } = dirty;
    removed.extend(changed.iter().map(|r| r.id));
    if !removed.is_empty() {
        sqlx::query("DELETE FROM tasks WHERE id = ANY($1)").bind(&removed).execute(&mut **tx).await?;
        sqlx::query("DELETE FROM reminder_schedule WHERE task_id = ANY($1)").bind(&removed).execute(&mut **tx).await?;
    }
    let mut rows = fresh;
    rows.extend(changed);
    rows.sort_unstable_by_key(|r| r.id);
    copy_tasks(tx, &rows).await?;
    let mut out = CopyRows::begin(tx, "COPY reminder_schedule (task_id, user_id, remind_at) FROM STDIN (FORMAT binary)").await?;
    for (r, at) in rows.iter().filter_map(|r| Some((r, r.pending_reminder()?))) {
        out.row(3);
        out.field(r.id)?;
        out.field(r.user_id.as_str())?;
        out.field(at)?;
        out.send_full().await?;
    }
    out.finish().await?;
    Ok(())
}

/// `tasks` rows with COPY (a row that is there fails it with a unique violation).
async fn copy_tasks(tx: &mut Transaction<'_, Postgres>, rows: &[impl std::borrow::Borrow<TaskRow>]) -> Result<(), sqlx::Error> {
    let mut out = CopyRows::begin(tx, &format!("COPY tasks ({}) FROM STDIN (FORMAT binary)", TaskRow::COLUMNS)).await?;
    for r in rows {
        copy_task(&mut out, r.borrow())?;
        out.send_full().await?;
    }
    out.finish().await.map(drop)
}

/// One COPY row of `tasks`, the fields in [`TaskRow::COLUMNS`] order.
fn copy_task(out: &mut CopyRows<'_>, r: &TaskRow) -> Result<(), sqlx::Error> {
    out.row(19);
    out.field(r.id)?;
    out.field(r.user_id.as_str())?;
    out.field(r.title.as_str())?;
    out.field(r.description.as_deref())?;
    out.field(r.status.as_str())?;
    out.field(r.priority)?;
    out.field(r.due_at)?;
    out.field(r.timezone.as_str())?;
    out.field(r.recurrence.as_deref())?;
    out.field(r.remind_before.as_deref())?;
    out.field(r.remind_at)?;
    out.field(&r.tags)?;
    out.field(r.version)?;
    out.field(r.created_at)?;
    out.field(r.updated_at)?;
    out.field(r.completed_at)?;
    out.field(r.recurrence_parent_id)?;
    out.field(r.occurrence)?;
    out.field(r.reminded_for)
}

/// `user.erased`: every row of the user's erased identity goes. Task rows are found by the data
/// keys the erasure destroys (through `task_history.data_key`; rows written before sealing, without
/// a key, go too), so a task of the user's fresh identity stays whichever partition is applied
/// first; the user's own rows (read marks, webhook, deliveries) go in their stream's order.
/// The live-only tables (reactions, deliveries) are cleared in live mode (a replay has none).
/// Returns the ids of the task rows it deleted.
async fn erase_user(tx: &mut Transaction<'_, Postgres>, user: &str, data_keys: &[Uuid], mode: ApplyMode) -> Result<Vec<Uuid>, sqlx::Error> {
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
    let before_tasks: &[&str] = if live {
        &[
            "DELETE FROM notifications WHERE user_id = $1 AND task_id = ANY($2)",
            "DELETE FROM reminder_schedule WHERE user_id = $1 AND task_id = ANY($2)",
            "DELETE FROM reaction_outbox WHERE user_id = $1 AND task_id = ANY($2)",
        ]
    } else {
        &["DELETE FROM notifications WHERE user_id = $1 AND task_id = ANY($2)", "DELETE FROM reminder_schedule WHERE user_id = $1 AND task_id = ANY($2)"]
    };
    for sql in before_tasks {
        sqlx::query(sql).bind(user).bind(&tasks).execute(&mut **tx).await?;
    }
    let deleted: Vec<Uuid> =
        sqlx::query_scalar("DELETE FROM tasks WHERE user_id = $1 AND id = ANY($2) RETURNING id").bind(user).bind(&tasks).fetch_all(&mut **tx).await?;
    sqlx::query("DELETE FROM task_history WHERE user_id = $1 AND task_id = ANY($2)").bind(user).bind(&tasks).execute(&mut **tx).await?;
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
    Ok(deleted)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_payloads_are_json_arrays_within_the_limit_with_every_item_in_order() {
        #[derive(serde::Serialize)]
        struct Item {
            n: usize,
            text: String,
        }
        let items = (0..500).map(|n| Item { n, text: format!("\"quoted\" {}", "x".repeat(n % 90)) });
        let arrays = json_arrays(items);
        assert!(arrays.len() > 1, "500 items of ~100 bytes need several payloads");
        let mut seen = Vec::new();
        for a in &arrays {
            assert!(a.len() <= 8_000, "a payload of {} bytes", a.len());
            let parsed: Vec<serde_json::Value> = serde_json::from_str(a).unwrap();
            assert!(!parsed.is_empty());
            seen.extend(parsed.iter().map(|v| (v["n"].as_u64().unwrap() as usize, v["text"].as_str().unwrap().to_owned())));
        }
        let expected: Vec<(usize, String)> = (0..500).map(|n| (n, format!("\"quoted\" {}", "x".repeat(n % 90)))).collect();
        assert_eq!(seen, expected);
        assert!(json_arrays(std::iter::empty::<Item>()).is_empty());
    }
}
