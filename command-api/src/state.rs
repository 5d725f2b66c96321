//! What every handler shares: the writer, token verification, the Idempotency-Key answers.

use axum::extract::FromRef;

use platform::auth::JwtAuth;
use platform::kafka::Reachability;

use crate::idempotency::IdempotencyCache;
use crate::log::EventLog;
use crate::writer::Writer;

#[derive(Clone)]
pub struct AppState {
    pub writer: Writer,
    pub auth: JwtAuth,
    pub idempotency: IdempotencyCache,
    /// Accept webhook URLs on loopback/private addresses (local development only).
    pub allow_private_webhooks: bool,
    /// Whether the Kafka brokers answer (part of readiness).
    pub brokers: Reachability,
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
        Self { writer, auth, idempotency, allow_private_webhooks: false, brokers: Reachability::assumed() }
    }

    /// Readiness follows this probe of the brokers as well as the writer's restored state.
    pub fn with_brokers(mut self, brokers: Reachability) -> Self {
        self.brokers = brokers;
        self
    }

    /// Ready to accept commands: the state is restored and the brokers answer.
    pub fn is_ready(&self) -> bool {
        self.writer.is_ready() && self.brokers.is_reachable()
    }

    pub fn allow_private_webhooks(mut self, allow: bool) -> Self {
        self.allow_private_webhooks = allow;
        self
    }
}
