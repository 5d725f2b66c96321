//! Settings shared by every binary, read from environment variables (or flags) with clap.

use clap::Args;

use crate::secret::Secret;

#[derive(Debug, Clone, Args)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// The event log topic.
    #[arg(long, env = "TASK_EVENTS_TOPIC", default_value = "task-events")]
    pub task_events_topic: String,
    /// Partitions of the event log topic when this service creates it.
    #[arg(long, env = "TASK_EVENTS_PARTITIONS", default_value_t = 12)]
    pub task_events_partitions: i32,
    /// Replication factor of the topics when this service creates them.
    #[arg(long, env = "TASK_EVENTS_REPLICATION", default_value_t = 1)]
    pub task_events_replication: i32,
}

impl KafkaSettings {
    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.task_events_topic)
    }
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Secret,
    /// Maximum connections in the pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct AuthSettings {
    /// HS256 secret that signs user tokens.
    #[arg(long, env = "AUTH_JWT_SECRET")]
    pub auth_jwt_secret: Secret,
}
