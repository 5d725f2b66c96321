//! High watermarks of the log, for the `projections` query. Behind a trait so tests can use a fake;
//! the Kafka implementation asks the brokers (blocking librdkafka calls, so on the blocking pool)
//! and caches each answer for a second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};

use platform::settings::KafkaSettings;

/// Where the log ends, per partition.
#[async_trait::async_trait]
pub trait Watermarks: Send + Sync {
    /// The high watermark (the offset the next record will get; with `read_committed`, the last
    /// stable offset) of each of `partitions` of `topic`.
    async fn high_watermarks(&self, topic: &str, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>>;
}

type Key = (String, Vec<i32>);

pub struct KafkaWatermarks {
    consumer: Arc<BaseConsumer>,
    cache: moka::future::Cache<Key, Arc<HashMap<i32, i64>>>,
    /// Budget for one whole answer (all partitions).
    timeout: Duration,
    /// When the brokers last failed to answer: for a second after, fail at once instead of making
    /// every query wait for the timeout again.
    last_failure: Mutex<Option<Instant>>,
}

const CACHE_TTL: Duration = Duration::from_secs(1);

impl KafkaWatermarks {
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        Self::with_timeout(settings, Duration::from_millis(1500))
    }

    pub fn with_timeout(settings: &KafkaSettings, timeout: Duration) -> anyhow::Result<Self> {
        let mut cfg = platform::kafka::client_config(settings, "taskstream-query-api");
        // No group.id: this consumer never subscribes, it only asks for offsets.
        cfg.set("isolation.level", "read_committed");
        Ok(Self {
            consumer: Arc::new(cfg.create().context("creating the Kafka client for watermarks")?),
            cache: moka::future::Cache::builder().time_to_live(CACHE_TTL).max_capacity(64).build(),
            timeout,
            last_failure: Mutex::new(None),
        })
    }

    fn recently_failed(&self) -> bool {
        let last = *self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        last.is_some_and(|t| t.elapsed() < CACHE_TTL)
    }

    async fn fetch(&self, topic: String, partitions: Vec<i32>) -> anyhow::Result<HashMap<i32, i64>> {
        let consumer = self.consumer.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + timeout;
            let mut out = HashMap::with_capacity(partitions.len());
            let result = partitions.iter().try_for_each(|&p| {
                let left = deadline.saturating_duration_since(Instant::now());
                anyhow::ensure!(!left.is_zero(), "Kafka did not answer within {timeout:?}");
                let (_low, high) = consumer.fetch_watermarks(&topic, p, left).with_context(|| format!("watermarks of {topic}/{p}"))?;
                out.insert(p, high);
                Ok(())
            });
            // Serve the client's queued events (connection errors) so they do not pile up.
            for _ in 0..1000 {
                if consumer.poll(Duration::ZERO).is_none() {
                    break;
                }
            }
            result.map(|()| out)
        })
        .await
        .context("watermark task")?
    }
}

#[async_trait::async_trait]
impl Watermarks for KafkaWatermarks {
    async fn high_watermarks(&self, topic: &str, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>> {
        if partitions.is_empty() {
            return Ok(HashMap::new());
        }
        if self.recently_failed() {
            anyhow::bail!("Kafka failed to answer less than {CACHE_TTL:?} ago");
        }
        let key: Key = (topic.to_owned(), partitions.to_vec());
        // Concurrent callers share one fetch; only answers are cached, never failures.
        let answer = self.cache.try_get_with(key.clone(), async move { self.fetch(key.0, key.1).await.map(Arc::new) }).await;
        match answer {
            Ok(map) => Ok((*map).clone()),
            Err(e) => {
                *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                Err(anyhow::anyhow!("{e:#}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_kafka() -> KafkaSettings {
        // Nothing listens on port 1: every request fails with "connection refused".
        KafkaSettings {
            kafka_brokers: "127.0.0.1:1".into(),
            task_events_topic: "task-events".into(),
            task_events_partitions: 1,
            task_events_replication: 1,
            kafka_config: Default::default(),
            data_keys_erasure_bound_ms: 86_400_000,
        }
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_an_error_within_the_budget_and_then_fails_fast() {
        let w = KafkaWatermarks::with_timeout(&unreachable_kafka(), Duration::from_millis(300)).unwrap();
        let started = Instant::now();
        assert!(w.high_watermarks("task-events", &[0, 1, 2]).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        // The next call inside the second does not wait for the brokers again.
        let again = Instant::now();
        assert!(w.high_watermarks("task-events", &[0, 1, 2]).await.is_err());
        assert!(again.elapsed() < Duration::from_millis(100), "took {:?}", again.elapsed());
        // Nothing to ask: no broker needed.
        assert_eq!(w.high_watermarks("task-events", &[]).await.unwrap(), HashMap::new());
    }

    /// Against the broker of `./dev test` (`KAFKA_BROKERS` is required): a topic of its own,
    /// three records in partition 1, none in partition 0.
    #[tokio::test]
    async fn a_real_broker_reports_where_each_partition_ends() {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::producer::{FutureProducer, FutureRecord};

        let brokers = test_support::required_env("KAFKA_BROKERS");
        let topic = format!("query-api-test-{}", uuid::Uuid::new_v4().simple());
        let settings = KafkaSettings { kafka_brokers: brokers, task_events_topic: topic.clone(), ..unreachable_kafka() };
        let admin: AdminClient<DefaultClientContext> = platform::kafka::client_config(&settings, "query-api-test").create().unwrap();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for r in admin.create_topics(&[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))], &opts).await.unwrap() {
            r.unwrap();
        }
        let producer: FutureProducer = platform::kafka::client_config(&settings, "query-api-test").create().unwrap();
        for i in 0..3 {
            let record = FutureRecord::to(&topic).partition(1).key("k").payload("v");
            producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap_or_else(|e| panic!("record {i}: {e}"));
        }
        let w = KafkaWatermarks::with_timeout(&settings, Duration::from_secs(5)).unwrap();
        // A new topic's metadata may take a moment to reach every broker: poll with a deadline.
        let deadline = Instant::now() + Duration::from_secs(20);
        let highs = loop {
            match w.high_watermarks(&topic, &[0, 1]).await {
                Ok(h) => break h,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("not yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no watermarks: {e:#}"),
            }
        };
        admin.delete_topics(&[&topic], &opts).await.ok();
        assert_eq!(highs, HashMap::from([(0, 0), (1, 3)]));
    }
}
