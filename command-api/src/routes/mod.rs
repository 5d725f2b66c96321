//! The HTTP surface, by resource: each module parses its requests into domain commands (`me`
//! relays its one read to the query API) and has its own `router()`; this module puts them
//! together with the operational routes (health, readiness, metrics, the OpenAPI document) and the
//! shared layers (rate limits on the API routes, body limit, timeout, problem+json fallbacks).
//! `openapi` holds what the resource modules' OpenAPI annotations share (command headers,
//! problem+json answer sets).

pub mod erasure;
pub mod internal;
pub mod me;
pub mod notifications;
pub mod openapi;
pub mod tasks;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::error::ApiError;
use crate::extract::BODY_LIMIT_BYTES;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "taskstream command API", description = "Commands on tasks. Every success means the events are durable in Kafka."),
    modifiers(&BearerAuth),
    // Referenced by name from `openapi`'s answer sets (which do not collect schemas themselves).
    components(schemas(crate::error::Problem)),
    tags((name = "tasks", description = "Task commands"), (name = "notifications", description = "Notification read state"), (name = "webhooks", description = "Webhook registration"), (name = "me", description = "Your data: erasure (and export)"), (name = "cluster", description = "Which instance owns which partition"), (name = "catalogue", description = "The event catalogue (AsyncAPI)"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()));
    }
}

/// The full router; tests call it with `oneshot`.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let (api, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(tasks::router())
        .merge(notifications::router())
        .merge(webhooks::router())
        .merge(me::router())
        .merge(erasure::router())
        .routes(utoipa_axum::routes!(cluster))
        .split_for_parts();
    openapi::answer_rate_limited(&mut openapi);
    // The documents are outside the request budgets (like /v1/openapi.json), so they answer only 200.
    let (docs, docs_openapi) = OpenApiRouter::new().routes(utoipa_axum::routes!(asyncapi)).split_for_parts();
    openapi.merge(docs_openapi);
    let openapi = Arc::new(openapi);
    let budgets = (state.rate_limiter.clone(), state.auth.clone());
    api.merge(internal::router())
        // Command requests are kept as they arrived, to be forwarded to their partition's owner.
        .layer(middleware::from_fn(crate::extract::capture))
        // Outside `capture`: a request over its budget is refused before its body is read.
        .layer(middleware::from_fn_with_state(budgets, crate::ratelimit::limit))
        .route("/v1/openapi.json", get(move || async move { Json(openapi.as_ref().clone()) }))
        .merge(docs)
        .route("/healthz", get(platform::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(platform::http::metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(middleware::from_fn(move |req, next| time_limit(request_timeout, req, next)))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if !state.brokers.is_reachable() {
        (StatusCode::SERVICE_UNAVAILABLE, "the Kafka brokers do not answer").into_response()
    } else if let Some(reason) = state.cluster.not_ready_reason() {
        (StatusCode::SERVICE_UNAVAILABLE, reason).into_response()
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

/// Which command-API instance owns which partition of the log, and whether it is ready.
#[utoipa::path(
    get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "The owner of every partition as this instance knows it", body = crate::cluster::ClusterView))
)]
async fn cluster(State(state): State<AppState>) -> Json<crate::cluster::ClusterView> {
    Json(state.cluster.view())
}

/// The event catalogue: the AsyncAPI 3.0 document of the topics, with the JSON Schema of every
/// event type and version (`platform::catalogue`; also committed under `schemas/`). No token needed.
#[utoipa::path(
    get, path = "/v1/asyncapi.json", tag = "catalogue",
    responses((status = 200, description = "The AsyncAPI 3.0 document of the topics and every event type", content_type = "application/json", body = Object))
)]
async fn asyncapi(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.catalogue.as_ref().clone())
}

/// Bounds every request; one that takes longer is answered 503 problem+json with Retry-After, like
/// every other 503 (tower's timeout answers a bare status).
async fn time_limit(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => ApiError::Unavailable(format!("the request took longer than {} ms", limit.as_millis())).into_response(),
    }
}
