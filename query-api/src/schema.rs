//! The GraphQL schema (contract §5) over the read models. Every resolver filters by the caller, so
//! another user's task is answered exactly as a missing one.

use async_graphql::{Context, EmptyMutation, EmptySubscription, Enum, InputObject, Json, Object, Schema, SimpleObject, ID};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use domain::UserId;

use crate::cursor::{HistoryCursor, TaskCursor};
use crate::store::{self, TaskFilterSql};
use crate::watermarks::Watermarks;

pub type TaskSchema = Schema<Query, EmptyMutation, EmptySubscription>;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum TaskStatus {
    Open,
    Completed,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum Priority {
    Low,
    Medium,
    High,
    Urgent,
}

impl Priority {
    fn rank(self) -> i16 {
        match self {
            Priority::Low => 0,
            Priority::Medium => 1,
            Priority::High => 2,
            Priority::Urgent => 3,
        }
    }
    fn from_rank(r: i16) -> Self {
        match r {
            0 => Priority::Low,
            2 => Priority::High,
            3 => Priority::Urgent,
            _ => Priority::Medium,
        }
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug, Default)]
pub enum TaskOrder {
    #[default]
    DueAtAsc,
    DueAtDesc,
    CreatedAtAsc,
    CreatedAtDesc,
    PriorityDesc,
}

#[derive(InputObject, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub priority: Option<Priority>,
    pub tag: Option<String>,
    pub due_before: Option<DateTime<Utc>>,
    pub due_after: Option<DateTime<Utc>>,
    /// Case-insensitive substring of the title or description.
    pub search: Option<String>,
}

#[derive(SimpleObject)]
pub struct Task {
    pub id: ID,
    pub title: String,
    pub description: Option<String>,
    pub status: TaskStatus,
    pub priority: Priority,
    pub due_at: Option<DateTime<Utc>>,
    pub timezone: String,
    pub recurrence: Option<String>,
    pub remind_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub recurrence_parent_id: Option<ID>,
    pub occurrence: Option<i32>,
}

impl From<store::TaskRow> for Task {
    fn from(r: store::TaskRow) -> Self {
        Task {
            id: ID(r.id.to_string()),
            title: r.title,
            description: r.description,
            status: if r.status == "completed" { TaskStatus::Completed } else { TaskStatus::Open },
            priority: Priority::from_rank(r.priority),
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

#[derive(SimpleObject)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub has_previous_page: bool,
    pub start_cursor: Option<String>,
    pub end_cursor: Option<String>,
}

#[derive(SimpleObject)]
pub struct TaskEdge {
    pub cursor: String,
    pub node: Task,
}

#[derive(SimpleObject)]
pub struct TaskConnection {
    pub edges: Vec<TaskEdge>,
    pub page_info: PageInfo,
}

#[derive(SimpleObject)]
pub struct TaskEvent {
    pub event_id: ID,
    #[graphql(name = "type")]
    pub kind: String,
    pub version: i32,
    pub occurred_at: DateTime<Utc>,
    pub data: Json<serde_json::Value>,
    pub correlation_id: Option<String>,
}

#[derive(SimpleObject)]
pub struct TaskEventEdge {
    pub cursor: String,
    pub node: TaskEvent,
}

#[derive(SimpleObject)]
pub struct TaskEventConnection {
    pub edges: Vec<TaskEventEdge>,
    pub page_info: PageInfo,
}

#[derive(SimpleObject)]
pub struct TaskStats {
    pub total: i32,
    pub open: i32,
    pub completed: i32,
    pub overdue: i32,
    pub completion_rate: f64,
    pub avg_completion_seconds: Option<f64>,
}

#[derive(SimpleObject)]
pub struct PartitionStatus {
    pub partition: i32,
    pub offset: i64,
    pub high_watermark: i64,
}

#[derive(SimpleObject)]
pub struct ProjectionStatus {
    pub name: String,
    pub state: String,
    pub lag: i64,
    pub partitions: Vec<PartitionStatus>,
}

/// What every resolver needs.
pub struct QueryContext {
    pub pool: sqlx::PgPool,
    pub topic: String,
    pub watermarks: std::sync::Arc<dyn Watermarks>,
}

pub const MAX_PAGE: i32 = 200;

fn page_size(first: i32) -> async_graphql::Result<i64> {
    if !(0..=MAX_PAGE).contains(&first) {
        return Err(async_graphql::Error::new(format!("`first` must be between 0 and {MAX_PAGE}")));
    }
    Ok(i64::from(first))
}

fn internal(e: impl std::fmt::Display) -> async_graphql::Error {
    tracing::error!(error.message = %e, "query failed");
    async_graphql::Error::new("internal error; it has been logged")
}

fn parse_id(id: &ID) -> Option<Uuid> {
    Uuid::parse_str(id.as_str()).ok()
}

pub struct Query;

#[Object]
impl Query {
    /// One of the caller's tasks; `null` when it does not exist, was deleted, or is someone else's.
    async fn task(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Task>> {
        let (qc, user) = (ctx.data::<QueryContext>()?, ctx.data::<UserId>()?);
        let Some(id) = parse_id(&id) else { return Ok(None) };
        Ok(store::task(&qc.pool, user, id).await.map_err(internal)?.map(Task::from))
    }

    /// The caller's tasks, filtered, ordered and paginated (Relay cursors).
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        filter: Option<TaskFilter>,
        #[graphql(default)] order_by: TaskOrder,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<TaskConnection> {
        let (qc, user) = (ctx.data::<QueryContext>()?, ctx.data::<UserId>()?);
        let limit = page_size(first)?;
        let after = after.map(|c| TaskCursor::decode(&c, order_by)).transpose()?;
        let f = filter.unwrap_or_default();
        let sql_filter = TaskFilterSql {
            status: f.status.map(|s| if s == TaskStatus::Completed { "completed" } else { "open" }),
            priority: f.priority.map(Priority::rank),
            tag: f.tag,
            due_before: f.due_before,
            due_after: f.due_after,
            search: f.search,
        };
        let mut rows = store::tasks(&qc.pool, user, order_by, &sql_filter, after.as_ref(), limit + 1).await.map_err(internal)?;
        let has_next_page = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let edges: Vec<TaskEdge> = rows
            .into_iter()
            .map(|(r, key)| TaskEdge { cursor: TaskCursor { order: order_by, k0: key.0, k1: key.1, id: r.id }.encode(), node: r.into() })
            .collect();
        Ok(TaskConnection {
            page_info: PageInfo {
                has_next_page,
                has_previous_page: after.is_some(),
                start_cursor: edges.first().map(|e| e.cursor.clone()),
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }

    /// Every event of one of the caller's tasks, oldest first (kept after deletion).
    async fn task_history(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<TaskEventConnection> {
        let (qc, user) = (ctx.data::<QueryContext>()?, ctx.data::<UserId>()?);
        let limit = page_size(first)?;
        let after = after.map(|c| HistoryCursor::decode(&c)).transpose()?;
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
        Ok(TaskEventConnection {
            page_info: PageInfo {
                has_next_page,
                has_previous_page: after.is_some(),
                start_cursor: edges.first().map(|e| e.cursor.clone()),
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }

    /// Counts over the caller's tasks.
    async fn stats(&self, ctx: &Context<'_>) -> async_graphql::Result<TaskStats> {
        let (qc, user) = (ctx.data::<QueryContext>()?, ctx.data::<UserId>()?);
        let s = store::stats(&qc.pool, user).await.map_err(internal)?;
        let clamp = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(TaskStats {
            total: clamp(s.total),
            open: clamp(s.open),
            completed: clamp(s.completed),
            overdue: clamp(s.overdue),
            completion_rate: if s.total == 0 { 0.0 } else { s.completed as f64 / s.total as f64 },
            avg_completion_seconds: s.avg_completion_seconds,
        })
    }

    /// Each projection's position in the log and how far behind it is.
    async fn projections(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ProjectionStatus>> {
        let qc = ctx.data::<QueryContext>()?;
        let offsets = store::projection_offsets(&qc.pool, &qc.topic).await.map_err(internal)?;
        let mut partitions: Vec<i32> = offsets.iter().map(|o| o.1).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let highs = match qc.watermarks.high_watermarks(&qc.topic, &partitions).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error.message = %e, "high watermarks unavailable; reporting stored offsets only");
                Default::default()
            }
        };
        let mut out: Vec<ProjectionStatus> = platform::projections::PROJECTIONS
            .iter()
            .map(|n| ProjectionStatus { name: (*n).to_owned(), state: "live".into(), lag: 0, partitions: Vec::new() })
            .collect();
        for (name, partition, offset) in offsets {
            let high_watermark = highs.get(&partition).copied().unwrap_or(offset).max(offset);
            let idx = match out.iter().position(|p| p.name == name) {
                Some(i) => i,
                None => {
                    out.push(ProjectionStatus { name: name.clone(), state: "live".into(), lag: 0, partitions: Vec::new() });
                    out.len() - 1
                }
            };
            out[idx].lag += high_watermark - offset;
            out[idx].partitions.push(PartitionStatus { partition, offset, high_watermark });
        }
        Ok(out)
    }
}
