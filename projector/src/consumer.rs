//! Reading the log from Kafka: the read_committed consumer that the live projector and the
//! rebuild both use (assigned by hand: offsets live in PostgreSQL, never in Kafka), and batching of
//! what it delivers. Depends only on the pure model (`Batch`).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use platform::settings::KafkaSettings;

use crate::model::Batch;

/// A read_committed consumer of the log, assigned by hand (offsets live in PostgreSQL).
pub fn log_consumer(kafka: &KafkaSettings, group: &str) -> anyhow::Result<StreamConsumer> {
    let mut cfg = platform::kafka::client_config(kafka, group);
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.max.bytes", "52428800");
    Ok(cfg.create()?)
}

/// Waits for at least one record, then takes what else arrives within `linger` (records below
/// `next` were applied already and are skipped).
pub async fn read_batch(
    consumer: &StreamConsumer,
    topic: &str,
    next: &HashMap<i32, i64>,
    max_batch: usize,
    linger: Duration,
    keep_raw: bool,
) -> anyhow::Result<Batch> {
    let mut batch = Batch::default();
    let first = consumer.recv().await?;
    let deadline = tokio::time::Instant::now() + linger;
    let mut msg = Some(first.detach());
    loop {
        if let Some(m) = msg.take() {
            if m.topic() == topic && m.offset() >= *next.get(&m.partition()).unwrap_or(&0) {
                batch.push_message(m, keep_raw);
            }
        }
        if batch.len() + batch.failed.len() >= max_batch {
            break;
        }
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => msg = Some(m.detach()),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// Points the consumer at `next` (partition -> offset).
pub fn assign(consumer: &StreamConsumer, topic: &str, next: &HashMap<i32, i64>) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    consumer.assign(&tpl)?;
    Ok(())
}
