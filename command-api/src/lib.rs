//! taskstream command API: HTTP -> command -> route to the partition's owner -> decide -> append to
//! Kafka (transactional, group commit) -> answer. Every partition of `task-events` has one writer in
//! the whole deployment (see `writer`); instances share the partitions through Kafka's consumer
//! group (`membership`) and forward commands to the owner (`forward`).
//!
//! A command's way through the modules, top to bottom (each imports only modules below it):
//! - `lib` (settings, `Application`) wires everything; `main` only starts it.
//! - `routes`: the HTTP surface by resource (`tasks`, `notifications`, `webhooks`, `me` for the
//!   caller's own data, and `internal` for the service identity), each with its own `router()`;
//!   `routes/mod.rs` composes them with the operational routes. Handlers parse requests into domain
//!   commands (`domain::AnyCommand`); `me` relays its read to the query API (`query_api`).
//! - `command`: one submission path for every route (trace span, event metadata, metrics, the
//!   answer as HTTP); `state`: the `AppState` handlers share.
//! - `forward`: replays a command request to its partition's owner; `membership`: the consumer group
//!   that assigns partitions (starting and stopping writers) and the owners topic's follower.
//! - `cluster`: this instance's writers and the announced owners (`Cluster::route`).
//! - `writer`: a partition's writer, generic over the registered aggregates (`domain::Decider`):
//!   decides, stages and answers through one path, live and at restore; snapshots. `streams`: the
//!   per-aggregate state maps it keeps; `partition`: which partition a stream lives in.
//! - `idempotency`: the Idempotency-Key decision (`IdempotencyCache::execute`) and `Answer`.
//! - `extract`: problem+json extractors (caller, command headers, JSON body, `CommandRoute` for the
//!   Idempotency-Key digest) and the layer that keeps a command request to forward it.
//! - `ratelimit`: the layer that spends the caller's request budget (`platform::ratelimit`) first.
//! - `error`: `ApiError`, the one problem+json error type; `log`: the `EventLog` port (one partition)
//!   and its Kafka adapter; `query_api`: the client that relays `GET /v1/me/export` to the query API.

pub mod cluster;
pub mod command;
pub mod error;
pub mod extract;
pub mod forward;
pub mod idempotency;
pub mod log;
pub mod membership;
pub mod partition;
pub mod query_api;
pub mod ratelimit;
pub mod routes;
pub mod state;
pub mod streams;
pub mod writer;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use clap::Parser;

use platform::auth::JwtAuth;
use platform::ratelimit::{Rate, RateLimits};
use platform::settings::{AuthSettings, KafkaSettings, SecretPolicy};

use crate::cluster::{Cluster, Instance};
pub use crate::extract::BODY_LIMIT_BYTES;
use crate::idempotency::IdempotencyCache;
use crate::log::{KafkaLog, KafkaLogSettings};
use crate::membership::WriterFactory;
use crate::query_api::QueryApi;
pub use crate::routes::router;
pub use crate::state::AppState;
use crate::writer::{Writer, WriterConfig};

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
    #[command(flatten)]
    pub kek: platform::keys::KekSettings,
    /// Secret of the service identity (the projector's reactions); users never see it. Required
    /// (at least 32 bytes) unless in dev mode, where without it service calls are refused.
    #[arg(long, env = "SERVICE_JWT_SECRET")]
    pub service_jwt_secret: Option<platform::secret::Secret>,
    /// Prefix of the partition writers' Kafka transactional.id (`<prefix>-p<partition>`). A new
    /// owner of a partition fences the previous one with it.
    #[arg(long, env = "KAFKA_TRANSACTIONAL_ID", default_value = "taskstream-command-api")]
    pub transactional_id: String,
    /// Kafka consumer group through which the command-API instances share the partitions
    /// (default: the transactional.id prefix, so one deployment = one group).
    #[arg(long, env = "COMMAND_API_GROUP")]
    pub group: Option<String>,
    /// This instance's id in `GET /v1/cluster` and the owners topic (default: host:port).
    #[arg(long, env = "COMMAND_API_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Where the other instances reach this one to forward commands (default: http://<COMMAND_API_ADDR>).
    #[arg(long, env = "COMMAND_API_ADVERTISED_URL")]
    pub advertised_url: Option<String>,
    /// A partition writer records a snapshot after this many events...
    #[arg(long, env = "SNAPSHOT_EVERY_EVENTS", default_value_t = 100_000)]
    pub snapshot_every_events: u64,
    /// ... or after this many seconds with at least one event.
    #[arg(long, env = "SNAPSHOT_INTERVAL_SECONDS", default_value_t = 300)]
    pub snapshot_interval_seconds: u64,
    /// Undecodable records an operator released (`partition:offset,...`): skipped at restore
    /// instead of stopping the writes to their stream.
    #[arg(long, env = "COMMAND_API_RELEASED_RECORDS", value_delimiter = ',', value_parser = parse_position)]
    pub released_records: Vec<(i32, i64)>,
    /// Kafka transaction timeout; operations on the log give up after half of it.
    #[arg(long, env = "KAFKA_TRANSACTION_TIMEOUT_MS", default_value_t = 10_000)]
    pub transaction_timeout_ms: u64,
    /// Kafka transactions one instance's partition writers may have in flight at once (0: one per
    /// partition, no limit). Fewer, larger transactions under load; no wait when idle.
    #[arg(long, env = "COMMAND_API_TRANSACTION_SLOTS", default_value_t = 2)]
    pub transaction_slots: usize,
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
    /// Requests per second of one user (the token's subject); 0 turns the limit off.
    #[arg(long, env = "COMMAND_RATE_PER_USER", default_value_t = 20_000)]
    pub command_rate_per_user: u32,
    /// Requests one user may send at once above the rate.
    #[arg(long, env = "COMMAND_RATE_BURST_PER_USER", default_value_t = 20_000)]
    pub command_rate_burst_per_user: u32,
    /// Requests per second without a valid token, per client address; 0 turns the limit off.
    #[arg(long, env = "COMMAND_RATE_PER_ADDRESS", default_value_t = 50)]
    pub command_rate_per_address: u32,
    /// Requests without a valid token one address may send at once.
    #[arg(long, env = "COMMAND_RATE_BURST_PER_ADDRESS", default_value_t = 100)]
    pub command_rate_burst_per_address: u32,
    /// Base URL of the query API, to which `GET /v1/me/export` is relayed (default:
    /// `http://<QUERY_API_ADDR>` when that is set, as `./dev` sets it for every service, else
    /// http://127.0.0.1:8081).
    #[arg(long, env = "QUERY_API_URL")]
    pub query_api_url: Option<String>,
    /// The query API's listen address, the default of `QUERY_API_URL` (the query API's own setting).
    #[arg(long, env = "QUERY_API_ADDR", hide = true)]
    pub query_api_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub secrets: SecretPolicy,
}

/// How often readiness asks the brokers whether they answer.
const BROKER_PROBE_PERIOD: Duration = Duration::from_secs(1);

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    cluster: Arc<Cluster>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.secrets.enforce(&[("AUTH_JWT_SECRET", Some(&settings.auth.auth_jwt_secret)), ("SERVICE_JWT_SECRET", settings.service_jwt_secret.as_ref())])?;
        platform::http::metrics_handle();
        let listener = platform::http::listen(settings.addr, "COMMAND_API_ADDR").await?;
        let addr = listener.local_addr()?;
        let me = Instance {
            id: settings.instance_id.clone().unwrap_or_else(|| format!("{}:{}", hostname(), addr.port())),
            url: settings.advertised_url.clone().unwrap_or_else(|| format!("http://{addr}")),
        };
        let cluster = Arc::new(Cluster::new(me.clone(), 0));
        let keys = Arc::new(platform::keys::KeyRing::new(settings.kek.keks(settings.secrets.dev)?));
        let log_settings = KafkaLogSettings {
            kafka: settings.kafka.clone(),
            transactional_id_prefix: settings.transactional_id.clone(),
            transaction_timeout: Duration::from_millis(settings.transaction_timeout_ms),
        };
        let idempotency = IdempotencyCache::new(settings.idempotency_max_entries, Duration::from_secs(settings.idempotency_ttl_seconds));
        let config = WriterConfig {
            max_batch: settings.max_batch,
            owner: Some((me.id.clone(), me.url.clone())),
            snapshot_every_events: settings.snapshot_every_events,
            snapshot_interval: Duration::from_secs(settings.snapshot_interval_seconds),
            released: settings.released_records.iter().copied().collect::<HashSet<_>>(),
            transaction_slots: (settings.transaction_slots > 0).then(|| Arc::new(tokio::sync::Semaphore::new(settings.transaction_slots))),
            keys: keys.clone(),
        };
        let cache = idempotency.clone();
        let factory: WriterFactory =
            Arc::new(move |p| Writer::spawn(p, KafkaLog::new(log_settings.clone(), p, config.keys.clone()), cache.clone(), config.clone()));
        let group = settings.group.clone().unwrap_or_else(|| settings.transactional_id.clone());
        tokio::spawn(join_when_reachable(settings.kafka.clone(), group, cluster.clone(), factory, keys.clone()));
        let auth = JwtAuth::new(&settings.auth.auth_jwt_secret).with_service_secret(settings.service_jwt_secret.as_ref());
        let brokers = platform::kafka::watch_brokers(&settings.kafka, "taskstream-command-api-probe", BROKER_PROBE_PERIOD)?;
        let forward_timeout = Duration::from_millis(settings.request_timeout_ms / 2);
        let query_api = QueryApi::new(&query_api::base_url(settings.query_api_url.as_deref(), settings.query_api_addr))?;
        let state = AppState::with_cluster(cluster.clone(), auth, idempotency, forward_timeout)
            .with_keys(keys)
            .allow_private_webhooks(settings.webhook_allow_private)
            .with_topics(&platform::catalogue::Topics::from_settings(&settings.kafka))
            .with_brokers(brokers)
            .with_query_api(query_api)
            .with_rate_limits(RateLimits {
                per_user: Rate { per_second: settings.command_rate_per_user, burst: settings.command_rate_burst_per_user },
                per_address: Rate { per_second: settings.command_rate_per_address, burst: settings.command_rate_burst_per_address },
            });
        tracing::info!(%addr, instance = %me.id, url = %me.url, query_api = %state.query_api.base(), "command API listening");
        Ok(Self { listener, router: router(state, Duration::from_millis(settings.request_timeout_ms)), cluster })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        // With the client's address, the budget of requests without a valid token.
        axum::serve(self.listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(platform::http::shutdown_signal())
            .await?;
        // Hand the partitions over now rather than after the group's session timeout.
        self.cluster.leave(Duration::from_secs(20)).await;
        Ok(())
    }
}

fn parse_position(s: &str) -> Result<(i32, i64), String> {
    let (p, o) = s.trim().split_once(':').ok_or_else(|| format!("{s}: expected partition:offset"))?;
    Ok((p.parse().map_err(|_| format!("{s}: bad partition"))?, o.parse().map_err(|_| format!("{s}: bad offset"))?))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "command-api".into())
}

/// Creates the topics and learns the partition count (retrying until Kafka answers), then joins the
/// group and follows the owners topic.
async fn join_when_reachable(
    kafka: platform::settings::KafkaSettings,
    group: String,
    cluster: Arc<Cluster>,
    factory: WriterFactory,
    keys: Arc<platform::keys::KeyRing>,
) {
    let mut backoff = platform::retry::Policy::new(Duration::from_millis(200), Duration::from_secs(5)).backoff();
    loop {
        let attempt = async {
            platform::kafka::ensure_topics(&kafka).await?;
            // The data keys first: a writer decides and restores with them.
            keys.start(&kafka, "taskstream-command-api").await?;
            let k = kafka.clone();
            let n = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
                let consumer: rdkafka::consumer::BaseConsumer = platform::kafka::client_config(&k, "taskstream-command-api-metadata").create()?;
                Ok(platform::kafka::partitions(&consumer, &k.task_events_topic, Duration::from_secs(5))?.len())
            })
            .await??;
            anyhow::Ok(n as i32)
        };
        match attempt.await {
            Ok(n) => {
                cluster.set_partitions(n);
                let joined =
                    membership::follow_owners(&kafka, cluster.clone()).and_then(|_| membership::join(&kafka, &group, cluster.clone(), factory.clone()));
                if let Err(e) = joined {
                    tracing::error!(error.message = %e, "could not start the group membership");
                }
                return;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error.message = %e, retry_in_ms = delay.as_millis() as u64, "cannot join yet (Kafka unreachable, or data keys this instance cannot unwrap); the command API owns no partition until then");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
