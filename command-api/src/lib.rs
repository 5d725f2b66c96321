//! taskstream command API: HTTP -> command -> decide -> append to Kafka (transactional, group
//! commit) -> answer. See `writer` for the single-writer design.
//!
//! A command's way through the modules, top to bottom (each imports only modules below it):
//! - `lib` (settings, `Application`) wires everything; `main` only starts it.
//! - `routes`: the HTTP surface by resource (`tasks`, `notifications`, `webhooks`, and `internal`
//!   for the service identity), each with its own `router()`; `routes/mod.rs` composes them with
//!   the operational routes. Handlers parse requests into domain commands (`domain::AnyCommand`).
//! - `command`: one submission path for every route (trace span, event metadata, metrics, the
//!   answer as HTTP); `state`: the `AppState` handlers share.
//! - `extract`: problem+json extractors (caller, command headers, JSON body, `CommandRoute` for the
//!   Idempotency-Key digest).
//! - `writer`: the single writer, generic over the registered aggregates (`domain::Decider`):
//!   decides, stages and answers through one path, live and at restore.
//! - `idempotency`: the Idempotency-Key decision (`IdempotencyCache::execute`) and `Answer`.
//! - `error`: `ApiError`, the one problem+json error type; `log`: the `EventLog` port and its Kafka
//!   adapter.

pub mod command;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod log;
pub mod routes;
pub mod state;
pub mod writer;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use clap::Parser;

use platform::auth::JwtAuth;
use platform::settings::{AuthSettings, KafkaSettings, SecretPolicy};

pub use crate::extract::BODY_LIMIT_BYTES;
use crate::idempotency::IdempotencyCache;
use crate::log::{KafkaLog, KafkaLogSettings};
pub use crate::routes::router;
pub use crate::state::AppState;

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
    /// Secret of the service identity (the projector's reactions); users never see it. Required
    /// (at least 32 bytes) unless in dev mode, where without it service calls are refused.
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
    #[command(flatten)]
    pub secrets: SecretPolicy,
}

/// How often readiness asks the brokers whether they answer.
const BROKER_PROBE_PERIOD: Duration = Duration::from_secs(1);

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.secrets.enforce(&[("AUTH_JWT_SECRET", Some(&settings.auth.auth_jwt_secret)), ("SERVICE_JWT_SECRET", settings.service_jwt_secret.as_ref())])?;
        platform::http::metrics_handle();
        let log = KafkaLog::new(KafkaLogSettings {
            kafka: settings.kafka.clone(),
            transactional_id: settings.transactional_id.clone(),
            transaction_timeout: Duration::from_millis(settings.transaction_timeout_ms),
        });
        let idempotency = IdempotencyCache::new(settings.idempotency_max_entries, Duration::from_secs(settings.idempotency_ttl_seconds));
        let auth = JwtAuth::new(&settings.auth.auth_jwt_secret).with_service_secret(settings.service_jwt_secret.as_ref());
        let brokers = platform::kafka::watch_brokers(&settings.kafka, "taskstream-command-api-probe", BROKER_PROBE_PERIOD)?;
        let state = AppState::new(log, auth, settings.max_batch, idempotency)
            .allow_private_webhooks(settings.webhook_allow_private)
            .with_brokers(brokers);
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
