//! taskstream command API: HTTP -> command -> decide -> append to Kafka (transactional, group
//! commit) -> answer. See `writer` for the single-writer design.

pub mod error;
pub mod extract;
pub mod idempotency;
pub mod log;
pub mod routes;
pub mod webhook_dns;
pub mod writer;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use tower_http::timeout::TimeoutLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use platform::auth::JwtAuth;
use platform::settings::{AuthSettings, KafkaSettings};

use crate::error::ApiError;
use crate::idempotency::IdempotencyCache;
use crate::log::{EventLog, KafkaLog, KafkaLogSettings};
use crate::writer::Writer;

/// Largest accepted request body.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Parser)]
#[command(name = "command-api", about = "taskstream command API", version)]
pub struct Settings {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "COMMAND_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    /// Secret of the service identity (the projector's reactions); users never see it. Without it,
    /// service calls are refused.
    #[arg(long, env = "SERVICE_JWT_SECRET")]
    pub service_jwt_secret: Option<platform::secret::Secret>,
    /// Kafka transactional.id of the single writer. A second instance with the same id fences the
    /// first (the first then answers 503 until it is stopped).
    #[arg(long, env = "KAFKA_TRANSACTIONAL_ID", default_value = "taskstream-command-api")]
    pub transactional_id: String,
    /// Kafka transaction timeout; operations on the log give up after half of it.
    #[arg(long, env = "KAFKA_TRANSACTION_TIMEOUT_MS", default_value_t = 10_000)]
    pub transaction_timeout_ms: u64,
    /// Most commands group-committed into one Kafka transaction.
    #[arg(long, env = "COMMAND_MAX_BATCH", default_value_t = 2_000)]
    pub max_batch: usize,
    /// Idempotency answers kept in memory (bounded; older ones are evicted).
    #[arg(long, env = "IDEMPOTENCY_MAX_ENTRIES", default_value_t = 1_000_000)]
    pub idempotency_max_entries: u64,
    /// How long an Idempotency-Key is remembered.
    #[arg(long, env = "IDEMPOTENCY_TTL_SECONDS", default_value_t = 86_400)]
    pub idempotency_ttl_seconds: u64,
    /// Accept webhook URLs that point at loopback or private addresses (for local development;
    /// `./dev` sets it). Never in production: it opens the door to SSRF.
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE", default_value_t = false)]
    pub webhook_allow_private: bool,
    /// Request timeout (longer than a log operation, so a command is never cut off mid-append).
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
}

#[derive(Clone)]
pub struct AppState {
    pub writer: Writer,
    pub auth: JwtAuth,
    pub idempotency: IdempotencyCache,
    /// Accept webhook URLs on loopback/private addresses (local development only).
    pub allow_private_webhooks: bool,
}

impl FromRef<AppState> for JwtAuth {
    fn from_ref(s: &AppState) -> JwtAuth {
        s.auth.clone()
    }
}

impl AppState {
    /// Wires the state around any event log (Kafka in production, in-memory in unit tests).
    pub fn new<L: EventLog>(log: L, auth: JwtAuth, max_batch: usize, idempotency: IdempotencyCache) -> Self {
        let writer = Writer::spawn(log, idempotency.clone(), max_batch);
        Self { writer, auth, idempotency, allow_private_webhooks: false }
    }

    pub fn allow_private_webhooks(mut self, allow: bool) -> Self {
        self.allow_private_webhooks = allow;
        self
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "taskstream command API", description = "Commands on tasks. Every success means the events are durable in Kafka."),
    modifiers(&BearerAuth),
    tags((name = "tasks", description = "Task commands"), (name = "notifications", description = "Notification read state"), (name = "webhooks", description = "Webhook registration"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The full router; tests call it with `oneshot`.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let (api, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::create_task))
        .routes(routes!(routes::update_task, routes::delete_task))
        .routes(routes!(routes::complete_task))
        .routes(routes!(routes::reopen_task))
        .routes(routes!(routes::mark_notification_read))
        .routes(routes!(routes::set_webhook, routes::remove_webhook))
        .split_for_parts();
    let api = api.route("/internal/v1/tasks/{id}/remind", axum::routing::post(routes::fire_reminder));
    let openapi = std::sync::Arc::new(openapi);
    api.route("/v1/openapi.json", get(move || async move { Json(openapi.as_ref().clone()) }))
        .route("/healthz", get(platform::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(platform::http::metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, request_timeout))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.writer.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "restoring state from the log or waiting for Kafka")
    }
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        platform::http::metrics_handle();
        let log = KafkaLog::new(KafkaLogSettings {
            kafka: settings.kafka.clone(),
            transactional_id: settings.transactional_id.clone(),
            transaction_timeout: Duration::from_millis(settings.transaction_timeout_ms),
        });
        let idempotency = IdempotencyCache::new(
            settings.idempotency_max_entries,
            Duration::from_secs(settings.idempotency_ttl_seconds),
        );
        if settings.service_jwt_secret.is_none() {
            tracing::warn!("SERVICE_JWT_SECRET is not set: the projector's reactions will be refused");
        }
        let auth = JwtAuth::new(&settings.auth.auth_jwt_secret).with_service_secret(settings.service_jwt_secret.as_ref());
        let state = AppState::new(log, auth, settings.max_batch, idempotency).allow_private_webhooks(settings.webhook_allow_private);
        let listener = tokio::net::TcpListener::bind(settings.addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "command API listening");
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
