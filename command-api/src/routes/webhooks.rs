//! `PUT /v1/webhook`, `DELETE /v1/webhook`: the caller's webhook registration (user-level commands).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use domain::user::{UserCommand, UserCommandKind, WebhookUrl};
use domain::AnyCommand;

use super::openapi::{CommandProblems, IdempotencyKey, JsonBodyProblems};
use crate::command::submit;
use crate::error::{ApiError, Problem};
use crate::extract::{AuthUser, CommandHeaders, CommandRoute, JsonBody};
use crate::state::AppState;

/// How long registration waits for the webhook host to resolve.
const DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(set_webhook, remove_webhook))
}

/// SetWebhook.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetWebhookRequest {
    /// Where reminders are POSTed: an absolute https (or http) URL on a public address.
    pub url: Option<String>,
    /// HMAC-SHA256 signing secret (16..=256 characters); generated and returned once when absent.
    pub secret: Option<String>,
}

/// The answer to SetWebhook and RemoveWebhook (for the OpenAPI document; `crate::command` writes it).
#[derive(Serialize, ToSchema)]
pub struct WebhookResponse {
    pub webhook_id: Uuid,
    /// The version of your user stream after the command.
    pub version: u32,
    /// Opaque consistency token: send it as `X-Consistency-Token` to the query API.
    pub position: String,
    /// The signing secret, only when SetWebhook generated it (it is never shown again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Register (or replace) your webhook.
#[utoipa::path(
    put, path = "/v1/webhook", tag = "webhooks",
    request_body = SetWebhookRequest,
    params(IdempotencyKey),
    responses(
        (status = 200, description = "Registered; the answer carries `secret` when it was generated", body = WebhookResponse),
        JsonBodyProblems, CommandProblems,
    ),
    security(("bearer" = []))
)]
pub async fn set_webhook(
    State(state): State<AppState>,
    caller: AuthUser,
    route: CommandRoute,
    headers: CommandHeaders,
    body: JsonBody<SetWebhookRequest>,
) -> Result<Response, ApiError> {
    let digest = route.digest(None, &body.canonical);
    let req = body.value;
    let raw = req.url.ok_or_else(|| ApiError::validation("url", "is required"))?;
    let url = WebhookUrl::parse(raw, state.allow_private_webhooks).map_err(|e| ApiError::validation("url", e.0))?;
    if !state.allow_private_webhooks {
        platform::webhook::resolve(url.as_ref(), false, DNS_TIMEOUT).await.map_err(|m| ApiError::validation("url", m))?;
    }
    let generated = req.secret.is_none();
    let secret = req.secret.unwrap_or_else(|| format!("whsec_{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple()));
    let cmd = AnyCommand::User(UserCommand { user: caller.0.clone(), kind: UserCommandKind::SetWebhook { url, secret } });
    let response = submit(&state, caller, headers, digest, cmd).await?;
    if generated {
        return Ok(response);
    }
    // A secret the client chose is not echoed back.
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("secret");
    }
    let mut res = (parts.status, axum::Json(v)).into_response();
    for (k, val) in parts.headers.iter() {
        if k != header::CONTENT_LENGTH {
            res.headers_mut().insert(k.clone(), val.clone());
        }
    }
    Ok(res)
}

/// Remove your webhook.
#[utoipa::path(
    delete, path = "/v1/webhook", tag = "webhooks",
    params(IdempotencyKey),
    responses(
        (status = 200, description = "Removed", body = WebhookResponse),
        (status = 404, description = "You have no webhook", body = Problem, content_type = "application/problem+json"),
        CommandProblems,
    ),
    security(("bearer" = []))
)]
pub async fn remove_webhook(State(state): State<AppState>, caller: AuthUser, route: CommandRoute, headers: CommandHeaders) -> Result<Response, ApiError> {
    let digest = route.digest(None, b"");
    let cmd = AnyCommand::User(UserCommand { user: caller.0.clone(), kind: UserCommandKind::RemoveWebhook });
    submit(&state, caller, headers, digest, cmd).await
}
