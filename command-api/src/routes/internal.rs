//! Routes of the service identity only (the projector's reactions); to users they do not exist.

use axum::extract::State;
use axum::response::Response;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::ToSchema;

use domain::CommandKind;

use crate::command::{submit, task_command};
use crate::error::ApiError;
use crate::extract::{CommandHeaders, CommandRoute, JsonBody, ServiceCaller, TaskPath};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/internal/v1/tasks/{id}/remind", axum::routing::post(fire_reminder))
}

/// FireReminder (service identity only).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FireReminderRequest {
    pub remind_at: DateTime<Utc>,
}

/// Fire the reminder due at `remind_at` (internal: the projector's scheduler, with the service
/// identity; to users this path does not exist).
pub async fn fire_reminder(
    State(state): State<AppState>,
    ServiceCaller(caller): ServiceCaller,
    TaskPath(task_id): TaskPath,
    route: CommandRoute,
    headers: CommandHeaders,
    body: JsonBody<FireReminderRequest>,
) -> Result<Response, ApiError> {
    let digest = route.digest(headers.if_match, &body.canonical);
    let cmd = task_command(&caller, &headers, task_id, CommandKind::FireReminder { remind_at: body.value.remind_at });
    submit(&state, caller, headers, digest, cmd).await
}
