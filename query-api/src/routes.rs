//! HTTP: `POST /graphql` and `GET /graphql?query=..` (authenticated queries, optionally as of a
//! consistency token; either may name a persisted query by its hash instead, see `apq`), `GET
//! /graphql` without a query (GraphiQL, with its assets under `/graphiql/assets/`), `GET
//! /v1/me/export` (the caller's data as one JSON document, see `export`; errors as problem+json),
//! `/healthz`, `/readyz`, `/metrics`. Both GraphQL and the export authenticate and spend the request
//! budgets ([`authenticate`]) and wait for a consistency token ([`wait_for_token`]) the same way.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::extensions::apollo_persisted_queries::ApolloPersistedQueries;
use async_graphql::parser::types::Selection;
use async_graphql::{EmptyMutation, Schema};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Query as UrlQuery, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::Extensions;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sqlx::PgPool;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use domain::UserId;
use platform::auth::JwtAuth;
use platform::db::Migrations;
use platform::position::Position;
use platform::ratelimit::{RateLimiter, RateLimits};

use crate::apq::{ParsedDocuments, PersistedQueries, PersistedQueryCodes};
use crate::cost::{CostLimit, CostLimits};
use crate::error::ApiError;
use crate::export::Exports;
use crate::live::{Hub, LiveContext, Subscription};
use crate::progress::ProgressTracker;
use crate::schema::{Query, QueryContext};
use crate::watermarks::Watermarks;
use crate::ws::{Connections, LiveLimits};

/// The whole GraphQL schema: the queries (`schema.rs`) and the subscriptions (`live.rs`).
pub type TaskSchema = Schema<Query, EmptyMutation, Subscription>;

/// The header that makes a query wait for a command's position.
pub const CONSISTENCY_HEADER: &str = "x-consistency-token";

/// Limits of a query API; `Default` is the settings' defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest wait for the projections to reach an `X-Consistency-Token`.
    pub consistency_wait: Duration,
    pub max_depth: usize,
    /// Largest cost of a query (`cost.rs`: fields, list sizes multiplied).
    pub max_complexity: usize,
    /// Most aliases in one document.
    pub max_aliases: usize,
    /// Most root fields in one operation.
    pub max_root_fields: usize,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    /// Limits of WebSocket connections.
    pub live: LiveLimits,
    /// Request rates per user and per client address.
    pub rate: RateLimits,
    /// Estimated memory of the automatic persisted queries' documents (0: APQ turned off).
    pub persisted_queries_bytes: u64,
}

impl Limits {
    pub fn cost(&self) -> CostLimits {
        CostLimits { max_cost: self.max_complexity, max_aliases: self.max_aliases, max_root_fields: self.max_root_fields }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            consistency_wait: Duration::from_millis(5_000),
            max_depth: 12,
            max_complexity: 5_000,
            max_aliases: 30,
            max_root_fields: 20,
            request_timeout: Duration::from_millis(10_000),
            max_body_bytes: 256 * 1024,
            live: LiveLimits::default(),
            rate: RateLimits::default(),
            persisted_queries_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Depth limit of documents that only introspect the schema (`__schema`, `__type`): GraphiQL's
/// introspection query nests `ofType` to depth 13, deeper than any data query here can go (4) and
/// than the default limit (12) meant for data. Introspection is answered from the schema in memory.
pub const INTROSPECTION_MIN_DEPTH: usize = 16;

/// Estimated memory of the documents kept parsed by their text ([`ParsedDocuments`]): a typical
/// document weighs a few KiB, so thousands of distinct documents fit.
const PARSED_DOCUMENTS_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    schema: TaskSchema,
    /// The same schema with the introspection depth limit.
    introspection: TaskSchema,
    auth: JwtAuth,
    pool: PgPool,
    progress: ProgressTracker,
    limits: Arc<Limits>,
    hub: Hub,
    /// Open WebSocket connections per user.
    connections: Connections,
    rate_limiter: RateLimiter,
    /// Automatic persisted queries' documents (`None`: turned off).
    persisted: Option<PersistedQueries>,
    /// Documents sent in full, kept parsed by their text.
    documents: ParsedDocuments,
    /// The start-up migrations: until they are applied, GraphQL answers 503 (NOT_READY).
    migrations: Migrations,
    /// The slots of the exports running at once.
    exports: Exports,
}

impl AppState {
    /// The state of a query API over `pool`. The topic whose positions consistency tokens name is
    /// the tracker's; start the tracker with [`ProgressTracker::spawn`] (or feed it otherwise).
    pub fn new(pool: PgPool, auth: JwtAuth, progress: ProgressTracker, watermarks: Arc<dyn Watermarks>, limits: Limits) -> Self {
        let hub = Hub::default();
        let persisted = (limits.persisted_queries_bytes > 0).then(|| PersistedQueries::new(limits.persisted_queries_bytes));
        let build = |depth: usize| {
            let schema = TaskSchema::build(Query, EmptyMutation, Subscription)
                .data(QueryContext { pool: pool.clone(), topic: progress.topic().to_owned(), watermarks: watermarks.clone() })
                .data(LiveContext { pool: pool.clone(), hub: hub.clone() })
                .limit_depth(depth)
                .extension(CostLimit(limits.cost()));
            match &persisted {
                // Both schemas share the documents.
                Some(p) => schema.extension(PersistedQueryCodes).extension(ApolloPersistedQueries::new(p.clone())).finish(),
                None => schema.finish(),
            }
        };
        let (schema, introspection) = (build(limits.max_depth), build(limits.max_depth.max(INTROSPECTION_MIN_DEPTH)));
        Self {
            schema,
            introspection,
            auth,
            pool,
            progress,
            rate_limiter: RateLimiter::new(limits.rate, "graphql_rate_limited_total"),
            persisted,
            documents: ParsedDocuments::new(PARSED_DOCUMENTS_BYTES),
            limits: Arc::new(limits),
            hub,
            connections: Connections::default(),
            migrations: Migrations::already_applied(),
            exports: Exports::default(),
        }
    }

    /// Serves GraphQL only once `migrations` are applied (by default the database is taken as
    /// migrated already).
    pub fn with_migrations(self, migrations: Migrations) -> Self {
        Self { migrations, ..self }
    }

    /// 503 until the read models can be queried.
    fn check_started(&self) -> Result<(), ApiError> {
        if self.migrations.is_applied() {
            Ok(())
        } else {
            Err(ApiError::NotReady)
        }
    }

    /// The fan-out of committed changes to subscriptions; start it with [`Hub::spawn`].
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn schema(&self) -> &TaskSchema {
        &self.schema
    }
}

/// The full router; tests drive it with `tower::ServiceExt::oneshot`.
pub fn router(state: AppState) -> Router {
    let limits = state.limits.clone();
    Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .merge(crate::graphiql::routes())
        .route("/graphql/ws", get(graphql_ws))
        .route("/v1/me/export", get(export))
        .route("/healthz", get(platform::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(platform::http::metrics))
        .with_state(state)
        // `Bytes` honours the same limit, answering 413 when a body without a length runs over.
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, limits.request_timeout))
        .layer(TraceLayer::new_for_http())
}

/// WebSocket subscriptions (`graphql-transport-ws` or `graphql-ws`, with the limits of `ws.rs`);
/// the token goes in the `connection_init` payload as `{"Authorization": "Bearer <token>"}` (or
/// `{"token": "<token>"}`).
async fn graphql_ws(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    if let Err(e) = state.check_started() {
        return e.into_response();
    }
    let (schema, auth, limits, connections) = (state.schema.clone(), state.auth.clone(), state.limits.live, state.connections.clone());
    upgrade
        .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(limits.max_message_bytes.saturating_mul(2))
        .on_upgrade(move |socket| crate::ws::serve(socket, schema, auth, limits, connections))
}

/// `POST /graphql`: a GraphQL request as JSON (`{"query", "variables", "operationName", "extensions"}`).
async fn graphql_post(State(state): State<AppState>, extensions: Extensions, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let max_body_bytes = state.limits.max_body_bytes;
    serve(&state, &extensions, &headers, move || request_from_body(body, max_body_bytes)).await
}

/// The parameters of a GraphQL request over GET, as GraphQL-over-HTTP and the persisted-query
/// protocol spell them (`variables` and `extensions` are JSON).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct GetParams {
    query: Option<String>,
    operation_name: Option<String>,
    variables: Option<String>,
    extensions: Option<String>,
}

/// `GET /graphql`: with `query` or `extensions` (a persisted query's hash) a GraphQL request,
/// otherwise the GraphiQL page.
async fn graphql_get(State(state): State<AppState>, extensions: Extensions, headers: HeaderMap, uri: Uri) -> Response {
    let params = UrlQuery::<GetParams>::try_from_uri(&uri).map(|UrlQuery(p)| p).map_err(|e| ApiError::BadRequest(e.body_text()));
    if matches!(&params, Ok(p) if p.query.is_none() && p.extensions.is_none()) {
        return crate::graphiql::page();
    }
    serve(&state, &extensions, &headers, move || request_from_params(params?)).await
}

fn request_from_body(body: Result<Bytes, BytesRejection>, max_body_bytes: usize) -> Result<async_graphql::Request, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(max_body_bytes),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("the body is not a GraphQL request ({{\"query\": ..., \"variables\": ...}}): {e}")))
}

fn request_from_params(params: GetParams) -> Result<async_graphql::Request, ApiError> {
    let mut request = async_graphql::Request::new(params.query.unwrap_or_default());
    request.operation_name = params.operation_name;
    if let Some(variables) = params.variables {
        let json = serde_json::from_str(&variables).map_err(|e| ApiError::BadRequest(format!("the variables parameter is not JSON: {e}")))?;
        request.variables = async_graphql::Variables::from_json(json);
    }
    if let Some(extensions) = params.extensions {
        request.extensions =
            serde_json::from_str(&extensions).map_err(|e| ApiError::BadRequest(format!("the extensions parameter is not a JSON object: {e}")))?;
    }
    Ok(request)
}

/// Executes a GraphQL request, however it came (`request` is parsed once the caller is known and
/// within their budget), and answers it, counted in `graphql_requests_total`.
#[tracing::instrument(name = "graphql", skip_all, fields(user = tracing::field::Empty, result = tracing::field::Empty))]
async fn serve(state: &AppState, extensions: &Extensions, headers: &HeaderMap, request: impl FnOnce() -> Result<async_graphql::Request, ApiError>) -> Response {
    let started = Instant::now();
    let address = extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let (result, response) = match execute(state, address, headers, request).await {
        Ok(res) => {
            let result = if res.is_ok() { "ok" } else { "error" };
            let body = serde_json::to_vec(&res).unwrap_or_else(|_| br#"{"errors":[{"message":"internal error"}]}"#.to_vec());
            (result, ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response())
        }
        Err(e) => {
            tracing::debug!(error.message = %e, "request refused");
            (e.code(), e.into_response())
        }
    };
    tracing::Span::current().record("result", result);
    metrics::counter!("graphql_requests_total", "result" => result).increment(1);
    metrics::histogram!("graphql_request_duration_seconds").record(started.elapsed().as_secs_f64());
    response
}

async fn execute(
    state: &AppState,
    address: Option<IpAddr>,
    headers: &HeaderMap,
    request: impl FnOnce() -> Result<async_graphql::Request, ApiError>,
) -> Result<async_graphql::Response, ApiError> {
    let user = authenticate(state, address, headers)?;
    tracing::Span::current().record("user", user.as_ref());
    let mut request = request()?;
    wait_for_token(state, headers).await?;
    state.documents.parse(&mut request).await;
    let schema = if introspection_only(&mut request, state.persisted.as_ref()).await { &state.introspection } else { &state.schema };
    Ok(schema.execute(request.data(user)).await)
}

/// What every request on the read models goes through first: started, a valid token (without one,
/// the client address's budget is spent), the user's budget. Returns the caller.
fn authenticate(state: &AppState, address: Option<IpAddr>, headers: &HeaderMap) -> Result<UserId, ApiError> {
    state.check_started()?;
    // A header that is not visible ASCII cannot be a valid bearer token.
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    // Without a valid token the budget is the client address's; with one, the user's.
    let user = match state.auth.authenticate(authorization) {
        Ok(user) => user,
        Err(e) => {
            state.rate_limiter.check_address(address)?;
            return Err(e.into());
        }
    };
    state.rate_limiter.check_user(&user)?;
    Ok(user)
}

/// Waits until the projections have applied the position of `X-Consistency-Token`, if there is one.
async fn wait_for_token(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(token) = headers.get(CONSISTENCY_HEADER) {
        let position = token.to_str().ok().and_then(|t| Position::from_token(t).ok()).ok_or(ApiError::BadConsistencyToken)?;
        state.progress.wait_for(position, state.limits.consistency_wait).await?;
    }
    Ok(())
}

/// `GET /v1/me/export`: all of the caller's data (tasks, history, notifications, webhook) as one JSON
/// document, downloaded as `taskstream-export-<user>.json` (see `export`). Honours
/// `X-Consistency-Token` like GraphQL; errors are problem+json.
#[tracing::instrument(name = "export", skip_all, fields(user = tracing::field::Empty))]
async fn export(State(state): State<AppState>, extensions: Extensions, headers: HeaderMap) -> Response {
    let address = extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let started = async {
        let user = authenticate(&state, address, &headers)?;
        tracing::Span::current().record("user", user.as_ref());
        wait_for_token(&state, &headers).await?;
        let slot = state.exports.try_slot().ok_or(ApiError::Busy("too many exports are running; try again shortly"))?;
        let file = crate::export::file_name(&user);
        let body = crate::export::begin(&state.pool, user, slot).await.map_err(ApiError::database)?;
        Ok::<_, ApiError>((file, body))
    };
    match started.await {
        Ok((file, body)) => {
            let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")).unwrap_or(HeaderValue::from_static("attachment"));
            let headers = [
                (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (header::CONTENT_DISPOSITION, disposition),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ];
            (headers, body).into_response()
        }
        Err(e) => {
            tracing::debug!(error.message = %e, "export refused");
            e.into_problem()
        }
    }
}

/// Whether every operation of the document (sent, or persisted and named by its hash) selects only
/// introspection fields at its root. (A sent document is already parsed in the request, see
/// [`ParsedDocuments::parse`].)
async fn introspection_only(request: &mut async_graphql::Request, persisted: Option<&PersistedQueries>) -> bool {
    let persisted_doc = match persisted {
        Some(p) if request.query.is_empty() => p.document_of(request).await,
        _ => None,
    };
    let doc = match &persisted_doc {
        Some(doc) => doc,
        None => match request.parsed_query() {
            Ok(doc) => doc,
            Err(_) => return false,
        },
    };
    doc.operations.iter().all(|(_, op)| {
        op.node.selection_set.node.items.iter().all(|item| match &item.node {
            Selection::Field(f) => matches!(f.node.name.node.as_str(), "__schema" | "__type" | "__typename"),
            Selection::FragmentSpread(_) | Selection::InlineFragment(_) => false,
        })
    })
}

/// 200 when the start-up migrations are done, PostgreSQL answers and every migration is applied;
/// 503 with the reason otherwise.
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    if let Some(reason) = state.migrations.pending_reason() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}"));
    }
    let (status, text) = match tokio::time::timeout(Duration::from_secs(3), crate::store::is_ready(&state.pool)).await {
        Ok(Ok(true)) => (StatusCode::OK, "ready"),
        Ok(Ok(false)) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: migrations are pending"),
        Ok(Err(e)) => {
            tracing::warn!(error.message = %e, "readiness: PostgreSQL unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: PostgreSQL is unavailable")
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: PostgreSQL did not answer in time"),
    };
    (status, text.to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    struct NoWatermarks;

    #[async_trait::async_trait]
    impl Watermarks for NoWatermarks {
        async fn high_watermarks(&self, _topic: &str, _partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>> {
            Ok(HashMap::new())
        }
    }

    /// A query API started while PostgreSQL is unreachable (nothing listens on port 1).
    fn started_without_postgres() -> Router {
        let pool =
            sqlx::postgres::PgPoolOptions::new().acquire_timeout(Duration::from_millis(500)).connect_lazy("postgres://postgres@127.0.0.1:1/none").unwrap();
        let tokens = test_support::Tokens::default();
        let state = AppState::new(pool.clone(), tokens.auth(), ProgressTracker::new("task-events"), Arc::new(NoWatermarks), Limits::default())
            .with_migrations(Migrations::in_background(pool));
        router(state)
    }

    async fn send(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let res = router.clone().oneshot(request).await.unwrap();
        let (parts, body) = res.into_parts();
        (parts.status, parts.headers, String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned())
    }

    #[tokio::test]
    async fn before_postgres_is_reached_health_is_200_and_readiness_and_queries_503() {
        let app = started_without_postgres();
        let (status, _, _) = send(&app, Request::get("/healthz").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, reason) = send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(reason.starts_with("not ready: ") && reason.contains("migrations"), "{reason}");
        let query = Request::post("/graphql")
            .header(header::AUTHORIZATION, test_support::Tokens::default().bearer("alice"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"query": "{ stats { total } }"}"#))
            .unwrap();
        let (status, headers, body) = send(&app, query).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(headers.contains_key(header::RETRY_AFTER));
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["errors"][0]["extensions"]["code"], "NOT_READY", "{body}");
        assert!(body["errors"][0]["message"].as_str().unwrap().contains("PostgreSQL"), "{body}");
    }
}
