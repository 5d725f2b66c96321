//! The document of `GET /v1/me/export` (GDPR data portability), defined once for the query API,
//! which writes it, and the command API, which relays it and describes it in its OpenAPI document
//! (`utoipa::ToSchema`; the schemas keep these type names).
//!
//! The query API streams [`Export`] key by key rather than serializing it whole (a user's rows do
//! not all fit in memory at once), so [`Export`] is its schema; its parts are serialized as they
//! are: [`ExportedTask`] from a [`TaskRow`], the others straight from SQL (`sqlx::FromRow`).
//!
//! On these types a doc comment is the schema's `description` in the OpenAPI document; only
//! [`Export`] has one, the others are described by the fields that hold them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::readmodel::TaskRow;

/// Everything taskstream holds about you, as of `exported_at`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Export {
    pub user_id: String,
    /// When the snapshot was taken.
    pub exported_at: DateTime<Utc>,
    /// Your tasks, oldest first. Deleted tasks are not here; their events are in `history`.
    pub tasks: Vec<ExportedTask>,
    /// Every event of your tasks (deleted ones included), by task and version.
    pub history: Vec<ExportedEvent>,
    /// Your notifications, oldest first.
    pub notifications: Vec<ExportedNotification>,
    /// Your registered webhook (never its signing secret), or null.
    pub webhook: Option<ExportedWebhook>,
}

// A task as the `tasks` read model holds it: what GraphQL's `Task` shows, in snake_case, plus
// `remind_before`; not the owner (`user_id`) nor the projector's bookkeeping (`reminded_for`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ExportedTask {
    pub id: Uuid,
    pub title: String,
    pub description: Option<String>,
    /// `open` or `completed`.
    pub status: String,
    /// `low`, `medium`, `high` or `urgent`.
    pub priority: &'static str,
    pub due_at: Option<DateTime<Utc>>,
    pub timezone: String,
    pub recurrence: Option<String>,
    /// ISO 8601 duration, as given.
    pub remind_before: Option<String>,
    pub remind_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub recurrence_parent_id: Option<Uuid>,
    pub occurrence: Option<i32>,
}

impl From<TaskRow> for ExportedTask {
    fn from(r: TaskRow) -> Self {
        ExportedTask {
            priority: r.priority().as_str(),
            id: r.id,
            title: r.title,
            description: r.description,
            status: r.status,
            due_at: r.due_at,
            timezone: r.timezone,
            recurrence: r.recurrence,
            remind_before: r.remind_before,
            remind_at: r.remind_at,
            tags: r.tags,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
            completed_at: r.completed_at,
            recurrence_parent_id: r.recurrence_parent_id,
            occurrence: r.occurrence,
        }
    }
}

// One event of one of the user's tasks: a row of `task_history`.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct ExportedEvent {
    pub task_id: Uuid,
    pub event_id: Uuid,
    /// The event type, e.g. `task.created`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The task's version this event produced.
    pub version: i32,
    pub occurred_at: DateTime<Utc>,
    /// The event's data (see `/v1/asyncapi.json`).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub correlation_id: Option<String>,
}

// One of the user's notifications, with when it was read (`notification_reads`); GraphQL's
// notification rows are read into it too.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct ExportedNotification {
    pub id: Uuid,
    pub task_id: Uuid,
    pub kind: String,
    pub message: String,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
}

// The registered webhook, without its signing secret.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct ExportedWebhook {
    pub url: String,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_is_exported_with_its_priority_and_status_by_name() {
        let t = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        let row = TaskRow {
            id: Uuid::nil(),
            user_id: "alice".into(),
            title: "t".into(),
            description: None,
            status: "completed".into(),
            priority: 3,
            due_at: None,
            timezone: "UTC".into(),
            recurrence: None,
            remind_before: None,
            remind_at: None,
            tags: vec!["a".into()],
            version: 2,
            created_at: t,
            updated_at: t,
            completed_at: Some(t),
            recurrence_parent_id: None,
            occurrence: None,
            reminded_for: None,
        };
        let v = serde_json::to_value(ExportedTask::from(row)).unwrap();
        assert_eq!(
            (v["priority"].as_str(), v["status"].as_str(), v["completed_at"].as_str()),
            (Some("urgent"), Some("completed"), Some("2026-01-01T00:00:00Z"))
        );
        assert!(v.get("user_id").is_none() && v.get("reminded_for").is_none(), "{v}");
    }
}
