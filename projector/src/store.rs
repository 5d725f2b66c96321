//! PostgreSQL side of the projections: load rows, write a folded batch with UNNEST, and move the
//! per-partition offsets in the same transaction (with a compare-and-set, so two projector
//! instances can never both apply the same records).

use std::collections::HashMap;

use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use domain::TaskId;

use crate::model::{Recorded, RowState, TaskRow};

pub use platform::projections::{PROGRESS_CHANNEL, PROJECTIONS};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another projector instance moved the offsets of topic {topic}; re-reading them")]
    Fenced { topic: String },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Makes sure every (projection, partition) has an offset row (0 for a new projection) and returns
/// the next offset to apply per partition (the minimum across projections).
pub async fn init_offsets(pool: &PgPool, topic: &str, partitions: &[i32]) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let names: Vec<String> = PROJECTIONS.iter().map(|s| s.to_string()).collect();
    sqlx::query(
        "INSERT INTO projection_offsets (projection, topic, partition, next_offset)
         SELECT n, $2, p, 0 FROM UNNEST($1::text[]) AS n CROSS JOIN UNNEST($3::int4[]) AS p
         ON CONFLICT ON CONSTRAINT projection_offsets_pkey DO NOTHING",
    )
    .bind(&names)
    .bind(topic)
    .bind(partitions)
    .execute(pool)
    .await?;
    let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, min(next_offset), max(next_offset) FROM projection_offsets
         WHERE topic = $1 AND projection = ANY($2) GROUP BY partition",
    )
    .bind(topic)
    .bind(&names)
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

async fn load_rows(tx: &mut Transaction<'_, Postgres>, ids: &[Uuid]) -> Result<HashMap<TaskId, TaskRow>, sqlx::Error> {
    let rows: Vec<TaskRow> = sqlx::query_as(
        "SELECT id, user_id, title, description, status, priority, due_at, timezone, recurrence, remind_before,
                remind_at, tags, version, created_at, updated_at, completed_at, recurrence_parent_id, occurrence
         FROM tasks WHERE id = ANY($1) FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|r| (TaskId::from_uuid(r.id), r)).collect())
}

/// Applies a batch to both projections and advances their offsets from `from` to `to`
/// (per partition), all in one transaction.
pub async fn apply_batch(
    pool: &PgPool,
    topic: &str,
    batch: &[Recorded],
    from: &HashMap<i32, i64>,
    to: &HashMap<i32, i64>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let mut ids: Vec<Uuid> = batch.iter().map(|r| *r.envelope.task_id.as_uuid()).collect();
    ids.sort_unstable();
    ids.dedup();
    let loaded = load_rows(&mut tx, &ids).await?;
    let folded = crate::model::fold(loaded, batch);
    write_tasks(&mut tx, folded).await?;
    write_history(&mut tx, batch).await?;
    advance_offsets(&mut tx, topic, from, to).await?;
    tx.commit().await?;
    Ok(())
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
                            recurrence_parent_id, occurrence)
         SELECT v.id, v.user_id, v.title, v.description, v.status, v.priority, v.due_at, v.timezone, v.recurrence,
                v.remind_before, v.remind_at,
                ARRAY(SELECT e FROM jsonb_array_elements_text(v.tags) WITH ORDINALITY AS t(e, i) ORDER BY i),
                v.version, v.created_at, v.updated_at, v.completed_at, v.parent, v.occurrence
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::timestamptz[],
                     $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::jsonb[], $13::int4[],
                     $14::timestamptz[], $15::timestamptz[], $16::timestamptz[], $17::uuid[], $18::int4[])
              AS v(id, user_id, title, description, status, priority, due_at, timezone, recurrence, remind_before,
                   remind_at, tags, version, created_at, updated_at, completed_at, parent, occurrence)
         ON CONFLICT ON CONSTRAINT tasks_pkey DO UPDATE SET
            user_id = EXCLUDED.user_id, title = EXCLUDED.title, description = EXCLUDED.description,
            status = EXCLUDED.status, priority = EXCLUDED.priority, due_at = EXCLUDED.due_at,
            timezone = EXCLUDED.timezone, recurrence = EXCLUDED.recurrence, remind_before = EXCLUDED.remind_before,
            remind_at = EXCLUDED.remind_at, tags = EXCLUDED.tags, version = EXCLUDED.version,
            created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, completed_at = EXCLUDED.completed_at,
            recurrence_parent_id = EXCLUDED.recurrence_parent_id, occurrence = EXCLUDED.occurrence
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
    for r in batch {
        let e = &r.envelope;
        event_id.push(e.event_id);
        task_id.push(*e.task_id.as_uuid());
        user_id.push(e.user_id.to_string());
        version.push(i32::try_from(e.sequence).unwrap_or(i32::MAX));
        event_type.push(e.event.event_type());
        schema_version.push(e.event.schema_version() as i32);
        occurred_at.push(e.occurred_at);
        data.push(serde_json::from_slice::<serde_json::Value>(&e.event.to_json()).unwrap_or(serde_json::Value::Null));
        correlation.push(e.correlation_id.clone());
        causation.push(e.causation_id.clone());
        partition.push(r.position.partition);
        offset.push(r.position.offset);
    }
    sqlx::query(
        "INSERT INTO task_history (event_id, task_id, user_id, version, event_type, schema_version, occurred_at, data,
                                   correlation_id, causation_id, log_partition, log_offset)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::int4[], $7::timestamptz[],
                              $8::jsonb[], $9::text[], $10::text[], $11::int4[], $12::int8[])
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
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn advance_offsets(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    from: &HashMap<i32, i64>,
    to: &HashMap<i32, i64>,
) -> Result<(), StoreError> {
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
    let offsets: Vec<[i64; 2]> = parts.iter().zip(&news).map(|(p, n)| [i64::from(*p), *n]).collect();
    for name in PROJECTIONS {
        let payload = json!({ "topic": topic, "projection": name, "offsets": offsets }).to_string();
        sqlx::query("SELECT pg_notify($1, $2)").bind(PROGRESS_CHANNEL).bind(payload).execute(&mut **tx).await?;
    }
    Ok(())
}
