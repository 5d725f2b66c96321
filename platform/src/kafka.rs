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

/// Settings every client of ours shares.
pub fn client_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.kafka_brokers)
        .set("client.id", client_id)
        .set("socket.keepalive.enable", "true")
        .set("reconnect.backoff.max.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "30000");
    c
}

/// Creates `task-events`, its dead-letter topic and the command API's ownership and snapshot topics
/// if they do not exist yet.
pub async fn ensure_topics(settings: &KafkaSettings) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(settings, "taskstream-admin").create()?;
    let dlq = settings.dlq_topic();
    let (owners, snapshots) = (settings.owners_topic(), settings.snapshots_topic());
    let replication = || TopicReplication::Fixed(settings.task_events_replication);
    let topics = [
        // The log is the source of truth: never delete it by age or size.
        NewTopic::new(&settings.task_events_topic, settings.task_events_partitions, replication())
            .set("min.insync.replicas", if settings.task_events_replication > 1 { "2" } else { "1" })
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
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(15)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(topic) => tracing::info!(topic, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// A client context that logs through `tracing` and keeps quiet about partition EOF, which the
/// readers that read "to the end of the log" ask for on purpose.
pub struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let eof = matches!(error, rdkafka::error::KafkaError::PartitionEOF(_) | rdkafka::error::KafkaError::Global(RDKafkaErrorCode::PartitionEOF));
        if !eof {
            tracing::error!(error.message = %error, reason, "kafka client error");
        }
    }
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
/// shows within about two periods, without waiting for a command to fail.
pub fn watch_brokers(settings: &KafkaSettings, client_id: &str, every: Duration) -> anyhow::Result<Reachability> {
    let consumer: Arc<BaseConsumer<QuietEof>> = Arc::new(client_config(settings, client_id).create_with_context(QuietEof)?);
    let reachable = Reachability(Arc::new(AtomicBool::new(false)));
    let flag = reachable.clone();
    let topic = settings.task_events_topic.clone();
    tokio::spawn(async move {
        loop {
            let (c, t) = (consumer.clone(), topic.clone());
            let ok = tokio::task::spawn_blocking(move || c.fetch_metadata(Some(&t), every).is_ok()).await.unwrap_or(false);
            if ok != flag.is_reachable() {
                if ok {
                    tracing::info!("Kafka brokers reachable");
                } else {
                    tracing::warn!("Kafka brokers unreachable (metadata request failed); not ready");
                }
            }
            flag.0.store(ok, Ordering::Release);
            metrics::gauge!("kafka_brokers_reachable").set(if ok { 1.0 } else { 0.0 });
            tokio::time::sleep(every).await;
        }
    });
    Ok(reachable)
}
