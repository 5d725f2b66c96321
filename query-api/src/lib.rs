//! taskstream query API: the read models over GraphQL (async-graphql on axum), with
//! read-your-writes consistency tokens.

pub mod cursor;
pub mod progress;
pub mod schema;
pub mod store;
pub mod watermarks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::http::GraphiQLSource;
use async_graphql::{EmptyMutation, EmptySubscription, Schema};
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use serde_json::json;
use sqlx::PgPool;
use tower_http::timeout::TimeoutLayer;

use platform::auth::JwtAuth;
use platform::position::Position;
use platform::settings::{AuthSettings, DatabaseSettings, KafkaSettings};

use crate::progress::ProgressTracker;
use crate::schema::{Query, QueryContext, TaskSchema};
use crate::watermarks::{KafkaWatermarks, Watermarks};

#[derive(Debug, Clone, Parser)]
#[command(name = "query-api", about = "taskstream query API (GraphQL)", version)]
pub struct Settings {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "QUERY_API_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    /// Longest wait for the projections to reach an `X-Consistency-Token`.
    #[arg(long, env = "CONSISTENCY_WAIT_MS", default_value_t = 5_000)]
    pub consistency_wait_ms: u64,
    #[arg(long, env = "GRAPHQL_MAX_DEPTH", default_value_t = 12)]
    pub graphql_max_depth: usize,
    #[arg(long, env = "GRAPHQL_MAX_COMPLEXITY", default_value_t = 500)]
    pub graphql_max_complexity: usize,
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
}

#[derive(Clone)]
pub struct AppState {
    pub schema: TaskSchema,
    pub auth: JwtAuth,
    pub pool: PgPool,
    pub progress: ProgressTracker,
    pub consistency_wait: Duration,
}

impl AppState {
    pub fn new(
        pool: PgPool,
        auth: JwtAuth,
        topic: &str,
        watermarks: Arc<dyn Watermarks>,
        progress: ProgressTracker,
        consistency_wait: Duration,
        limits: (usize, usize),
    ) -> Self {
        let schema = Schema::build(Query, EmptyMutation, EmptySubscription)
            .data(QueryContext { pool: pool.clone(), topic: topic.to_owned(), watermarks })
            .limit_depth(limits.0)
            .limit_complexity(limits.1)
            .finish();
        Self { schema, auth, pool, progress, consistency_wait }
    }
}

/// A GraphQL-shaped error answer with an HTTP status.
fn gql_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "errors": [{ "message": message, "extensions": { "code": code } }] }))).into_response()
}

async fn graphql(State(state): State<AppState>, headers: HeaderMap, req: GraphQLRequest) -> Response {
    let started = Instant::now();
    let auth_header = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let user = match state.auth.authenticate(auth_header) {
        Ok(u) => u,
        Err(e) => {
            metrics::counter!("graphql_requests_total", "result" => "unauthenticated").increment(1);
            let mut res = gql_error(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", &e.to_string());
            res.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return res;
        }
    };
    if let Some(token) = headers.get("x-consistency-token") {
        let pos = match token.to_str().ok().map(Position::from_token) {
            Some(Ok(p)) => p,
            _ => {
                metrics::counter!("graphql_requests_total", "result" => "bad_token").increment(1);
                return gql_error(StatusCode::BAD_REQUEST, "BAD_CONSISTENCY_TOKEN", "X-Consistency-Token is not a position returned by the command API");
            }
        };
        if let Err(e) = state.progress.wait_for(pos, state.consistency_wait).await {
            metrics::counter!("graphql_requests_total", "result" => "consistency_timeout").increment(1);
            let mut res = gql_error(StatusCode::SERVICE_UNAVAILABLE, "CONSISTENCY_TIMEOUT", &e.to_string());
            res.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return res;
        }
    }
    let response = state.schema.execute(req.into_inner().data(user)).await;
    let result = if response.errors.is_empty() { "ok" } else { "error" };
    metrics::counter!("graphql_requests_total", "result" => result).increment(1);
    metrics::histogram!("graphql_request_duration_seconds").record(started.elapsed().as_secs_f64());
    GraphQLResponse::from(response).into_response()
}

async fn graphiql() -> impl IntoResponse {
    Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql/ws").finish())
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let ok = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&state.pool)
        .await
        .map(|n| n as usize >= platform::db::MIGRATOR.iter().count())
        .unwrap_or(false);
    if ok {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: PostgreSQL unreachable or migrations pending")
    }
}

/// The full router; tests call it with `oneshot`.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    Router::new()
        .route("/graphql", get(graphiql).post(graphql))
        .route("/healthz", get(platform::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(platform::http::metrics))
        .layer(DefaultBodyLimit::max(256 * 1024))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, request_timeout))
        .with_state(state)
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        platform::http::metrics_handle();
        let pool = platform::db::pool(&settings.database)?;
        platform::db::migrate(&pool).await?;
        let progress = ProgressTracker::new(&settings.kafka.task_events_topic);
        progress.spawn(pool.clone());
        let state = AppState::new(
            pool,
            JwtAuth::new(&settings.auth.auth_jwt_secret),
            &settings.kafka.task_events_topic,
            Arc::new(KafkaWatermarks::new(&settings.kafka)?),
            progress,
            Duration::from_millis(settings.consistency_wait_ms),
            (settings.graphql_max_depth, settings.graphql_max_complexity),
        );
        let listener = tokio::net::TcpListener::bind(settings.addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "query API listening");
        Ok(Self { listener, router: router(state, Duration::from_millis(settings.request_timeout_ms)) })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        axum::serve(self.listener, self.router).with_graceful_shutdown(platform::http::shutdown_signal()).await?;
        Ok(())
    }
}

/// The schema without data, for printing the SDL.
pub fn sdl() -> String {
    Schema::build(Query, EmptyMutation, EmptySubscription).finish().sdl()
}
