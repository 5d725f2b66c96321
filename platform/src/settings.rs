//! Settings shared by every binary, read from environment variables (or flags) with clap.

use clap::Args;

use crate::kafka_properties::ClientProperties;
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
    /// librdkafka properties for every Kafka client (e.g. security.protocol, sasl.mechanism,
    /// sasl.username, sasl.password, ssl.ca.location): from this Java-style properties file, then
    /// from KAFKA_CONFIG_<NAME> variables, which win (the name upper-cased, '.' as '_', '_' as
    /// '__': KAFKA_CONFIG_SASL_PASSWORD). Checked at start-up (`platform::kafka_properties`).
    #[arg(
        long = "kafka-config-file",
        env = "KAFKA_CONFIG_FILE",
        value_name = "PATH",
        default_value = "",
        hide_default_value = true,
        value_parser = ClientProperties::parse_arg
    )]
    pub kafka_config: ClientProperties,
    /// How long an erased user's data key may stay on the broker's disk (the keys topic's
    /// compaction settings when this service creates it; see `platform::keys::erasure_bound`).
    #[arg(long, env = "DATA_KEYS_ERASURE_BOUND_MS", default_value_t = 86_400_000)]
    pub data_keys_erasure_bound_ms: u64,
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

    /// The users' data keys, wrapped (compacted, key = the data key's id, one partition;
    /// `platform::keys`).
    pub fn keys_topic(&self) -> String {
        format!("{}.keys", self.task_events_topic)
    }

    /// The current-state topic (compacted, key = task id, as many partitions as the log): see
    /// [`updates_topic_for`].
    pub fn updates_topic(&self) -> String {
        updates_topic_for(&self.task_events_topic)
    }
}

/// The current-state topic of the event log `events`: `task-updates` for the contract's
/// `task-events`, `<events>.updates` for any other log (a test's, a benchmark's), so that every log
/// has its own, with its partition count (a writer of partition p writes the state of p's tasks to
/// partition p).
pub fn updates_topic_for(events: &str) -> String {
    if events == "task-events" {
        crate::catalogue::UPDATES_TOPIC.to_owned()
    } else {
        format!("{events}.updates")
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

    #[derive(Debug, Parser)]
    struct KafkaCli {
        #[command(flatten)]
        kafka: KafkaSettings,
    }

    #[test]
    fn kafka_client_properties_are_read_with_the_settings() {
        let path = std::env::temp_dir().join(format!("settings-{}.properties", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\nsasl.username=taskstream\nsasl.password=hunter2-hunter2\n").unwrap();
        let cli = KafkaCli::try_parse_from(["svc", "--kafka-config-file", path.to_str().unwrap()]).unwrap();
        assert_eq!(cli.kafka.kafka_config.get("security.protocol"), Some("SASL_SSL"));
        let mut cfg = crate::kafka::client_config(&cli.kafka, "taskstream-test");
        assert_eq!((cfg.get("sasl.mechanism"), cfg.get("client.id")), (Some("SCRAM-SHA-512"), Some("taskstream-test")));
        assert!(!format!("{:?}", cli.kafka).contains("hunter2"), "Debug of the settings shows no secret");
        assert!(cfg.set("debug", "security").create_native_config().is_ok());
        // A malformed file stops the service before it starts, naming the file and the line.
        std::fs::write(&path, "security.protocol=SASL_SSL\nsasl.password hunter2-hunter2\n").unwrap();
        let e = KafkaCli::try_parse_from(["svc", "--kafka-config-file", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(e.contains(&format!("{} line 2: expected name=value", path.display())) && !e.contains("hunter2"), "{e}");
        std::fs::remove_file(&path).unwrap();
        // Without the file (and without KAFKA_CONFIG_* variables, which the test processes do not set).
        if std::env::vars().all(|(k, _)| !k.starts_with("KAFKA_CONFIG_")) {
            assert!(KafkaCli::try_parse_from(["svc"]).unwrap().kafka.kafka_config.is_empty());
        }
    }

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
