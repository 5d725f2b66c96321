//! What every handler shares: the cluster (this instance's partition writers and who owns the
//! others), the forwarder, token verification, the Idempotency-Key answers, the request budgets, and
//! the query API to which `GET /v1/me/export` is relayed.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;

use platform::auth::JwtAuth;
use platform::kafka::Reachability;
use platform::keys::KeyRing;
use platform::ratelimit::{RateLimiter, RateLimits};

use crate::cluster::{Cluster, Instance};
use crate::forward::Forwarder;
use crate::idempotency::IdempotencyCache;
use crate::log::EventLog;
use crate::membership::{self, WriterFactory};
use crate::query_api::QueryApi;
use crate::writer::{Writer, WriterConfig};

#[derive(Clone)]
pub struct AppState {
    pub cluster: Arc<Cluster>,
    pub forwarder: Forwarder,
    pub auth: JwtAuth,
    pub idempotency: IdempotencyCache,
    /// Accept webhook URLs on loopback/private addresses (local development only).
    pub allow_private_webhooks: bool,
    /// Whether the Kafka brokers answer (part of readiness).
    pub brokers: Reachability,
    /// Request budgets per user and per client address (`crate::ratelimit`).
    pub rate_limiter: RateLimiter,
    /// The event catalogue served at `GET /v1/asyncapi.json`, for the configured topics.
    pub catalogue: Arc<serde_json::Value>,
    /// The users' data keys (the writers seal with them; an erasure destroys them).
    pub keys: Arc<KeyRing>,
    /// Where `GET /v1/me/export` is relayed.
    pub query_api: QueryApi,
}

impl FromRef<AppState> for JwtAuth {
    fn from_ref(s: &AppState) -> JwtAuth {
        s.auth.clone()
    }
}

/// The partition count of the in-process logs (`AppState::new`), as the default topic has.
pub const DEFAULT_PARTITIONS: i32 = 12;

impl AppState {
    /// Wires the state around `cluster` (whose partitions arrive later, e.g. from Kafka's group).
    pub fn with_cluster(cluster: Arc<Cluster>, auth: JwtAuth, idempotency: IdempotencyCache, forward_timeout: Duration) -> Self {
        let forwarder = Forwarder::new(&cluster.me().id, forward_timeout);
        let rate_limiter = crate::ratelimit::limiter(RateLimits::default());
        let catalogue = Arc::new(platform::catalogue::asyncapi(&platform::catalogue::Topics::default()));
        let keys = KeyRing::in_memory(platform::keys::Keks::dev());
        let query_api = QueryApi::new(crate::query_api::DEFAULT_URL).expect("the default query API URL is valid");
        Self {
            cluster,
            forwarder,
            auth,
            idempotency,
            allow_private_webhooks: false,
            brokers: Reachability::assumed(),
            rate_limiter,
            catalogue,
            keys,
            query_api,
        }
    }

    /// One process owning every partition of `log` (an in-memory log in tests): `log` is cloned for
    /// each partition's writer.
    pub fn new<L: EventLog + Clone + Sync>(log: L, auth: JwtAuth, max_batch: usize, idempotency: IdempotencyCache) -> Self {
        Self::with_config(log, auth, WriterConfig { max_batch, ..WriterConfig::default() }, idempotency)
    }

    /// `new` with the writers' configuration (snapshot frequency, released records).
    pub fn with_config<L: EventLog + Clone + Sync>(log: L, auth: JwtAuth, config: WriterConfig, idempotency: IdempotencyCache) -> Self {
        let cluster = Arc::new(Cluster::new(Instance { id: "local".into(), url: "http://127.0.0.1".into() }, DEFAULT_PARTITIONS));
        let (cache, keys) = (idempotency.clone(), config.keys.clone());
        let factory: WriterFactory = Arc::new(move |p| Writer::spawn(p, log.clone(), cache.clone(), config.clone()));
        membership::own_all(&cluster, &factory);
        Self::with_cluster(cluster, auth, idempotency, Duration::from_secs(10)).with_keys(keys)
    }

    /// The data keys the writers use (the same ring).
    pub fn with_keys(mut self, keys: Arc<KeyRing>) -> Self {
        self.keys = keys;
        self
    }

    /// Readiness follows this probe of the brokers as well as the partitions' state.
    pub fn with_brokers(mut self, brokers: Reachability) -> Self {
        self.brokers = brokers;
        self
    }

    /// Ready to accept commands: the brokers answer, this instance's partitions are restored and
    /// every partition has a known owner.
    pub fn is_ready(&self) -> bool {
        self.brokers.is_reachable() && self.cluster.is_ready()
    }

    /// Request budgets other than the default ones.
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limiter = crate::ratelimit::limiter(limits);
        self
    }

    pub fn allow_private_webhooks(mut self, allow: bool) -> Self {
        self.allow_private_webhooks = allow;
        self
    }

    /// Relays `GET /v1/me/export` to this query API (default: [`crate::query_api::DEFAULT_URL`]).
    pub fn with_query_api(mut self, query_api: QueryApi) -> Self {
        self.query_api = query_api;
        self
    }

    /// Serves the catalogue of these topics (the default: `task-events`, 12 partitions, ...).
    pub fn with_topics(mut self, topics: &platform::catalogue::Topics) -> Self {
        self.catalogue = Arc::new(platform::catalogue::asyncapi(topics));
        self
    }
}
