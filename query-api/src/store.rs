//! SQL over the read models. Values are always bound; the only text assembled is the choice among
//! fixed sort-key fragments for the requested order.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use domain::UserId;

use crate::cursor::TaskCursor;
use crate::schema::TaskOrder;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TaskRow {
    pub id: Uuid,
    pub title: String,
    pub description: Option<String>,
    pub status: String,
    pub priority: i16,
    pub due_at: Option<DateTime<Utc>>,
    pub timezone: String,
    pub recurrence: Option<String>,
    pub remind_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub recurrence_parent_id: Option<Uuid>,
    pub occurrence: Option<i32>,
}

#[derive(sqlx::FromRow)]
struct KeyedRow {
    #[sqlx(flatten)]
    row: TaskRow,
    k0: i64,
    k1: i64,
}

const COLUMNS: &str = "id, title, description, status, priority, due_at, timezone, recurrence, remind_at, tags, \
                       version, created_at, updated_at, completed_at, recurrence_parent_id, occurrence";

const DUE_ASC: &str = "COALESCE((extract(epoch FROM due_at) * 1000000)::bigint, 9223372036854775807)";
const DUE_DESC: &str = "COALESCE(-(extract(epoch FROM due_at) * 1000000)::bigint, 9223372036854775807)";
const CREATED_ASC: &str = "(extract(epoch FROM created_at) * 1000000)::bigint";
const CREATED_DESC: &str = "-(extract(epoch FROM created_at) * 1000000)::bigint";

/// Sort key (k0, k1, id), ascending, for each order; NULL due dates sort last.
fn sort_keys(order: TaskOrder) -> (&'static str, &'static str) {
    match order {
        TaskOrder::DueAtAsc => (DUE_ASC, "0::bigint"),
        TaskOrder::DueAtDesc => (DUE_DESC, "0::bigint"),
        TaskOrder::CreatedAtAsc => (CREATED_ASC, "0::bigint"),
        TaskOrder::CreatedAtDesc => (CREATED_DESC, "0::bigint"),
        TaskOrder::PriorityDesc => ("(-priority)::bigint", DUE_ASC),
    }
}

#[derive(Debug, Default)]
pub struct TaskFilterSql {
    pub status: Option<&'static str>,
    pub priority: Option<i16>,
    pub tag: Option<String>,
    pub due_before: Option<DateTime<Utc>>,
    pub due_after: Option<DateTime<Utc>>,
    pub search: Option<String>,
}

fn like_pattern(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('%');
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

pub async fn task(pool: &PgPool, user: &UserId, id: Uuid) -> Result<Option<TaskRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM tasks WHERE id = $1 AND user_id = $2"))
        .bind(id)
        .bind(user.as_ref())
        .fetch_optional(pool)
        .await
}

pub async fn tasks(
    pool: &PgPool,
    user: &UserId,
    order: TaskOrder,
    f: &TaskFilterSql,
    after: Option<&TaskCursor>,
    limit: i64,
) -> Result<Vec<(TaskRow, (i64, i64))>, sqlx::Error> {
    let (k0, k1) = sort_keys(order);
    let sql = format!(
        "SELECT * FROM (
            SELECT {COLUMNS}, {k0} AS k0, {k1} AS k1 FROM tasks
            WHERE user_id = $1
              AND ($2::text IS NULL OR status = $2)
              AND ($3::int2 IS NULL OR priority = $3)
              AND ($4::text IS NULL OR tags @> ARRAY[$4::text])
              AND ($5::timestamptz IS NULL OR due_at < $5)
              AND ($6::timestamptz IS NULL OR due_at > $6)
              AND ($7::text IS NULL OR title ILIKE $7 OR description ILIKE $7)
         ) s
         WHERE ($8::bigint IS NULL OR (k0, k1, id) > ($8, $9, $10))
         ORDER BY k0, k1, id
         LIMIT $11"
    );
    let rows: Vec<KeyedRow> = sqlx::query_as(&sql)
        .bind(user.as_ref())
        .bind(f.status)
        .bind(f.priority)
        .bind(f.tag.as_deref())
        .bind(f.due_before)
        .bind(f.due_after)
        .bind(f.search.as_deref().map(like_pattern))
        .bind(after.map(|c| c.k0))
        .bind(after.map(|c| c.k1))
        .bind(after.map(|c| c.id))
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|r| (r.row, (r.k0, r.k1))).collect())
}

#[derive(Debug, sqlx::FromRow)]
pub struct HistoryRow {
    pub event_id: Uuid,
    pub event_type: String,
    pub version: i32,
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
    pub correlation_id: Option<String>,
}

pub async fn history(pool: &PgPool, user: &UserId, task: Uuid, after_version: i32, limit: i64) -> Result<Vec<HistoryRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, event_type, version, occurred_at, data, correlation_id FROM task_history
         WHERE task_id = $1 AND user_id = $2 AND version > $3 ORDER BY version LIMIT $4",
    )
    .bind(task)
    .bind(user.as_ref())
    .bind(after_version)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[derive(Debug, sqlx::FromRow)]
pub struct Stats {
    pub total: i64,
    pub open: i64,
    pub completed: i64,
    pub overdue: i64,
    pub avg_completion_seconds: Option<f64>,
}

pub async fn stats(pool: &PgPool, user: &UserId) -> Result<Stats, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) AS total,
                count(*) FILTER (WHERE status = 'open') AS open,
                count(*) FILTER (WHERE status = 'completed') AS completed,
                count(*) FILTER (WHERE status = 'open' AND due_at < now()) AS overdue,
                (avg(extract(epoch FROM completed_at - created_at)) FILTER (WHERE status = 'completed'))::float8
                    AS avg_completion_seconds
         FROM tasks WHERE user_id = $1",
    )
    .bind(user.as_ref())
    .fetch_one(pool)
    .await
}

/// (projection, partition, next_offset) for the topic.
pub async fn projection_offsets(pool: &PgPool, topic: &str) -> Result<Vec<(String, i32, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, partition, next_offset FROM projection_offsets WHERE topic = $1 ORDER BY projection, partition",
    )
    .bind(topic)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
    }

    #[test]
    fn every_order_has_fixed_keys() {
        for o in [TaskOrder::DueAtAsc, TaskOrder::DueAtDesc, TaskOrder::CreatedAtAsc, TaskOrder::CreatedAtDesc, TaskOrder::PriorityDesc] {
            let (a, b) = sort_keys(o);
            assert!(!a.contains('$') && !b.contains('$'));
        }
    }
}
