//! `DELETE /v1/me`: EraseUser, the right to be forgotten by crypto-shredding. The user's data keys
//! are listed (after reading the keys topic to its end), `user.erased` naming them is appended to
//! the user's stream, then the keys are destroyed (`platform::keys`). From then on every event
//! sealed with them is unreadable in the log (its offsets and order stay), the projector has
//! dropped the user's rows, the writers treat the user's tasks as gone, and the user's next command
//! starts a fresh identity with a new key. Operators erase a user with the service identity acting
//! for them (`projector erase-user USER`).

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
use crate::error::ApiError;
use crate::extract::{AuthUser, CommandHeaders, CommandRoute};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(erase_me))
}

/// The answer to EraseUser (for the OpenAPI document; `crate::command` writes it).
#[derive(Serialize, ToSchema)]
pub struct ErasureResponse {
    /// The same for every erasure of this user.
    pub erasure_id: Uuid,
    /// The version of your user stream after the erasure.
    pub version: u32,
    /// Opaque consistency token: with it as `X-Consistency-Token`, the query API answers once your
    /// data is gone from the read models.
    pub position: String,
}

/// Erase yourself: your data keys are destroyed, so everything you wrote becomes unreadable in the
/// log; the read models drop all of your data; your webhook stops. Your next command starts afresh.
#[utoipa::path(
    delete, path = "/v1/me", tag = "me",
    params(IdempotencyKey),
    responses(
        (status = 200, description = "Erased: the keys are destroyed and the erasure is in the log", body = ErasureResponse),
        CommandProblems,
    ),
    security(("bearer" = []))
)]
pub async fn erase_me(State(state): State<AppState>, caller: AuthUser, route: CommandRoute, headers: CommandHeaders) -> Result<Response, ApiError> {
    let digest = route.digest(None, b"");
    let user = caller.0.clone();
    // Every key another instance made is known once the keys topic is read to its end.
    state.keys.catch_up().await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let data_keys = state.keys.keys_of(user.as_ref());
    let cmd = AnyCommand::User(UserCommand { user: user.clone(), kind: UserCommandKind::Erase { data_keys: data_keys.clone() } });
    let answer = submit(&state, caller, headers, digest, cmd).await?;
    // The erasure is durable: now the keys go. If this fails the caller sends it again (an erasure
    // is always accepted), which destroys what is left.
    state.keys.destroy(&data_keys).await.map_err(|e| ApiError::Unavailable(format!("the erasure is recorded but its keys are not all destroyed yet: {e}")))?;
    tracing::info!(user = %user, data_keys = data_keys.len(), "user erased");
    Ok(answer)
}
