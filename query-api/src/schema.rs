//! The GraphQL schema (contract §5) over the read models. Every resolver filters by the caller, so
//! another user's task is answered exactly as a missing one, and runs one SQL statement; nested
//! lists are loaded once per level for the whole page (a page's webhook deliveries: two statements).
//!
//! Queries only: the subscriptions (`live.rs`) build on the types here, and `routes.rs` puts both
//! together. Below: `direct` (a page's rows answered without a future per field; it depends on
//! async-graphql only), `store` (SQL), `cursor` (page positions), `projections` (status and lag).

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::resolver_utils::enum_value;
use async_graphql::{Context, ContextSelectionSet, Enum, InputObject, Json, Object, SimpleObject, Value, ID};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use domain::UserId;
use platform::readmodel::{self, TaskRow};

use self::direct::{optional, scalar, DirectList, DirectObject};
use crate::cursor::{self, HistoryCursor, Keyset, NotificationCursor};
use crate::error::{internal, user_error};
use crate::store::{self, TaskFilterSql};
use crate::watermarks::Watermarks;

pub mod direct;

/// The largest page `first` may ask for.
pub const MAX_PAGE: i32 = 200;
/// The page size when `first` is not given.
pub const DEFAULT_PAGE: i32 = 50;
/// What the cost model assumes of lists without `first` (see `cost.rs`): deliveries of one
/// notification (one per webhook it was sent to) and attempts of one delivery.
pub const ASSUMED_DELIVERIES: usize = 2;
pub const ASSUMED_ATTEMPTS: usize = 5;

/// The cost of a page: its subtree once per row it may hold (`first`, or its default when null).
/// An out-of-range `first` costs one row: the field is refused before it reads anything
/// ([`page_size`]), with a clearer message than a cost would give.
fn page_cost(first: Option<i32>, child_complexity: usize) -> usize {
    let rows = first.unwrap_or(DEFAULT_PAGE);
    let rows = if (1..=MAX_PAGE).contains(&rows) { rows as usize } else { 1 };
    rows.saturating_mul(child_complexity)
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum TaskStatus {
    Open,
    Completed,
}

impl TaskStatus {
    fn as_db(self) -> &'static str {
        match self {
            TaskStatus::Open => readmodel::status::OPEN,
            TaskStatus::Completed => readmodel::status::COMPLETED,
        }
    }
}

// The domain's priorities (stored as their rank), converted both ways.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(remote = "domain::Priority")]
pub enum Priority {
    Low,
    Medium,
    High,
    Urgent,
}

/// Orders of `tasks`; each ends with the task id, so pages never skip or repeat a task. Tasks
/// without a due date come last in both due-date orders.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug, Default)]
#[graphql(remote = "crate::cursor::Order")]
pub enum TaskOrder {
    #[default]
    DueAtAsc,
    DueAtDesc,
    CreatedAtAsc,
    CreatedAtDesc,
    /// Most urgent first; ties by due date (earliest first, undated last).
    PriorityDesc,
}

#[derive(InputObject, Default, Debug)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub priority: Option<Priority>,
    /// Tasks carrying this tag.
    pub tag: Option<String>,
    /// Tasks due strictly before this instant (undated tasks never match).
    pub due_before: Option<DateTime<Utc>>,
    /// Tasks due strictly after this instant (undated tasks never match).
    pub due_after: Option<DateTime<Utc>>,
    /// Case-insensitive substring of the title or the description (taken literally).
    pub search: Option<String>,
}

impl From<TaskFilter> for TaskFilterSql {
    fn from(f: TaskFilter) -> Self {
        TaskFilterSql {
            status: f.status.map(TaskStatus::as_db),
            priority: f.priority.map(|p| domain::Priority::from(p).rank()),
            tag: f.tag,
            due_before: f.due_before,
            due_after: f.due_after,
            search: f.search,
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Task {
    pub id: ID,
    pub title: String,
    pub description: Option<String>,
    pub status: TaskStatus,
    pub priority: Priority,
    pub due_at: Option<DateTime<Utc>>,
    pub timezone: String,
    pub recurrence: Option<String>,
    /// When the reminder fires (due date minus `remind_before`).
    pub remind_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// For an occurrence of a recurring task: the task it recurs from.
    pub recurrence_parent_id: Option<ID>,
    pub occurrence: Option<i32>,
}

impl From<TaskRow> for Task {
    fn from(r: TaskRow) -> Self {
        Task {
            status: if r.is_completed() { TaskStatus::Completed } else { TaskStatus::Open },
            priority: r.priority().into(),
            id: ID(r.id.to_string()),
            title: r.title,
            description: r.description,
            due_at: r.due_at,
            timezone: r.timezone,
            recurrence: r.recurrence,
            remind_at: r.remind_at,
            tags: r.tags,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
            completed_at: r.completed_at,
            recurrence_parent_id: r.recurrence_parent_id.map(|p| ID(p.to_string())),
            occurrence: r.occurrence,
        }
    }
}

impl DirectObject for Task {
    fn field_value(&self, name: &str, _: &ContextSelectionSet<'_>) -> Option<Value> {
        Some(match name {
            "id" => scalar(&self.id),
            "title" => scalar(&self.title),
            "description" => optional(&self.description),
            "status" => enum_value(self.status),
            "priority" => enum_value(self.priority),
            "dueAt" => optional(&self.due_at),
            "timezone" => scalar(&self.timezone),
            "recurrence" => optional(&self.recurrence),
            "remindAt" => optional(&self.remind_at),
            "tags" => Value::List(self.tags.iter().map(scalar).collect()),
            "version" => scalar(&self.version),
            "createdAt" => scalar(&self.created_at),
            "updatedAt" => scalar(&self.updated_at),
            "completedAt" => optional(&self.completed_at),
            "recurrenceParentId" => optional(&self.recurrence_parent_id),
            "occurrence" => optional(&self.occurrence),
            _ => return None,
        })
    }
}

/// Relay page info. Pagination is forward only (`first`/`after`); `hasPreviousPage` is true when
/// the page starts after a cursor.
#[derive(SimpleObject, Debug)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub has_previous_page: bool,
    pub start_cursor: Option<String>,
    pub end_cursor: Option<String>,
}

impl PageInfo {
    fn of(cursors: &[String], has_next_page: bool, after: bool) -> Self {
        PageInfo { has_next_page, has_previous_page: after, start_cursor: cursors.first().cloned(), end_cursor: cursors.last().cloned() }
    }
}

/// A task of a page and its position; the cursor (`cursor`, the position encoded) is only
/// encoded when it is selected: a client paging through usually reads only `pageInfo.endCursor`.
#[derive(Debug)]
pub struct TaskEdge {
    pub position: Keyset,
    pub node: Task,
}

#[Object]
impl TaskEdge {
    async fn cursor(&self) -> String {
        self.position.encode()
    }

    async fn node(&self) -> &Task {
        &self.node
    }
}

impl DirectObject for TaskEdge {
    fn field_value(&self, name: &str, selection: &ContextSelectionSet<'_>) -> Option<Value> {
        match name {
            "cursor" => Some(Value::String(self.position.encode())),
            "node" => direct::object_value(&self.node, selection),
            _ => None,
        }
    }
}

#[derive(SimpleObject, Debug)]
pub struct TaskConnection {
    /// `[TaskEdge!]!`, answered without a future per field when the selection allows it.
    pub edges: DirectList<TaskEdge>,
    pub page_info: PageInfo,
}

#[derive(SimpleObject, Debug)]
pub struct TaskEvent {
    pub event_id: ID,
    /// The CloudEvents type, e.g. `task.created`.
    #[graphql(name = "type")]
    pub kind: String,
    /// The task version this event produced.
    pub version: i32,
    pub occurred_at: DateTime<Utc>,
    /// The event data as appended to the log.
    pub data: Json<serde_json::Value>,
    pub correlation_id: Option<String>,
}

#[derive(SimpleObject, Debug)]
pub struct TaskEventEdge {
    pub cursor: String,
    pub node: TaskEvent,
}

#[derive(SimpleObject, Debug)]
pub struct TaskEventConnection {
    pub edges: Vec<TaskEventEdge>,
    pub page_info: PageInfo,
}

#[derive(SimpleObject, Debug, PartialEq)]
pub struct TaskStats {
    pub total: i32,
    pub open: i32,
    /// Completed tasks (deleted tasks are not counted anywhere).
    pub completed: i32,
    /// Open tasks whose due date has passed.
    pub overdue: i32,
    /// completed / total; 0 when there are no tasks.
    pub completion_rate: f64,
    /// Mean of completedAt - createdAt over completed tasks; null when there are none.
    pub avg_completion_seconds: Option<f64>,
}

#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The next log offset this projection will apply.
    pub offset: i64,
    /// The end of the log (committed records) in this partition.
    pub high_watermark: i64,
}

#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct ProjectionStatus {
    pub name: String,
    pub state: String,
    /// Records in the log not yet applied, over all partitions.
    pub lag: i64,
    pub partitions: Vec<PartitionStatus>,
}

impl From<platform::projections::ProjectionStatus> for ProjectionStatus {
    fn from(s: platform::projections::ProjectionStatus) -> Self {
        ProjectionStatus {
            lag: s.lag(),
            state: s.state.name().to_owned(),
            name: s.name,
            partitions: s
                .partitions
                .into_iter()
                .map(|p| PartitionStatus { partition: p.partition, offset: p.offset, high_watermark: p.high_watermark })
                .collect(),
        }
    }
}

/// What the resolvers need besides the caller (a `UserId` in the request data).
#[derive(Clone)]
pub struct QueryContext {
    pub pool: sqlx::PgPool,
    pub topic: String,
    pub watermarks: Arc<dyn Watermarks>,
}

/// A notification (one per fired reminder).
#[derive(SimpleObject, Clone)]
#[graphql(complex)]
pub struct Notification {
    pub id: ID,
    pub task_id: ID,
    pub kind: String,
    pub message: String,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
    #[graphql(skip)]
    pub uuid: Uuid,
    /// The webhook deliveries when the page loaded them for all its notifications at once;
    /// `None` loads them for this notification alone (a pushed notification).
    #[graphql(skip)]
    pub deliveries: Option<Vec<WebhookDelivery>>,
}

impl From<store::NotificationRow> for Notification {
    fn from(r: store::NotificationRow) -> Self {
        Notification {
            id: ID(r.id.to_string()),
            task_id: ID(r.task_id.to_string()),
            kind: r.kind,
            message: r.message,
            created_at: r.created_at,
            read_at: r.read_at,
            uuid: r.id,
            deliveries: None,
        }
    }
}

/// One POST of a notification to the user's webhook.
#[derive(SimpleObject, Clone)]
pub struct WebhookAttempt {
    pub attempt: i32,
    pub attempted_at: DateTime<Utc>,
    /// The receiver's HTTP status, when it answered.
    pub status_code: Option<i32>,
    /// Why there was no answer (timeout, connection refused, refused address ...).
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// The delivery of a notification to the user's webhook.
#[derive(SimpleObject, Clone)]
pub struct WebhookDelivery {
    pub id: ID,
    pub url: String,
    /// pending, delivered, failed (given up) or cancelled (webhook removed).
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    #[graphql(complexity = "ASSUMED_ATTEMPTS * child_complexity")]
    pub attempts: Vec<WebhookAttempt>,
}

#[async_graphql::ComplexObject]
impl Notification {
    /// Deliveries of this notification to the user's webhook, with every attempt.
    #[graphql(complexity = "ASSUMED_DELIVERIES * child_complexity")]
    async fn webhook_deliveries(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<WebhookDelivery>> {
        if let Some(loaded) = &self.deliveries {
            return Ok(loaded.clone());
        }
        let (qc, user) = caller(ctx)?;
        Ok(deliveries_of(&qc.pool, user, &[self.uuid]).await?.remove(&self.uuid).unwrap_or_default())
    }
}

/// The webhook deliveries of some notifications, by notification, in two statements (one per
/// level: deliveries, then their attempts) however many notifications there are.
async fn deliveries_of(pool: &sqlx::PgPool, user: &UserId, notifications: &[Uuid]) -> async_graphql::Result<HashMap<Uuid, Vec<WebhookDelivery>>> {
    let (deliveries, attempts) = store::deliveries(pool, user, notifications).await.map_err(internal)?;
    let mut attempts_of: HashMap<Uuid, Vec<WebhookAttempt>> = HashMap::new();
    for a in attempts {
        attempts_of.entry(a.delivery_id).or_default().push(WebhookAttempt {
            attempt: a.attempt,
            attempted_at: a.attempted_at,
            status_code: a.status_code,
            error: a.error,
            duration_ms: a.duration_ms,
        });
    }
    let mut by_notification: HashMap<Uuid, Vec<WebhookDelivery>> = HashMap::new();
    for d in deliveries {
        by_notification.entry(d.notification_id).or_default().push(WebhookDelivery {
            id: ID(d.id.to_string()),
            url: d.url,
            status: d.status,
            created_at: d.created_at,
            finished_at: d.finished_at,
            attempts: attempts_of.remove(&d.id).unwrap_or_default(),
        });
    }
    Ok(by_notification)
}

#[derive(SimpleObject)]
pub struct NotificationEdge {
    pub cursor: String,
    pub node: Notification,
}

#[derive(SimpleObject)]
pub struct NotificationConnection {
    pub edges: Vec<NotificationEdge>,
    pub page_info: PageInfo,
}

/// `first` as a row count, or a clear error.
fn page_size(first: i32) -> async_graphql::Result<i64> {
    if !(0..=MAX_PAGE).contains(&first) {
        return Err(user_error("BAD_USER_INPUT", format!("`first` must be between 0 and {MAX_PAGE}, got {first}")));
    }
    Ok(i64::from(first))
}

fn bad_cursor(e: cursor::InvalidCursor) -> async_graphql::Error {
    user_error("BAD_USER_INPUT", e.to_string())
}

/// An id that is not a UUID names no task.
fn parse_id(id: &ID) -> Option<Uuid> {
    Uuid::parse_str(id.as_str()).ok()
}

fn caller<'a>(ctx: &Context<'a>) -> async_graphql::Result<(&'a QueryContext, &'a UserId)> {
    Ok((ctx.data::<QueryContext>()?, ctx.data::<UserId>()?))
}

pub struct Query;

#[Object]
impl Query {
    /// One of the caller's tasks; `null` when it does not exist, was deleted, or is someone else's.
    async fn task(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Task>> {
        let (qc, user) = caller(ctx)?;
        let Some(id) = parse_id(&id) else { return Ok(None) };
        Ok(store::task(&qc.pool, user, id).await.map_err(internal)?.map(Task::from))
    }

    /// The caller's tasks, filtered, ordered and paginated forward (Relay cursors, at most 200 a page).
    #[graphql(complexity = "page_cost(first, child_complexity)")]
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        filter: Option<TaskFilter>,
        #[graphql(default_with = "Some(TaskOrder::DueAtAsc)")] order_by: Option<TaskOrder>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<TaskConnection> {
        let (qc, user) = caller(ctx)?;
        // An explicit `null` means the default, as if the argument were absent.
        let order_by = cursor::Order::from(order_by.unwrap_or_default());
        let limit = page_size(first.unwrap_or(DEFAULT_PAGE))?;
        let after = after.map(|c| Keyset::decode(&c, order_by)).transpose().map_err(bad_cursor)?;
        let filter = TaskFilterSql::from(filter.unwrap_or_default());
        let mut rows = store::tasks(&qc.pool, user, order_by, &filter, after.as_ref(), limit + 1).await.map_err(internal)?;
        let has_next_page = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let edges: Vec<TaskEdge> = rows.into_iter().map(|r| TaskEdge { position: Keyset::of(order_by, &r), node: r.into() }).collect();
        let page_info = PageInfo {
            has_next_page,
            has_previous_page: after.is_some(),
            start_cursor: edges.first().map(|e| e.position.encode()),
            end_cursor: edges.last().map(|e| e.position.encode()),
        };
        Ok(TaskConnection { page_info, edges: DirectList(edges) })
    }

    /// The events of one of the caller's tasks, oldest first; kept after the task is deleted. Another
    /// user's task has no history here, exactly like a task that does not exist.
    #[graphql(complexity = "page_cost(first, child_complexity)")]
    async fn task_history(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<TaskEventConnection> {
        let (qc, user) = caller(ctx)?;
        let limit = page_size(first.unwrap_or(DEFAULT_PAGE))?;
        let after = after.map(|c| HistoryCursor::decode(&c)).transpose().map_err(bad_cursor)?;
        let mut rows = match parse_id(&task_id) {
            Some(id) => store::history(&qc.pool, user, id, after.map_or(0, |c| c.version), limit + 1).await.map_err(internal)?,
            None => Vec::new(),
        };
        let has_next_page = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let edges: Vec<TaskEventEdge> = rows
            .into_iter()
            .map(|r| TaskEventEdge {
                cursor: HistoryCursor { version: r.version }.encode(),
                node: TaskEvent {
                    event_id: ID(r.event_id.to_string()),
                    kind: r.event_type,
                    version: r.version,
                    occurred_at: r.occurred_at,
                    data: Json(r.data),
                    correlation_id: r.correlation_id,
                },
            })
            .collect();
        let cursors: Vec<String> = edges.iter().map(|e| e.cursor.clone()).collect();
        Ok(TaskEventConnection { page_info: PageInfo::of(&cursors, has_next_page, after.is_some()), edges })
    }

    /// The caller's notifications, newest first.
    #[graphql(complexity = "page_cost(first, child_complexity)")]
    async fn notifications(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(false)")] unread_only: Option<bool>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<NotificationConnection> {
        let (qc, user) = caller(ctx)?;
        let limit = page_size(first.unwrap_or(DEFAULT_PAGE))?;
        let after = after.map(|c| NotificationCursor::decode(&c)).transpose().map_err(bad_cursor)?;
        let mut rows =
            store::notifications(&qc.pool, user, unread_only.unwrap_or(false), after.map(|c| (c.created_at, c.id)), limit + 1).await.map_err(internal)?;
        let has_next_page = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        // The page's webhook deliveries, when selected, are loaded for all its notifications at once.
        let mut deliveries = if ctx.look_ahead().field("edges").field("node").field("webhookDeliveries").exists() {
            Some(deliveries_of(&qc.pool, user, &rows.iter().map(|r| r.id).collect::<Vec<_>>()).await?)
        } else {
            None
        };
        let edges: Vec<NotificationEdge> = rows
            .into_iter()
            .map(|r| {
                let cursor = NotificationCursor { created_at: r.created_at, id: r.id }.encode();
                let loaded = deliveries.as_mut().map(|d| d.remove(&r.id).unwrap_or_default());
                NotificationEdge { cursor, node: Notification { deliveries: loaded, ..r.into() } }
            })
            .collect();
        let cursors: Vec<String> = edges.iter().map(|e| e.cursor.clone()).collect();
        Ok(NotificationConnection { page_info: PageInfo::of(&cursors, has_next_page, after.is_some()), edges })
    }

    /// Counts over the caller's (existing) tasks.
    async fn stats(&self, ctx: &Context<'_>) -> async_graphql::Result<TaskStats> {
        let (qc, user) = caller(ctx)?;
        let s = store::stats(&qc.pool, user).await.map_err(internal)?;
        let int = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(TaskStats {
            total: int(s.total),
            open: int(s.open),
            completed: int(s.completed),
            overdue: int(s.overdue),
            completion_rate: if s.total == 0 { 0.0 } else { s.completed as f64 / s.total as f64 },
            avg_completion_seconds: s.avg_completion_seconds,
        })
    }

    /// Each projection's position in the log and how far behind the end of the log it is.
    async fn projections(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ProjectionStatus>> {
        let qc = ctx.data::<QueryContext>()?;
        let statuses = crate::projections::current(&qc.pool, &qc.topic, qc.watermarks.as_ref()).await.map_err(internal)?;
        Ok(statuses.into_iter().map(ProjectionStatus::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_statuses_answer_the_state_by_name_and_the_lag_summed() {
        use platform::projections as p;
        let status = p::ProjectionStatus {
            name: "tasks".into(),
            state: p::ProjectionState::Rebuilding { events_done: 1, events_total: 2 },
            partitions: vec![
                p::PartitionStatus { partition: 0, offset: 10, high_watermark: 12 },
                p::PartitionStatus { partition: 1, offset: 5, high_watermark: 6 },
            ],
        };
        assert_eq!(
            ProjectionStatus::from(status),
            ProjectionStatus {
                name: "tasks".into(),
                state: "rebuilding".into(),
                lag: 1,
                partitions: vec![
                    PartitionStatus { partition: 0, offset: 10, high_watermark: 12 },
                    PartitionStatus { partition: 1, offset: 5, high_watermark: 6 }
                ],
            }
        );
    }

    /// One task with every optional field set, one with none.
    fn edges() -> Vec<TaskEdge> {
        let at = |s: i64| DateTime::from_timestamp(1_767_225_600 + s, 0).unwrap();
        let full = Task {
            id: ID("0190a0c0-0000-7000-8000-000000000001".into()),
            title: "Pay \"rent\" \u{e9}".into(),
            description: Some("line\nbreak".into()),
            status: TaskStatus::Completed,
            priority: Priority::Urgent,
            due_at: Some(at(60)),
            timezone: "Europe/Paris".into(),
            recurrence: Some("FREQ=WEEKLY;BYDAY=MO".into()),
            remind_at: Some(at(30)),
            tags: vec!["home".into(), "bills".into()],
            version: 7,
            created_at: at(0),
            updated_at: at(1),
            completed_at: Some(at(2)),
            recurrence_parent_id: Some(ID("0190a0c0-0000-7000-8000-000000000002".into())),
            occurrence: Some(3),
        };
        let bare = Task {
            id: ID("0190a0c0-0000-7000-8000-000000000003".into()),
            description: None,
            status: TaskStatus::Open,
            priority: Priority::Low,
            due_at: None,
            recurrence: None,
            remind_at: None,
            tags: vec![],
            completed_at: None,
            recurrence_parent_id: None,
            occurrence: None,
            ..full.clone()
        };
        let id = |n: u128| Uuid::from_u128(n);
        vec![
            TaskEdge { position: Keyset::PriorityDesc { priority: 3, due_at: Some(at(60)), id: id(1) }, node: full },
            TaskEdge { position: Keyset::DueAtAsc { due_at: None, id: id(3) }, node: bare },
        ]
    }

    struct Pages;

    #[Object]
    impl Pages {
        async fn resolved(&self) -> Vec<TaskEdge> {
            edges()
        }
        async fn direct(&self) -> DirectList<TaskEdge> {
            DirectList(edges())
        }
    }

    #[tokio::test]
    async fn a_direct_list_answers_exactly_what_async_graphql_would() {
        let schema = async_graphql::Schema::new(Pages, async_graphql::EmptyMutation, async_graphql::EmptySubscription);
        let every_field = "{ cursor node { id title description status priority dueAt timezone recurrence remindAt tags version \
                           createdAt updatedAt completedAt recurrenceParentId occurrence } }";
        let selections = [
            every_field,
            "{ node { id title status priority dueAt tags version } cursor }",
            "{ __typename c: cursor node { __typename t: title tags } }",
            // Not plain: answered by async-graphql, through the same field.
            "{ node { ...F } } } fragment F on Task { id title",
            "{ node { ... on Task { id } status } }",
            "{ cursor cursor node { id } }",
            "{ node { id @include(if: true) title @skip(if: true) } }",
        ];
        for selection in selections {
            let (resolved, direct) = (format!("{{ list: resolved {selection} }}"), format!("{{ list: direct {selection} }}"));
            let (a, b) = (schema.execute(resolved.as_str()).await, schema.execute(direct.as_str()).await);
            assert!(a.errors.is_empty() && b.errors.is_empty(), "{selection}: {:?} {:?}", a.errors, b.errors);
            assert_eq!(serde_json::to_string(&b.data).unwrap(), serde_json::to_string(&a.data).unwrap(), "{selection}");
        }
        // The schema sees the same type.
        assert!(schema.sdl().contains("resolved: [TaskEdge!]!") && schema.sdl().contains("direct: [TaskEdge!]!"), "{}", schema.sdl());
    }

    #[test]
    fn page_size_is_bounded() {
        assert_eq!(page_size(0).unwrap(), 0);
        assert_eq!(page_size(200).unwrap(), 200);
        for bad in [-1, 201, i32::MAX] {
            assert!(page_size(bad).unwrap_err().message.contains("between 0 and 200"));
        }
    }

    #[test]
    fn filters_map_to_the_stored_representation() {
        let f = TaskFilterSql::from(TaskFilter { status: Some(TaskStatus::Completed), priority: Some(Priority::Urgent), ..Default::default() });
        assert_eq!((f.status, f.priority), (Some("completed"), Some(3)));
        for p in [Priority::Low, Priority::Medium, Priority::High, Priority::Urgent] {
            let rank = domain::Priority::from(p).rank();
            assert_eq!(Priority::from(domain::Priority::from_rank(rank).unwrap()), p);
        }
    }
}
