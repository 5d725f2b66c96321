//! SQL over the read models: one statement per resolver call. Values are always bound; the only
//! text assembled is a choice among the fixed fragments below (one per filter that is present, the
//! ORDER BY and keyset predicate of the order), so the planner sees plain column and row
//! comparisons that the `(user_id, due_at, id)` and `(user_id, created_at, id)` indexes serve as
//! range scans: a page costs the same however deep it is.

use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use domain::UserId;
use platform::readmodel::TaskRow;

use crate::cursor::{Keyset, Order};

/// The filter of `tasks` in the read model's terms (status text, priority rank).
#[derive(Debug, Default, Clone)]
pub struct TaskFilterSql {
    pub status: Option<&'static str>,
    pub priority: Option<i16>,
    pub tag: Option<String>,
    pub due_before: Option<DateTime<Utc>>,
    pub due_after: Option<DateTime<Utc>>,
    pub search: Option<String>,
}

/// `ORDER BY` of each order; every one ends with `id` so the order is total.
fn order_by(order: Order) -> &'static str {
    match order {
        Order::DueAtAsc => " ORDER BY due_at ASC NULLS LAST, id ASC",
        Order::DueAtDesc => " ORDER BY due_at DESC NULLS LAST, id DESC",
        Order::CreatedAtAsc => " ORDER BY created_at ASC, id ASC",
        Order::CreatedAtDesc => " ORDER BY created_at DESC, id DESC",
        Order::PriorityDesc => " ORDER BY priority DESC, due_at ASC NULLS LAST, id ASC",
    }
}

/// A keyset predicate: which rows of the order come after a cursor (or a part of the order).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pred {
    All,
    Dated,
    Undated,
    DueAfter(DateTime<Utc>, Uuid),
    DueBefore(DateTime<Utc>, Uuid),
    UndatedAfter(Uuid),
    UndatedBefore(Uuid),
    CreatedAfter(DateTime<Utc>, Uuid),
    CreatedBefore(DateTime<Utc>, Uuid),
    /// Lower priority, or the same priority and later by (due date, undated last; id).
    PriorityAfter(i16, Option<DateTime<Utc>>, Uuid),
}

/// One index range scan: the rows matching `pred`, in `order_by`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    pred: Pred,
    order_by: &'static str,
}

/// How to read one page. Undated tasks come last in both due-date orders, which the
/// `(user_id, due_at, id)` index can serve directly only for the first page of DUE_AT_ASC; so a page
/// of a due-date order that may cross from dated into undated tasks is read as two range scans (the
/// dated rows, then the undated ones, each limited) merged in the page's order. Each other order is
/// one scan.
fn plan(order: Order, after: Option<&Keyset>) -> Vec<Segment> {
    const DUE_ASC: &str = " ORDER BY due_at ASC, id ASC";
    const DUE_DESC: &str = " ORDER BY due_at DESC, id DESC";
    const ID_ASC: &str = " ORDER BY id ASC";
    const ID_DESC: &str = " ORDER BY id DESC";
    let one = |pred| vec![Segment { pred, order_by: order_by(order) }];
    match (order, after.copied()) {
        (Order::DueAtAsc, Some(Keyset::DueAtAsc { due_at: Some(d), id })) => {
            vec![Segment { pred: Pred::DueAfter(d, id), order_by: DUE_ASC }, Segment { pred: Pred::Undated, order_by: ID_ASC }]
        }
        (Order::DueAtAsc, Some(Keyset::DueAtAsc { due_at: None, id })) => {
            vec![Segment { pred: Pred::UndatedAfter(id), order_by: ID_ASC }]
        }
        (Order::DueAtDesc, None) => {
            vec![Segment { pred: Pred::Dated, order_by: DUE_DESC }, Segment { pred: Pred::Undated, order_by: ID_DESC }]
        }
        (Order::DueAtDesc, Some(Keyset::DueAtDesc { due_at: Some(d), id })) => {
            vec![Segment { pred: Pred::DueBefore(d, id), order_by: DUE_DESC }, Segment { pred: Pred::Undated, order_by: ID_DESC }]
        }
        (Order::DueAtDesc, Some(Keyset::DueAtDesc { due_at: None, id })) => {
            vec![Segment { pred: Pred::UndatedBefore(id), order_by: ID_DESC }]
        }
        (Order::CreatedAtAsc, Some(Keyset::CreatedAtAsc { created_at, id })) => one(Pred::CreatedAfter(created_at, id)),
        (Order::CreatedAtDesc, Some(Keyset::CreatedAtDesc { created_at, id })) => one(Pred::CreatedBefore(created_at, id)),
        (Order::PriorityDesc, Some(Keyset::PriorityDesc { priority, due_at, id })) => one(Pred::PriorityAfter(priority, due_at, id)),
        // First pages (a cursor is always decoded for its own order).
        _ => one(Pred::All),
    }
}

fn push_pred(qb: &mut QueryBuilder<'_, Postgres>, pred: Pred) {
    match pred {
        Pred::All => {}
        Pred::Dated => {
            qb.push(" AND due_at IS NOT NULL");
        }
        Pred::Undated => {
            qb.push(" AND due_at IS NULL");
        }
        Pred::DueAfter(d, id) => {
            qb.push(" AND (due_at, id) > (").push_bind(d).push(", ").push_bind(id).push(")");
        }
        Pred::DueBefore(d, id) => {
            qb.push(" AND (due_at, id) < (").push_bind(d).push(", ").push_bind(id).push(")");
        }
        Pred::UndatedAfter(id) => {
            qb.push(" AND due_at IS NULL AND id > ").push_bind(id);
        }
        Pred::UndatedBefore(id) => {
            qb.push(" AND due_at IS NULL AND id < ").push_bind(id);
        }
        Pred::CreatedAfter(t, id) => {
            qb.push(" AND (created_at, id) > (").push_bind(t).push(", ").push_bind(id).push(")");
        }
        Pred::CreatedBefore(t, id) => {
            qb.push(" AND (created_at, id) < (").push_bind(t).push(", ").push_bind(id).push(")");
        }
        Pred::PriorityAfter(p, Some(d), id) => {
            qb.push(" AND (priority < ")
                .push_bind(p)
                .push(" OR (priority = ")
                .push_bind(p)
                .push(" AND ((due_at, id) > (")
                .push_bind(d)
                .push(", ")
                .push_bind(id)
                .push(") OR due_at IS NULL)))");
        }
        Pred::PriorityAfter(p, None, id) => {
            qb.push(" AND (priority < ").push_bind(p).push(" OR (priority = ").push_bind(p).push(" AND due_at IS NULL AND id > ").push_bind(id).push("))");
        }
    }
}

/// `SELECT <columns> FROM tasks WHERE user_id = $ AND <filters> AND <pred> <order> LIMIT $`.
fn push_scan<'a>(qb: &mut QueryBuilder<'a, Postgres>, user: &'a UserId, f: &'a TaskFilterSql, seg: Segment, limit: i64) {
    qb.push("SELECT ").push(TaskRow::COLUMNS).push(" FROM tasks WHERE user_id = ").push_bind(user.as_ref());
    if let Some(status) = f.status {
        qb.push(" AND status = ").push_bind(status);
    }
    if let Some(priority) = f.priority {
        qb.push(" AND priority = ").push_bind(priority);
    }
    if let Some(tag) = &f.tag {
        qb.push(" AND tags @> ARRAY[").push_bind(tag.as_str()).push("::text]");
    }
    if let Some(before) = f.due_before {
        qb.push(" AND due_at < ").push_bind(before);
    }
    if let Some(after) = f.due_after {
        qb.push(" AND due_at > ").push_bind(after);
    }
    if let Some(search) = &f.search {
        let pattern = like_pattern(search);
        qb.push(" AND (title ILIKE ").push_bind(pattern.clone()).push(" ESCAPE '\\' OR description ILIKE ").push_bind(pattern).push(" ESCAPE '\\')");
    }
    push_pred(qb, seg.pred);
    qb.push(seg.order_by).push(" LIMIT ").push_bind(limit);
}

/// `%s%` for a case-insensitive substring match, with LIKE's wildcards and escape taken literally.
pub fn like_pattern(s: &str) -> String {
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

/// One page of the caller's tasks: at most `limit` rows after `after` (whose order must be `order`).
pub fn tasks_query<'a>(user: &'a UserId, order: Order, f: &'a TaskFilterSql, after: Option<&Keyset>, limit: i64) -> QueryBuilder<'a, Postgres> {
    debug_assert!(after.is_none_or(|k| k.order() == order), "a cursor is decoded for its order");
    let mut qb = QueryBuilder::new("");
    match plan(order, after).as_slice() {
        [seg] => push_scan(&mut qb, user, f, *seg, limit),
        segments => {
            qb.push("SELECT ").push(TaskRow::COLUMNS).push(" FROM (");
            for (i, seg) in segments.iter().enumerate() {
                qb.push(if i == 0 { "(" } else { " UNION ALL (" });
                push_scan(&mut qb, user, f, *seg, limit);
                qb.push(")");
            }
            qb.push(") AS page").push(order_by(order)).push(" LIMIT ").push_bind(limit);
        }
    }
    qb
}

pub async fn tasks(pool: &PgPool, user: &UserId, order: Order, f: &TaskFilterSql, after: Option<&Keyset>, limit: i64) -> Result<Vec<TaskRow>, sqlx::Error> {
    let (pool, user, f, after) = (pool.clone(), user.clone(), f.clone(), after.copied());
    detached(async move { tasks_query(&user, order, &f, after.as_ref(), limit).build().try_map(task_row).fetch_all(&pool).await }).await
}

/// A row selected as [`TaskRow::COLUMNS`], read by position: `FromRow` reads each column by its
/// name, a lookup in the statement's map of names per column per row (~5% of the query API's CPU
/// for a 50-row page). `COLUMNS` lists the columns in field order (a test in `platform` checks it).
pub(crate) fn task_row(row: PgRow) -> Result<TaskRow, sqlx::Error> {
    Ok(TaskRow {
        id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        title: row.try_get(2)?,
        description: row.try_get(3)?,
        status: row.try_get(4)?,
        priority: row.try_get(5)?,
        due_at: row.try_get(6)?,
        timezone: row.try_get(7)?,
        recurrence: row.try_get(8)?,
        remind_before: row.try_get(9)?,
        remind_at: row.try_get(10)?,
        tags: row.try_get(11)?,
        version: row.try_get(12)?,
        created_at: row.try_get(13)?,
        updated_at: row.try_get(14)?,
        completed_at: row.try_get(15)?,
        recurrence_parent_id: row.try_get(16)?,
        occurrence: row.try_get(17)?,
        reminded_for: row.try_get(18)?,
    })
}

/// Runs a statement that reads many rows in a task of its own, outside the request's span.
///
/// sqlx polls a statement's rows through three nested streams, each entering the span that was
/// current when the statement started, on every poll: inside the request's span (which the
/// OpenTelemetry layer times on each entry and exit) that was ~11% of the query API's CPU for a
/// 50-row page (perf). sqlx's own log events for the statement (slow statements) still reach the
/// subscriber, without the request's span. Dropping the returned future (a request timing out)
/// aborts the task, as dropping the statement would.
async fn detached<T: Send + 'static>(statement: impl Future<Output = Result<T, sqlx::Error>> + Send + 'static) -> Result<T, sqlx::Error> {
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(tokio::spawn(statement));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(sqlx::Error::Io(std::io::Error::other(e))),
    }
}

pub async fn task(pool: &PgPool, user: &UserId, id: Uuid) -> Result<Option<TaskRow>, sqlx::Error> {
    let mut qb = QueryBuilder::new("SELECT ");
    qb.push(TaskRow::COLUMNS).push(" FROM tasks WHERE id = ").push_bind(id).push(" AND user_id = ").push_bind(user.as_ref());
    qb.build().try_map(task_row).fetch_optional(pool).await
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

/// The caller's events of one task (kept after the task is deleted), by version, after `after_version`.
pub async fn history(pool: &PgPool, user: &UserId, task: Uuid, after_version: i32, limit: i64) -> Result<Vec<HistoryRow>, sqlx::Error> {
    let (pool, user) = (pool.clone(), user.clone());
    detached(async move { history_rows(&pool, &user, task, after_version, limit).await }).await
}

async fn history_rows(pool: &PgPool, user: &UserId, task: Uuid, after_version: i32, limit: i64) -> Result<Vec<HistoryRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, event_type, version, occurred_at, data, correlation_id FROM task_history
         WHERE task_id = $1 AND user_id = $2 AND version > $3
         ORDER BY version
         LIMIT $4",
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

/// PostgreSQL answers and every migration this build knows has been applied successfully.
pub async fn is_ready(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success").fetch_all(pool).await?;
    Ok(platform::db::MIGRATOR.iter().filter(|m| m.migration_type.is_up_migration()).all(|m| applied.contains(&m.version)))
}

/// A notification row with when it was read: the same shape the export writes.
pub use platform::export::ExportedNotification as NotificationRow;

/// The caller's notifications, newest first (keyset on (created_at, id) descending).
pub async fn notifications(
    pool: &PgPool,
    user: &UserId,
    unread_only: bool,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<NotificationRow>, sqlx::Error> {
    let (pool, user) = (pool.clone(), user.clone());
    detached(async move { notification_rows(&pool, &user, unread_only, after, limit).await }).await
}

async fn notification_rows(
    pool: &PgPool,
    user: &UserId,
    unread_only: bool,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<NotificationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n.id, n.task_id, n.kind, n.message, n.created_at, r.read_at
         FROM notifications n LEFT JOIN notification_reads r ON r.notification_id = n.id
         WHERE n.user_id = $1
           AND (NOT $2 OR r.read_at IS NULL)
           AND ($3::timestamptz IS NULL OR (n.created_at, n.id) < ($3, $4))
         ORDER BY n.created_at DESC, n.id DESC
         LIMIT $5",
    )
    .bind(user.as_ref())
    .bind(unread_only)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn notification(pool: &PgPool, user: &UserId, id: Uuid) -> Result<Option<NotificationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n.id, n.task_id, n.kind, n.message, n.created_at, r.read_at
         FROM notifications n LEFT JOIN notification_reads r ON r.notification_id = n.id
         WHERE n.id = $1 AND n.user_id = $2",
    )
    .bind(id)
    .bind(user.as_ref())
    .fetch_optional(pool)
    .await
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: Uuid,
    pub notification_id: Uuid,
    pub url: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub delivery_id: Uuid,
    pub attempt: i32,
    pub attempted_at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// Counts the statements [`deliveries`] runs (`query_api_delivery_statements_total` in `/metrics`),
/// so a test can see that a page of notifications loads its deliveries in a fixed number of them.
pub const DELIVERY_STATEMENTS_METRIC: &str = "query_api_delivery_statements_total";

/// Webhook deliveries (with their attempts) of some of the caller's notifications: two statements
/// however many notifications are asked about.
pub async fn deliveries(pool: &PgPool, user: &UserId, notifications: &[Uuid]) -> Result<(Vec<DeliveryRow>, Vec<AttemptRow>), sqlx::Error> {
    if notifications.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    metrics::counter!(DELIVERY_STATEMENTS_METRIC).increment(2);
    let deliveries: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT id, notification_id, url, status, created_at, finished_at FROM webhook_deliveries
         WHERE user_id = $1 AND notification_id = ANY($2) ORDER BY created_at",
    )
    .bind(user.as_ref())
    .bind(notifications)
    .fetch_all(pool)
    .await?;
    let ids: Vec<Uuid> = deliveries.iter().map(|d| d.id).collect();
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT delivery_id, attempt, attempted_at, status_code, error, duration_ms FROM webhook_attempts
         WHERE delivery_id = ANY($1) ORDER BY delivery_id, attempt",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok((deliveries, attempts))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TASK_COLUMNS: &str = TaskRow::COLUMNS;

    fn user() -> UserId {
        UserId::parse("alice".to_owned()).unwrap()
    }

    /// The SQL after `FROM tasks` (the column list is the same for every query).
    fn tail(qb: &QueryBuilder<'_, Postgres>) -> String {
        let sql = qb.sql();
        sql[sql.find(" FROM tasks").expect("FROM tasks")..].to_owned()
    }

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
        assert_eq!(like_pattern("plain"), "%plain%");
    }

    #[test]
    fn first_pages_are_one_scan_in_the_order_except_due_descending() {
        let (u, f) = (user(), TaskFilterSql::default());
        let want = [
            (Order::DueAtAsc, " ORDER BY due_at ASC NULLS LAST, id ASC"),
            (Order::CreatedAtAsc, " ORDER BY created_at ASC, id ASC"),
            (Order::CreatedAtDesc, " ORDER BY created_at DESC, id DESC"),
            (Order::PriorityDesc, " ORDER BY priority DESC, due_at ASC NULLS LAST, id ASC"),
        ];
        for (o, order_by) in want {
            assert_eq!(tail(&tasks_query(&u, o, &f, None, 51)), format!(" FROM tasks WHERE user_id = $1{order_by} LIMIT $2"), "{o:?}");
        }
        // Undated tasks come last: dated ones backwards on the index, then the undated ones.
        assert_eq!(
            tasks_query(&u, Order::DueAtDesc, &f, None, 51).sql(),
            format!(
                "SELECT {TASK_COLUMNS} FROM (\
                 (SELECT {TASK_COLUMNS} FROM tasks WHERE user_id = $1 AND due_at IS NOT NULL ORDER BY due_at DESC, id DESC LIMIT $2) \
                 UNION ALL (SELECT {TASK_COLUMNS} FROM tasks WHERE user_id = $3 AND due_at IS NULL ORDER BY id DESC LIMIT $4)\
                 ) AS page ORDER BY due_at DESC NULLS LAST, id DESC LIMIT $5"
            )
        );
    }

    #[test]
    fn each_present_filter_adds_one_bound_predicate() {
        let u = user();
        let t = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        let f = TaskFilterSql {
            status: Some("open"),
            priority: Some(3),
            tag: Some("x'; DROP TABLE tasks; --".into()),
            due_before: Some(t),
            due_after: Some(t),
            search: Some("50%".into()),
        };
        assert_eq!(
            tail(&tasks_query(&u, Order::CreatedAtAsc, &f, None, 10)),
            " FROM tasks WHERE user_id = $1 AND status = $2 AND priority = $3 AND tags @> ARRAY[$4::text] \
             AND due_at < $5 AND due_at > $6 AND (title ILIKE $7 ESCAPE '\\' OR description ILIKE $8 ESCAPE '\\') \
             ORDER BY created_at ASC, id ASC LIMIT $9"
        );
        let only_tag = TaskFilterSql { tag: Some("home".into()), ..Default::default() };
        assert_eq!(
            tail(&tasks_query(&u, Order::DueAtAsc, &only_tag, None, 10)),
            " FROM tasks WHERE user_id = $1 AND tags @> ARRAY[$2::text] ORDER BY due_at ASC NULLS LAST, id ASC LIMIT $3"
        );
        // Both scans of a two-scan page carry the filters.
        let sql = tasks_query(&u, Order::DueAtDesc, &only_tag, None, 10).sql().to_owned();
        assert_eq!(sql.matches("tags @> ARRAY[").count(), 2, "{sql}");
    }

    #[test]
    fn each_order_continues_after_its_cursor_on_index_ranges() {
        let (id, d) = (Uuid::nil(), DateTime::from_timestamp(0, 0).unwrap());
        let seg = |pred, order_by| Segment { pred, order_by };
        let cases = [
            (
                Keyset::DueAtAsc { due_at: Some(d), id },
                vec![seg(Pred::DueAfter(d, id), " ORDER BY due_at ASC, id ASC"), seg(Pred::Undated, " ORDER BY id ASC")],
            ),
            (Keyset::DueAtAsc { due_at: None, id }, vec![seg(Pred::UndatedAfter(id), " ORDER BY id ASC")]),
            (
                Keyset::DueAtDesc { due_at: Some(d), id },
                vec![seg(Pred::DueBefore(d, id), " ORDER BY due_at DESC, id DESC"), seg(Pred::Undated, " ORDER BY id DESC")],
            ),
            (Keyset::DueAtDesc { due_at: None, id }, vec![seg(Pred::UndatedBefore(id), " ORDER BY id DESC")]),
            (Keyset::CreatedAtAsc { created_at: d, id }, vec![seg(Pred::CreatedAfter(d, id), order_by(Order::CreatedAtAsc))]),
            (Keyset::CreatedAtDesc { created_at: d, id }, vec![seg(Pred::CreatedBefore(d, id), order_by(Order::CreatedAtDesc))]),
            (Keyset::PriorityDesc { priority: 2, due_at: Some(d), id }, vec![seg(Pred::PriorityAfter(2, Some(d), id), order_by(Order::PriorityDesc))]),
            (Keyset::PriorityDesc { priority: 2, due_at: None, id }, vec![seg(Pred::PriorityAfter(2, None, id), order_by(Order::PriorityDesc))]),
        ];
        for (k, want) in cases {
            assert_eq!(plan(k.order(), Some(&k)), want, "{k:?}");
        }
    }

    #[test]
    fn keyset_predicates_bind_every_value() {
        let (u, f) = (user(), TaskFilterSql::default());
        let (id, d) = (Uuid::nil(), Some(DateTime::from_timestamp(0, 0).unwrap()));
        let cases = [
            (Keyset::DueAtAsc { due_at: None, id }, " AND due_at IS NULL AND id > $2 ORDER BY id ASC LIMIT $3"),
            (Keyset::CreatedAtAsc { created_at: d.unwrap(), id }, " AND (created_at, id) > ($2, $3) ORDER BY created_at ASC, id ASC LIMIT $4"),
            (Keyset::CreatedAtDesc { created_at: d.unwrap(), id }, " AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4"),
            (
                Keyset::PriorityDesc { priority: 2, due_at: d, id },
                " AND (priority < $2 OR (priority = $3 AND ((due_at, id) > ($4, $5) OR due_at IS NULL))) \
                 ORDER BY priority DESC, due_at ASC NULLS LAST, id ASC LIMIT $6",
            ),
            (
                Keyset::PriorityDesc { priority: 2, due_at: None, id },
                " AND (priority < $2 OR (priority = $3 AND due_at IS NULL AND id > $4)) \
                 ORDER BY priority DESC, due_at ASC NULLS LAST, id ASC LIMIT $5",
            ),
        ];
        for (k, rest) in cases {
            assert_eq!(tail(&tasks_query(&u, k.order(), &f, Some(&k), 5)), format!(" FROM tasks WHERE user_id = $1{rest}"), "{k:?}");
        }
        let sql = tasks_query(&u, Order::DueAtAsc, &f, Some(&Keyset::DueAtAsc { due_at: d, id }), 5).sql().to_owned();
        assert!(sql.contains(" AND (due_at, id) > ($2, $3) ORDER BY due_at ASC, id ASC LIMIT $4) UNION ALL ("), "{sql}");
        assert!(sql.ends_with(" AND due_at IS NULL ORDER BY id ASC LIMIT $6)) AS page ORDER BY due_at ASC NULLS LAST, id ASC LIMIT $7"), "{sql}");
    }

    #[test]
    fn values_never_reach_the_sql_text() {
        let u = UserId::parse("o'brien".to_owned()).unwrap();
        let f = TaskFilterSql { tag: Some("secret-tag".into()), search: Some("needle".into()), ..Default::default() };
        for o in Order::ALL {
            let sql = tasks_query(&u, o, &f, None, 5).sql().to_owned();
            assert!(!sql.contains("o'brien") && !sql.contains("secret-tag") && !sql.contains("needle"), "{sql}");
        }
    }
}
