//! taskstream query API: the read models in PostgreSQL over GraphQL (async-graphql on axum), with
//! read-your-writes consistency tokens.
//!
//! `main.rs` only wires: it parses [`Settings`], builds the [`Application`] and runs it. Tests build
//! an [`AppState`] themselves and drive [`router`] with `oneshot`. The application starts without
//! PostgreSQL: it applies the migrations in the background (`platform::db::Migrations`), answering
//! `/readyz` and GraphQL with 503 until they are applied.
//!
//! Modules, top to bottom; each imports only modules further down the list, so no module imports
//! one that imports it back:
//!
//! ```text
//! routes       HTTP: /graphql (with consistency-token waits), /graphql/ws, /v1/me/export, health, metrics; assembles TaskSchema
//! export       GET /v1/me/export: every read-model row of one user as one JSON document, streamed from one snapshot
//! graphiql     the GraphiQL page and its vendored assets (assets/graphiql/), embedded in the binary
//! apq          automatic persisted queries: the documents' cache (moka) and the protocol's error codes; documents kept parsed by their text
//! ws           the WebSocket transport and its limits (init timeout, token expiry, subscriptions, connections, message size)
//! live         subscriptions: one NOTIFY listener (Hub) fanned out to taskChanged / notificationReceived
//! schema       the GraphQL types and queries (list fields carry their cost); maps GraphQL enums and filters onto the store's terms
//! cost         the cost model's limits (cost with list sizes, aliases, root fields) as an async-graphql extension
//! error        GraphQL and HTTP error shapes
//! projections  projection statuses and the projection_lag gauge (platform::projections + watermarks)
//! store        SQL over the read models (rows: platform::readmodel::TaskRow), keyset page plans
//! cursor       opaque cursors, the task orders (Order) and keyset positions
//! progress     how far the projections have applied the log (LISTEN + poll), for consistency tokens
//! watermarks   the log's high watermarks (Kafka, cached; a trait so tests can fake it)
//! ```
//!
//! Edges: routes -> graphiql, apq, ws, live, schema, cost, error, export, progress, store, watermarks; export -> store;
//! cost -> error; live -> schema, store;
//! schema -> error, projections, store, cursor, watermarks; error -> progress;
//! projections -> watermarks; store -> cursor. What the projector shares with this crate (the
//! `tasks` row, projection status) lives in `platform`.

pub mod apq;
pub mod cost;
pub mod cursor;
pub mod error;
pub mod export;
pub mod graphiql;
pub mod live;
pub mod progress;
pub mod projections;
pub mod routes;
pub mod schema;
pub mod store;
pub mod watermarks;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::EmptyMutation;
use axum::Router;
use clap::Parser;
use tokio::net::TcpListener;

use platform::auth::JwtAuth;
use platform::db::Migrations;
use platform::ratelimit::{Rate, RateLimits};
use platform::settings::{AuthSettings, DatabaseSettings, KafkaSettings, SecretPolicy};

pub use crate::progress::ProgressTracker;
pub use crate::routes::{router, AppState, Limits, TaskSchema};
use crate::schema::Query;
use crate::watermarks::KafkaWatermarks;

#[derive(Debug, Clone, Parser)]
#[command(name = "query-api", about = "taskstream query API (GraphQL over the read models)", version)]
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
    /// Longest wait, in milliseconds, for the projections to reach an `X-Consistency-Token`.
    #[arg(long, env = "CONSISTENCY_WAIT_MS", default_value_t = 5_000)]
    pub consistency_wait_ms: u64,
    /// Deepest allowed query.
    #[arg(long, env = "GRAPHQL_MAX_DEPTH", default_value_t = 12)]
    pub graphql_max_depth: usize,
    /// Largest allowed query cost: one per selected field, a list's subtree counted once per row
    /// it may return (`first`), nested lists multiplied.
    #[arg(long, env = "GRAPHQL_MAX_COMPLEXITY", default_value_t = 5_000)]
    pub graphql_max_complexity: usize,
    /// Most aliased fields in one document.
    #[arg(long, env = "GRAPHQL_MAX_ALIASES", default_value_t = 30)]
    pub graphql_max_aliases: usize,
    /// Most root fields in one operation.
    #[arg(long, env = "GRAPHQL_MAX_ROOT_FIELDS", default_value_t = 20)]
    pub graphql_max_root_fields: usize,
    /// Longest time, in milliseconds, a request may take (503 after).
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Longest wait, in milliseconds, for `connection_init` on a WebSocket (then close 4408).
    #[arg(long, env = "GRAPHQL_WS_INIT_TIMEOUT_MS", default_value_t = 10_000)]
    pub graphql_ws_init_timeout_ms: u64,
    /// Most subscriptions running on one WebSocket connection.
    #[arg(long, env = "GRAPHQL_WS_MAX_SUBSCRIPTIONS", default_value_t = 20)]
    pub graphql_ws_max_subscriptions: usize,
    /// Most open WebSocket connections of one user.
    #[arg(long, env = "GRAPHQL_WS_MAX_CONNECTIONS_PER_USER", default_value_t = 10)]
    pub graphql_ws_max_connections_per_user: usize,
    /// Largest WebSocket message, in bytes (a larger one closes the connection with 1009).
    #[arg(long, env = "GRAPHQL_WS_MAX_MESSAGE_BYTES", default_value_t = 65_536)]
    pub graphql_ws_max_message_bytes: usize,
    /// GraphQL requests per second of one user (the token's subject); 0 turns the limit off.
    #[arg(long, env = "GRAPHQL_RATE_PER_USER", default_value_t = 20_000)]
    pub graphql_rate_per_user: u32,
    /// Requests one user may send at once above the rate.
    #[arg(long, env = "GRAPHQL_RATE_BURST_PER_USER", default_value_t = 20_000)]
    pub graphql_rate_burst_per_user: u32,
    /// Requests per second without a valid token, per client address; 0 turns the limit off.
    #[arg(long, env = "GRAPHQL_RATE_PER_ADDRESS", default_value_t = 50)]
    pub graphql_rate_per_address: u32,
    /// Requests without a valid token one address may send at once.
    #[arg(long, env = "GRAPHQL_RATE_BURST_PER_ADDRESS", default_value_t = 100)]
    pub graphql_rate_burst_per_address: u32,
    /// Memory, in bytes (estimated), of the documents registered as automatic persisted queries;
    /// the least recently used go first. 0 turns APQ off.
    #[arg(long, env = "GRAPHQL_APQ_CACHE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub graphql_apq_cache_bytes: u64,
    #[command(flatten)]
    pub secrets: SecretPolicy,
}

impl From<&Settings> for Limits {
    fn from(s: &Settings) -> Self {
        Limits {
            consistency_wait: Duration::from_millis(s.consistency_wait_ms),
            max_depth: s.graphql_max_depth,
            max_complexity: s.graphql_max_complexity,
            max_aliases: s.graphql_max_aliases,
            max_root_fields: s.graphql_max_root_fields,
            live: crate::ws::LiveLimits {
                init_timeout: Duration::from_millis(s.graphql_ws_init_timeout_ms),
                max_subscriptions: s.graphql_ws_max_subscriptions,
                max_connections_per_user: s.graphql_ws_max_connections_per_user,
                max_message_bytes: s.graphql_ws_max_message_bytes,
            },
            rate: RateLimits {
                per_user: Rate { per_second: s.graphql_rate_per_user, burst: s.graphql_rate_burst_per_user },
                per_address: Rate { per_second: s.graphql_rate_per_address, burst: s.graphql_rate_burst_per_address },
            },
            request_timeout: Duration::from_millis(s.request_timeout_ms),
            persisted_queries_bytes: s.graphql_apq_cache_bytes,
            ..Limits::default()
        }
    }
}

pub struct Application {
    listener: TcpListener,
    router: Router,
}

impl Application {
    /// Checks the secret and binds the listener. PostgreSQL need not be up: the migrations are
    /// applied in the background (retried while it is away; `/readyz` and GraphQL answer 503
    /// meanwhile), and following the projector's progress and changes starts once they are.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.secrets.enforce(&[("AUTH_JWT_SECRET", Some(&settings.auth.auth_jwt_secret))])?;
        platform::http::metrics_handle();
        let pool = platform::db::pool(&settings.database)?;
        let migrations = Migrations::in_background(pool.clone());
        let progress = ProgressTracker::new(&settings.kafka.task_events_topic);
        let watermarks: Arc<dyn crate::watermarks::Watermarks> = Arc::new(KafkaWatermarks::new(&settings.kafka)?);
        let state = AppState::new(pool.clone(), JwtAuth::new(&settings.auth.auth_jwt_secret), progress.clone(), watermarks.clone(), Limits::from(&settings))
            .with_migrations(migrations.clone());
        let (hub, topic) = (state.hub().clone(), settings.kafka.task_events_topic.clone());
        tokio::spawn(async move {
            migrations.applied().await;
            progress.spawn(pool.clone());
            hub.spawn(pool.clone());
            projections::export_lag(pool, topic, watermarks, Duration::from_secs(2)).await;
        });
        let listener = platform::http::listen(settings.addr, "QUERY_API_ADDR").await?;
        tracing::info!(addr = %listener.local_addr()?, "query API listening");
        Ok(Self { listener, router: router(state) })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until Ctrl-C or SIGTERM, then lets the requests in flight finish.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        axum::serve(self.listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(platform::http::shutdown_signal())
            .await?;
        Ok(())
    }
}

/// The schema's SDL (no data needed), e.g. for documentation.
pub fn sdl() -> String {
    TaskSchema::build(Query, EmptyMutation, crate::live::Subscription).finish().sdl()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schema_has_the_contract_names() {
        let sdl = super::sdl();
        for want in [
            "task(id: ID!): Task",
            "tasks(filter: TaskFilter, orderBy: TaskOrder = DUE_AT_ASC, first: Int = 50, after: String): TaskConnection!",
            "taskHistory(taskId: ID!, first: Int = 50, after: String): TaskEventConnection!",
            "stats: TaskStats!",
            "projections: [ProjectionStatus!]!",
            "remindAt: DateTime",
            "recurrenceParentId: ID",
            "data: JSON!",
            "type: String!",
            "highWatermark: Int!",
            "avgCompletionSeconds: Float",
        ] {
            assert!(sdl.contains(want), "missing `{want}` in\n{sdl}");
        }
    }
}
