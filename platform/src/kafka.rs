//! Kafka client set-up shared by the services.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaErrorCode;

use crate::settings::KafkaSettings;

/// Settings every client of ours shares: the brokers, the client's name, our defaults, then the
/// operator's properties (`KAFKA_CONFIG_FILE` / `KAFKA_CONFIG_*`: security, credentials, tuning),
/// which may change the defaults but not the brokers or the name (refused when they are read, as are
/// the settings callers add after this for correctness: `platform::kafka_properties::RESERVED`).
pub fn client_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("socket.keepalive.enable", "true").set("reconnect.backoff.max.ms", "1000").set("topic.metadata.refresh.interval.ms", "30000");
    settings.kafka_config.apply_to(&mut c);
    c.set("bootstrap.servers", &settings.kafka_brokers).set("client.id", client_id);
    c
}

/// Creates `task-events`, its dead-letter topic, the command API's ownership and snapshot topics and
/// the data keys topic
/// if they do not exist yet.
pub async fn ensure_topics(settings: &KafkaSettings) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(settings, "taskstream-admin").create()?;
    let dlq = settings.dlq_topic();
    let (owners, snapshots, updates, keys) = (settings.owners_topic(), settings.snapshots_topic(), settings.updates_topic(), settings.keys_topic());
    let bound = crate::keys::erasure_bound(settings).as_millis().to_string();
    let delete_delay = (crate::keys::erasure_bound(settings).as_millis() / 10).min(60_000).to_string();
    let replication = || TopicReplication::Fixed(settings.task_events_replication);
    let min_insync = if settings.task_events_replication > 1 { "2" } else { "1" };
    let topics = [
        // The log is the source of truth: never delete it by age or size.
        NewTopic::new(&settings.task_events_topic, settings.task_events_partitions, replication())
            .set("min.insync.replicas", min_insync)
            .set("retention.ms", "-1")
            .set("retention.bytes", "-1"),
        NewTopic::new(&dlq, settings.task_events_partitions, replication()),
        // Small and only the latest value per key matters: compact often.
        NewTopic::new(&owners, 1, replication()).set("cleanup.policy", "compact").set("segment.ms", "600000").set("min.cleanable.dirty.ratio", "0.1"),
        // One snapshot per partition (in chunks); older snapshots are compacted away.
        NewTopic::new(&snapshots, settings.task_events_partitions, replication())
            .set("cleanup.policy", "compact")
            .set("segment.ms", "600000")
            .set("min.cleanable.dirty.ratio", "0.1")
            .set("max.message.bytes", "8388608"),
        // The current state of every task (written in the log's transactions, partition p with
        // partition p): compacted, so a consumer reading it from the start gets one record per
        // live task; tombstones stay a day so a consumer that catches up within a day sees the
        // deletions. Hourly segments and a dirty ratio of 0.2 keep the duplicates few without
        // recompacting a large topic all the time.
        NewTopic::new(&updates, settings.task_events_partitions, replication())
            .set("cleanup.policy", "compact")
            .set("min.insync.replicas", min_insync)
            .set("segment.ms", "3600000")
            .set("min.cleanable.dirty.ratio", "0.2")
            .set("delete.retention.ms", "86400000"),
        // The users' data keys, wrapped: an erasure's tombstone must make the key's record go
        // from disk within a known time (`keys::erasure_bound`), so segments roll and are
        // compacted within the bound, and the replaced files go soon after.
        NewTopic::new(&keys, 1, replication())
            .set("cleanup.policy", "compact")
            .set("min.insync.replicas", min_insync)
            .set("segment.ms", &bound)
            .set("max.compaction.lag.ms", &bound)
            .set("min.cleanable.dirty.ratio", "0.01")
            .set("delete.retention.ms", &bound)
            .set("file.delete.delay.ms", &delete_delay),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(15)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(topic) => tracing::info!(topic, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    // A writer writes the state of partition p's tasks to partition p of the current-state topic:
    // one made elsewhere with other partitions than the log would fail (or mix) those writes.
    let consumer: BaseConsumer = client_config(settings, "taskstream-admin").create()?;
    let (events, timeout) = (settings.task_events_topic.clone(), Duration::from_secs(10));
    let (log, current) = tokio::task::spawn_blocking(move || {
        // A topic just created may take a moment to show in every broker's metadata.
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let counts = partitions(&consumer, &events, timeout).and_then(|log| Ok((log.len(), partitions(&consumer, &updates, timeout)?.len())));
            match counts {
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                other => return other,
            }
        }
    })
    .await??;
    if log != current {
        anyhow::bail!(
            "the current-state topic {} has {current} partitions but the log {} has {log}: they must have as many (recreate {} with {log})",
            settings.updates_topic(),
            settings.task_events_topic,
            settings.updates_topic()
        );
    }
    Ok(())
}

/// Deletes the log and every topic [`ensure_topics`] creates beside it (benchmarks and chaos runs
/// clean up after themselves: a 1M-event backlog left behind takes gigabytes). A topic that does
/// not exist is not an error; other failures are logged, not returned.
pub async fn delete_topics(settings: &KafkaSettings) {
    let admin: AdminClient<DefaultClientContext> = match client_config(settings, "taskstream-admin").create() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error.message = %e, "could not delete the run's topics");
            return;
        }
    };
    let names = [
        settings.task_events_topic.clone(),
        settings.dlq_topic(),
        settings.owners_topic(),
        settings.snapshots_topic(),
        settings.updates_topic(),
        settings.keys_topic(),
    ];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(15)));
    match admin.delete_topics(&names, &opts).await {
        Ok(results) => {
            for r in results {
                if let Err((topic, code)) = r {
                    if code != RDKafkaErrorCode::UnknownTopicOrPartition {
                        tracing::warn!(topic, error.message = %code, "could not delete a topic");
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error.message = %e, "could not delete the run's topics"),
    }
}

/// A client context that logs through `tracing` and keeps quiet about partition EOF, which the
/// readers that read "to the end of the log" ask for on purpose.
pub struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let eof = matches!(error, rdkafka::error::KafkaError::PartitionEOF(_) | rdkafka::error::KafkaError::Global(RDKafkaErrorCode::PartitionEOF));
        if is_authentication_error(&error) {
            tracing::error!(error.message = %error, reason, "{AUTHENTICATION_FAILED}");
        } else if !eof {
            tracing::error!(error.message = %error, reason, "kafka client error");
        }
    }
}

/// What the services log when the brokers refuse their credentials or TLS handshake (they stay not
/// ready and keep trying: credentials may be fixed on the broker's side).
pub const AUTHENTICATION_FAILED: &str =
    "Kafka refused to authenticate this client: check KAFKA_CONFIG_* / KAFKA_CONFIG_FILE (security.protocol, sasl.mechanism, sasl.username, sasl.password, ssl.ca.location)";

fn is_authentication_error(error: &rdkafka::error::KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed | RDKafkaErrorCode::SSL | RDKafkaErrorCode::UnsupportedSASLMechanism
        )
    )
}

impl ConsumerContext for QuietEof {}

/// The partitions of a topic (blocking metadata call; run it off the async threads).
pub fn partitions<C: ConsumerContext, K: Consumer<C>>(consumer: &K, topic: &str, timeout: Duration) -> anyhow::Result<Vec<i32>> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let t = md.topics().iter().find(|t| t.name() == topic).ok_or_else(|| anyhow::anyhow!("topic {topic} not found"))?;
    if let Some(err) = t.error() {
        anyhow::bail!("topic {topic}: {:?}", err);
    }
    let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ps.sort_unstable();
    if ps.is_empty() {
        anyhow::bail!("topic {topic} has no partitions");
    }
    Ok(ps)
}

/// Assigns partitions to a consumer once its client knows their leaders. librdkafka starts an
/// assigned partition with an offset query; when the leader is not known yet (a fresh client) it
/// retries that query on a fixed 500 ms timer, so every new reader lost half a second before its
/// first record (measured on the keys topic: 510 ms of a 520 ms read). Blocking: the metadata
/// request waits up to `timeout` (an error there only means the old delay).
pub fn assign_when_known<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    tpl: &rdkafka::TopicPartitionList,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<()> {
    let mut topics: Vec<String> = tpl.elements().iter().map(|e| e.topic().to_owned()).collect();
    topics.sort_unstable();
    topics.dedup();
    for topic in &topics {
        if let Err(e) = consumer.fetch_metadata(Some(topic), timeout) {
            tracing::debug!(topic = %topic, error.message = %e, "no metadata before assigning (the first records may wait 500 ms)");
        }
    }
    consumer.assign(tpl)
}

/// Whether the brokers answered lately, as a readiness probe sees it (cheap to clone and read).
#[derive(Clone, Debug)]
pub struct Reachability(Arc<AtomicBool>);

impl Reachability {
    /// Assumed reachable until told otherwise (for a log that is not Kafka, e.g. a test's fake).
    pub fn assumed() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    pub fn is_reachable(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Asks the brokers for the metadata of `topic` every `every` (each request bounded by `every` as
/// well) and keeps the answer in a [`Reachability`]: a broker that is down, paused or unreachable
/// shows within about two periods, without waiting for a command to fail. Each change is logged
/// with librdkafka's last word on the connection (refused, TLS handshake failed, credentials
/// refused: [`AUTHENTICATION_FAILED`]).
pub fn watch_brokers(settings: &KafkaSettings, client_id: &str, every: Duration) -> anyhow::Result<Reachability> {
    let consumer: Arc<BaseConsumer<Probe>> = Arc::new(client_config(settings, client_id).create_with_context(Probe::default())?);
    let reachable = Reachability(Arc::new(AtomicBool::new(false)));
    let flag = reachable.clone();
    let topic = settings.task_events_topic.clone();
    tokio::spawn(async move {
        let mut logged: Option<String> = None;
        loop {
            let (c, t) = (consumer.clone(), topic.clone());
            let ok = tokio::task::spawn_blocking(move || {
                let ok = c.fetch_metadata(Some(&t), every).is_ok();
                // Serves the client's error events (no group, no assignment: nothing else comes).
                for _ in 0..1000 {
                    if c.poll(Duration::ZERO).is_none() {
                        break;
                    }
                }
                ok
            })
            .await
            .unwrap_or(false);
            let why = consumer.context().last_error.lock().map(|mut e| e.take()).unwrap_or_default();
            if ok && !flag.is_reachable() {
                tracing::info!("Kafka brokers reachable");
                logged = None;
            } else if !ok && (flag.is_reachable() || logged.is_none() || why.as_deref().map(gist) != logged.as_deref().map(gist) && why.is_some()) {
                let why = why.unwrap_or_else(|| "no answer to a metadata request".into());
                tracing::warn!(reason = %why, "Kafka brokers unreachable; not ready: {why}");
                logged = Some(why);
            }
            flag.0.store(ok, Ordering::Release);
            metrics::gauge!("kafka_brokers_reachable").set(if ok { 1.0 } else { 0.0 });
            tokio::time::sleep(every).await;
        }
    });
    Ok(reachable)
}

/// A message without its numbers ("after 3ms in state AUTH_REQ"), to tell a new reason from the
/// same one again.
fn gist(message: &str) -> String {
    message.chars().filter(|c| !c.is_ascii_digit()).collect()
}

/// The context of the broker probe: keeps librdkafka's last error (why the brokers do not answer)
/// instead of logging each one (a refused login repeats every reconnect, about once a second).
#[derive(Default)]
struct Probe {
    last_error: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for Probe {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let Ok(mut last) = self.last_error.lock() else { return };
        // "All broker connections are down" follows the reason they are down: keep the reason.
        if last.is_some() && error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            return;
        }
        // Nor does the transport failure that follows a refused login replace it.
        if last.as_deref().is_some_and(|l| l.starts_with(AUTHENTICATION_FAILED)) && !is_authentication_error(&error) {
            return;
        }
        *last = Some(if is_authentication_error(&error) { format!("{AUTHENTICATION_FAILED} ({reason})") } else { format!("{error}: {reason}") });
    }

    /// librdkafka's own log, as rdkafka logs it by default; a refused login or TLS handshake is
    /// also kept as the reason. The error event that says so is not always served before the
    /// next probe (a CI run saw only "all brokers down" for a minute while this line came every
    /// second), so the reason is taken from whichever comes first.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
        if refuses_authentication(message) {
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(format!("{AUTHENTICATION_FAILED} ({message})"));
            }
        }
    }
}

/// Whether a librdkafka log line says the broker refused this client's credentials or TLS
/// handshake.
fn refuses_authentication(message: &str) -> bool {
    ["SASL authentication error", "SSL handshake failed", "Authentication failed"].iter().any(|s| message.contains(s))
}

impl ConsumerContext for Probe {}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::RDKafkaLogLevel;
    use rdkafka::error::KafkaError;
    use rdkafka::ClientContext;

    const REFUSED: &str = "sasl_ssl://127.0.0.1:19094/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 5ms in state AUTH_REQ)";

    fn reason(probe: &Probe) -> Option<String> {
        probe.last_error.lock().unwrap().clone()
    }

    #[test]
    fn a_refused_login_in_librdkafkas_log_is_the_probes_reason_and_stays_it() {
        let probe = Probe::default();
        probe.log(RDKafkaLogLevel::Error, "FAIL", REFUSED);
        let why = reason(&probe).expect("a reason");
        assert!(why.starts_with(AUTHENTICATION_FAILED) && why.contains("invalid credentials"), "{why}");
        // What follows a refused login does not hide it.
        probe.error(KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure), "sasl_ssl://127.0.0.1:19094/bootstrap: Disconnected");
        probe.error(KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        assert_eq!(reason(&probe), Some(why));
    }

    #[test]
    fn other_log_lines_are_not_a_reason_and_other_errors_are() {
        let probe = Probe::default();
        probe.log(RDKafkaLogLevel::Warning, "FAIL", "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused");
        assert_eq!(reason(&probe), None);
        probe.error(KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure), "Connection refused");
        assert!(reason(&probe).is_some_and(|r| r.contains("Connection refused") && !r.starts_with(AUTHENTICATION_FAILED)));
    }
}
