//! High watermarks of the log, for the `projections` query (cached for a second).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use platform::settings::KafkaSettings;

#[async_trait::async_trait]
pub trait Watermarks: Send + Sync {
    async fn high_watermarks(&self, topic: &str, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>>;
}

pub struct KafkaWatermarks {
    consumer: Arc<BaseConsumer>,
    cache: moka::future::Cache<(String, i32), i64>,
}

impl KafkaWatermarks {
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        let mut cfg = platform::kafka::client_config(settings, "taskstream-query-api");
        cfg.set("isolation.level", "read_committed");
        Ok(Self {
            consumer: Arc::new(cfg.create()?),
            cache: moka::future::Cache::builder().time_to_live(Duration::from_secs(1)).max_capacity(10_000).build(),
        })
    }
}

#[async_trait::async_trait]
impl Watermarks for KafkaWatermarks {
    async fn high_watermarks(&self, topic: &str, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>> {
        let mut out = HashMap::new();
        for p in partitions {
            let key = (topic.to_owned(), *p);
            let consumer = self.consumer.clone();
            let t = topic.to_owned();
            let p = *p;
            let high = self
                .cache
                .try_get_with(key, async move {
                    tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&t, p, Duration::from_secs(2)).map(|(_, h)| h))
                        .await
                        .map_err(|e| anyhow::anyhow!(e))?
                        .map_err(anyhow::Error::from)
                })
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            out.insert(p, high);
        }
        Ok(out)
    }
}
