//! Reading the log: the settings every reader shares, the read_committed consumer of the rebuild
//! (assigned by hand, every partition) and the batching of the live loop (whose consumer is a
//! group member, see `group`).
//! Imports `model`.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};

use platform::settings::KafkaSettings;

use platform::keys::KeyRing;

use crate::model::{Batch, RawRecord};

/// The settings of every reader of the log: read_committed, nothing committed to Kafka (the offsets
/// live in PostgreSQL), from the start of a partition that has no position, large fetches.
pub fn log_config(kafka: &KafkaSettings, client_id: &str, group: &str) -> ClientConfig {
    let mut cfg = platform::kafka::client_config(kafka, client_id);
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.max.bytes", "52428800");
    cfg
}

/// A read_committed consumer of the log, assigned by hand (offsets live in PostgreSQL).
pub fn log_consumer(kafka: &KafkaSettings, group: &str) -> anyhow::Result<StreamConsumer> {
    Ok(log_config(kafka, group, group).create()?)
}

/// Waits for at least one record, then takes what else arrives within `linger`. Only records of
/// the partitions in `next` at or past their next offset are taken (records below it were applied
/// already; a partition not in `next` is not positioned yet), and no offset twice (librdkafka drops
/// what it fetched before a seek; this holds whatever it delivers). Returns early, possibly empty,
/// when `interrupted` resolves (a rebalance: the caller takes the changes before applying anything).
pub async fn read_batch<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    next: &HashMap<i32, i64>,
    max_batch: usize,
    linger: Duration,
    keys: &KeyRing,
    interrupted: impl Future<Output = ()>,
) -> anyhow::Result<Batch> {
    let mut batch = Batch::default();
    // The next offset to take of each positioned partition, moved on past every record taken.
    let mut next = next.clone();
    tokio::pin!(interrupted);
    let first = tokio::select! {
        m = consumer.recv() => m?,
        () = &mut interrupted => return Ok(batch),
    };
    let deadline = tokio::time::Instant::now() + linger;
    // Copied out of librdkafka's message as soon as it is received (the message borrows the
    // consumer), and only when wanted.
    let mut wanted = |m: &BorrowedMessage<'_>| match next.get_mut(&m.partition()) {
        Some(n) if m.topic() == topic && m.offset() >= *n => {
            *n = m.offset() + 1;
            Some(RawRecord::from_message(m))
        }
        _ => None,
    };
    let mut msg = wanted(&first);
    loop {
        if let Some(raw) = msg.take() {
            batch.push(raw, keys).await?;
        }
        if batch.len() + batch.failed.len() >= max_batch {
            break;
        }
        tokio::select! {
            r = tokio::time::timeout_at(deadline, consumer.recv()) => match r {
                Ok(Ok(m)) => msg = wanted(&m),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            },
            () = &mut interrupted => break,
        }
    }
    Ok(batch)
}
