//! taskstream projector: builds the PostgreSQL read models from the `task-events` log,
//! exactly-once (each batch and its per-partition offsets are committed in one transaction).

pub mod model;
pub mod reactor;
pub mod runner;
pub mod status;
pub mod store;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::{Parser, Subcommand};
use sqlx::PgPool;

use platform::auth::JwtAuth;
use platform::secret::Secret;
use platform::settings::{DatabaseSettings, KafkaSettings};

use crate::runner::{RunSettings, Runner};

#[derive(Debug, Parser)]
#[command(name = "projector", about = "taskstream projector: log -> read models", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Consume the log and maintain the read models (the default).
    Run,
    /// Print per projection: state, per-partition offset, high watermark and lag.
    Status,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address of the health and metrics endpoint (port 0 picks a free port).
    #[arg(long, env = "PROJECTOR_ADDR", default_value = "127.0.0.1:8082", global = true)]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    #[command(flatten)]
    pub database: DatabaseSettings,
    /// Most records applied in one transaction.
    #[arg(long, env = "PROJECTOR_MAX_BATCH", default_value_t = 5_000, global = true)]
    pub max_batch: usize,
    /// How long a batch waits for more records after the first one.
    #[arg(long, env = "PROJECTOR_LINGER_MS", default_value_t = 2, global = true)]
    pub linger_ms: u64,
    /// The command API that reaction commands are sent to.
    #[arg(long, env = "COMMAND_API_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub command_api_url: String,
    /// Secret of the service identity the reactions act with (shared with the command API only).
    #[arg(long, env = "SERVICE_JWT_SECRET", global = true)]
    pub service_jwt_secret: Option<Secret>,
    /// Deliver webhooks to loopback/private addresses (local development only; `./dev` sets it).
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE", default_value_t = false, global = true)]
    pub webhook_allow_private: bool,
}

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    ready: Arc<AtomicBool>,
}

pub fn router(pool: PgPool, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(platform::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(platform::http::metrics))
        .with_state(AppState { pool, ready })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let db_ok = sqlx::query("SELECT 1").execute(&s.pool).await.is_ok();
    if db_ok && s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for PostgreSQL or Kafka")
    }
}

pub struct Application {
    listener: tokio::net::TcpListener,
    settings: Settings,
    pool: PgPool,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        platform::http::metrics_handle();
        let pool = platform::db::pool(&settings.database)?;
        platform::db::migrate(&pool).await?;
        let listener = tokio::net::TcpListener::bind(settings.addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "projector health/metrics listening");
        Ok(Self { listener, settings, pool })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let ready = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if self.settings.service_jwt_secret.is_none() {
            tracing::warn!("SERVICE_JWT_SECRET is not set: reactions (next occurrences, reminders) cannot be sent");
        }
        // The service key only signs; user tokens are never verified here.
        let service_auth = JwtAuth::new(&Secret::new(uuid::Uuid::new_v4().to_string()))
            .with_service_secret(self.settings.service_jwt_secret.as_ref());
        let reactor = reactor::Reactor::new(
            self.pool.clone(),
            self.settings.command_api_url.clone(),
            service_auth,
            self.settings.webhook_allow_private,
        )?;
        let wake = reactor.wake.clone();
        let reactions = tokio::spawn(reactor.run());
        let runner = Runner::new(
            RunSettings {
                kafka: self.settings.kafka.clone(),
                max_batch: self.settings.max_batch,
                linger: Duration::from_millis(self.settings.linger_ms),
            },
            self.pool.clone(),
            ready.clone(),
            wake,
        );
        let runner = tokio::spawn(runner.run(stop_rx));
        let lag = tokio::spawn(status::export_lag(self.pool.clone(), self.settings.kafka.clone(), Duration::from_secs(5)));
        let app = router(self.pool.clone(), ready);
        axum::serve(self.listener, app).with_graceful_shutdown(platform::http::shutdown_signal()).await?;
        // Stop between batches: an in-flight transaction either commits or is rolled back.
        let _ = stop_tx.send(true);
        let _ = runner.await;
        reactions.abort();
        lag.abort();
        self.pool.close().await;
        Ok(())
    }
}

/// `projector status`.
pub async fn print_status(settings: Settings) -> anyhow::Result<()> {
    let pool = platform::db::pool(&settings.database)?;
    let statuses = status::collect(&pool, &settings.kafka).await?;
    print!("{}", status::render(&statuses));
    Ok(())
}
