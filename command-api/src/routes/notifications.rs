//! `POST /v1/notifications/{id}/read`: notification read state (a user-level command).

use axum::extract::State;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use domain::user::{UserCommand, UserCommandKind};
use domain::AnyCommand;

use super::openapi::{CommandProblems, IdempotencyKey};
use crate::command::submit;
use crate::error::{ApiError, Problem};
use crate::extract::{AuthUser, CommandHeaders, CommandRoute, IdPath};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(mark_notification_read))
}

/// The answer to MarkNotificationRead (for the OpenAPI document; `crate::command` writes it).
#[derive(Serialize, ToSchema)]
pub struct NotificationReadResponse {
    pub notification_id: Uuid,
    /// The version of your user stream after the command.
    pub version: u32,
    /// Opaque consistency token: send it as `X-Consistency-Token` to the query API.
    pub position: String,
}

/// Mark one of your notifications as read.
#[utoipa::path(
    post, path = "/v1/notifications/{id}/read", tag = "notifications",
    params(("id" = Uuid, Path, description = "Notification id"), IdempotencyKey),
    responses(
        (status = 200, description = "Read; the event is durable in the log", body = NotificationReadResponse),
        (status = 404, description = "No such notification of yours (or not recorded yet: a reminder's notification is recorded a moment after it fires)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The notification is already read", body = Problem, content_type = "application/problem+json"),
        CommandProblems,
    ),
    security(("bearer" = []))
)]
pub async fn mark_notification_read(
    State(state): State<AppState>,
    caller: AuthUser,
    IdPath(id): IdPath,
    route: CommandRoute,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    let digest = route.digest(None, b"");
    let cmd = AnyCommand::User(UserCommand { user: caller.0.clone(), kind: UserCommandKind::MarkNotificationRead(id) });
    submit(&state, caller, headers, digest, cmd).await
}
