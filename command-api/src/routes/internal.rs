//! Routes of the service identity only (the projector's reactions); to users they do not exist.

use axum::extract::State;
use axum::response::Response;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use domain::user::{UserCommand, UserCommandKind};
use domain::{AnyCommand, CommandKind, TaskId};

use crate::command::{submit, task_command};
use crate::error::ApiError;
use crate::extract::{CommandHeaders, CommandRoute, IdPath, JsonBody, ServiceCaller, TaskPath};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/tasks/{id}/remind", axum::routing::post(fire_reminder))
        .route("/internal/v1/notifications/{id}", axum::routing::post(record_notification))
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

/// RecordNotification (service identity only).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordNotificationRequest {
    /// The task whose reminder fired.
    pub task_id: Uuid,
    /// The remind time of that reminder (`task.reminder_due`'s `remind_at`).
    pub remind_at: DateTime<Utc>,
}

/// Record in the acting user's stream that the notification `{id}` of a fired reminder exists
/// (internal: the projector's reaction to `task.reminder_due`, with the service identity). The user's
/// stream then decides MarkNotificationRead alone. `{id}` must be the reminder's derived id (422
/// otherwise); a second call for the same id is a 409.
pub async fn record_notification(
    State(state): State<AppState>,
    ServiceCaller(caller): ServiceCaller,
    IdPath(notification_id): IdPath,
    route: CommandRoute,
    headers: CommandHeaders,
    body: JsonBody<RecordNotificationRequest>,
) -> Result<Response, ApiError> {
    let digest = route.digest(None, &body.canonical);
    let RecordNotificationRequest { task_id, remind_at } = body.value;
    let kind = UserCommandKind::RecordNotification { notification_id, task_id: TaskId::from_uuid(task_id), remind_at };
    let cmd = AnyCommand::User(UserCommand { user: caller.0.clone(), kind });
    submit(&state, caller, headers, digest, cmd).await
}
