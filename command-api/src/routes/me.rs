//! `GET /v1/me/export`: all of the caller's data (tasks, history, notifications, webhook) as one JSON
//! document, for data portability. The read models are the query API's, so the request is relayed
//! there (`crate::query_api`) once the token is checked here; the document's shape is the query
//! API's (`query_api::export`), described below for the OpenAPI document only.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::openapi::ReadProblems;
use crate::error::ApiError;
use crate::extract::AuthUser;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(export))
}

/// `X-Consistency-Token`, which the export honours like a query.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ConsistencyToken {
    /// The `position` of a command's answer: the export waits (a few seconds at most, then 503)
    /// until the read models hold that command's events.
    #[param(rename = "X-Consistency-Token", nullable = false, min_length = 1, max_length = 256, pattern = "^[!-~]+$")]
    pub token: Option<String>,
}

/// Everything taskstream holds about you, as of `exported_at`.
#[derive(Serialize, ToSchema)]
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

#[derive(Serialize, ToSchema)]
pub struct ExportedTask {
    pub id: Uuid,
    pub title: String,
    pub description: Option<String>,
    /// `open` or `completed`.
    pub status: String,
    /// `low`, `medium`, `high` or `urgent`.
    pub priority: String,
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

#[derive(Serialize, ToSchema)]
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

#[derive(Serialize, ToSchema)]
pub struct ExportedNotification {
    pub id: Uuid,
    pub task_id: Uuid,
    pub kind: String,
    pub message: String,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct ExportedWebhook {
    pub url: String,
    pub updated_at: DateTime<Utc>,
}

/// Export all of your data (GDPR data portability).
///
/// One JSON document, downloaded as `taskstream-export-<user>.json` and streamed as it is read
/// from one snapshot of the read models; a failure mid-way closes the connection before the
/// document ends, so an incomplete export never parses.
#[utoipa::path(
    get, path = "/v1/me/export", tag = "me",
    params(ConsistencyToken),
    responses(
        (status = 200, description = "Your data", body = Export,
         headers(("Content-Disposition" = String, description = "`attachment; filename=\"taskstream-export-<user>.json\"`"))),
        ReadProblems,
    ),
    security(("bearer" = []))
)]
pub async fn export(State(state): State<AppState>, _caller: AuthUser, headers: HeaderMap) -> Result<Response, ApiError> {
    state.query_api.relay_get("/v1/me/export", &headers).await
}
