//! Settings shared by every binary, read from environment variables (or flags) with clap.

use clap::Args;

use crate::secret::{self, Secret, WeakSecret};

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

    /// Which command-API instance owns which partition (compacted, key = partition, written in the
    /// owner's transaction right after it took the partition over).
    pub fn owners_topic(&self) -> String {
        format!("{}.owners", self.task_events_topic)
    }

    /// The command API's partition snapshots (compacted; partition p's snapshot lives in its
    /// partition p).
    pub fn snapshots_topic(&self) -> String {
        format!("{}.snapshots", self.task_events_topic)
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

/// How strict a service is about its secrets (`platform::secret::check`): it refuses to start with
/// a missing, well-known or short secret, unless it runs in local development mode, where each weak
/// secret is a loud warning instead.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct SecretPolicy {
    /// Local development only (`./dev` sets TASKSTREAM_DEV=1): start even with missing, well-known
    /// or short secrets, warning about each. Never set it anywhere else.
    #[arg(long = "dev-mode", env = "TASKSTREAM_DEV", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    pub dev: bool,
}

impl SecretPolicy {
    /// Checks the service's secrets, each named by its environment variable. Outside development
    /// any weak secret is an error listing all of them (the service must not start).
    pub fn enforce(&self, secrets: &[(&'static str, Option<&Secret>)]) -> anyhow::Result<()> {
        let weak: Vec<WeakSecret> = secrets.iter().filter_map(|(var, value)| secret::check(var, *value).err()).collect();
        if weak.is_empty() {
            return Ok(());
        }
        if self.dev {
            for w in &weak {
                tracing::warn!("INSECURE: TASKSTREAM_DEV is set, so this service starts anyway (local development only): {w}");
            }
            return Ok(());
        }
        let reasons: Vec<String> = weak.iter().map(ToString::to_string).collect();
        anyhow::bail!("refusing to start with a weak secret: {}", reasons.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        policy: SecretPolicy,
    }

    const STRONG: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn production_refuses_every_weak_secret_and_names_each() {
        let production = SecretPolicy { dev: false };
        let (user, service) = (Secret::new("change-me"), Secret::new(STRONG));
        let e = production.enforce(&[("AUTH_JWT_SECRET", Some(&user)), ("SERVICE_JWT_SECRET", Some(&service))]).unwrap_err().to_string();
        assert!(e.contains("AUTH_JWT_SECRET is a well-known default value"), "{e}");
        assert!(!e.contains("SERVICE_JWT_SECRET"), "{e}");
        let e = production.enforce(&[("AUTH_JWT_SECRET", Some(&Secret::new("short"))), ("SERVICE_JWT_SECRET", None)]).unwrap_err().to_string();
        assert!(e.contains("AUTH_JWT_SECRET is only 5 bytes long") && e.contains("SERVICE_JWT_SECRET is not set"), "{e}");
        assert!(production.enforce(&[("AUTH_JWT_SECRET", Some(&service)), ("SERVICE_JWT_SECRET", Some(&service))]).is_ok());
    }

    #[test]
    fn dev_mode_starts_with_weak_secrets() {
        let dev = SecretPolicy { dev: true };
        assert!(dev.enforce(&[("AUTH_JWT_SECRET", Some(&Secret::new("taskstream-dev-secret"))), ("SERVICE_JWT_SECRET", None)]).is_ok());
    }

    #[test]
    fn dev_mode_is_off_unless_asked_for() {
        assert!(Cli::try_parse_from(["svc", "--dev-mode"]).unwrap().policy.dev);
        // (TASKSTREAM_DEV of the environment would turn it on; the test processes do not set it.)
        if std::env::var_os("TASKSTREAM_DEV").is_none() {
            assert!(!Cli::try_parse_from(["svc"]).unwrap().policy.dev);
        }
    }
}
