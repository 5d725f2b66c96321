//! `GET /v1/me/export`: all of the caller's data (tasks, history, notifications, webhook) as one JSON
//! document, for data portability. The read models are the query API's, so the request is relayed
//! there (`crate::query_api`) once the token is checked here; the document's types, which the
//! OpenAPI document describes, are `platform::export`'s, the ones the query API writes.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use platform::export::Export;

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
