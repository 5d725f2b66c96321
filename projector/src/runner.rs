//! The run mode: consume `task-events` (read_committed) from the offsets stored in PostgreSQL and
//! apply it in batches, each batch and its offsets in one transaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;

use platform::codec;
use platform::position::Position;
use platform::settings::KafkaSettings;

use crate::model::{Batch, Recorded, RecordedUser};
use crate::store::{self, Applied, ApplyMode, StoreError};

#[derive(Debug, Clone)]
pub struct RunSettings {
    pub kafka: KafkaSettings,
    pub max_batch: usize,
    pub linger: Duration,
}

pub struct Runner {
    settings: RunSettings,
    pool: PgPool,
    ready: Arc<AtomicBool>,
    /// Woken after a batch recorded reactions.
    reactions: Arc<tokio::sync::Notify>,
}

impl Runner {
    pub fn new(settings: RunSettings, pool: PgPool, ready: Arc<AtomicBool>, reactions: Arc<tokio::sync::Notify>) -> Self {
        Self { settings, pool, ready, reactions }
    }

    /// Runs until `stop` resolves; transient failures (Kafka or PostgreSQL away) are retried with
    /// backoff, never skipped.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if *stop.borrow() {
                return;
            }
            let result = tokio::select! {
                r = self.run_once() => r,
                _ = stop.changed() => return,
            };
            self.ready.store(false, Ordering::Release);
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error.message = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "projector loop failed; restarting it");
                    tokio::select! {
                        _ = tokio::time::sleep(jitter(backoff)) => {},
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn consumer(&self) -> anyhow::Result<StreamConsumer> {
        let mut cfg = platform::kafka::client_config(&self.settings.kafka, "taskstream-projector");
        cfg.set("group.id", "taskstream-projector")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .set("fetch.max.bytes", "52428800");
        Ok(cfg.create()?)
    }

    async fn run_once(&self) -> anyhow::Result<()> {
        platform::kafka::ensure_topics(&self.settings.kafka).await?;
        let topic = self.settings.kafka.task_events_topic.clone();
        let consumer = Arc::new(self.consumer()?);
        let c = consumer.clone();
        let t = topic.clone();
        let partitions = tokio::task::spawn_blocking(move || {
            platform::kafka::partitions(c.as_ref(), &t, Duration::from_secs(10))
        })
        .await??;
        let mut next = store::init_offsets(&self.pool, &topic, &partitions).await?;
        assign(&consumer, &topic, &next)?;
        self.ready.store(true, Ordering::Release);
        tracing::info!(partitions = partitions.len(), "projector consuming from stored offsets");

        loop {
            let batch = self.next_batch(&consumer, &topic, &next).await?;
            if batch.is_empty() {
                continue;
            }
            let to = batch.to.clone();
            let started = Instant::now();
            match self.apply_with_retry(&topic, &batch, &next).await {
                Ok(applied) => {
                    metrics::histogram!("projector_batch_apply_seconds").record(started.elapsed().as_secs_f64());
                    metrics::counter!("projector_events_applied_total").increment(batch.len() as u64);
                    next.extend(to);
                    if applied.reactions > 0 || applied.deliveries > 0 {
                        self.reactions.notify_waiters();
                    }
                }
                Err(StoreError::Fenced { .. }) => {
                    tracing::warn!("offsets moved under us (another projector instance?); re-reading them");
                    next = store::init_offsets(&self.pool, &topic, &partitions).await?;
                    assign(&consumer, &topic, &next)?;
                }
                Err(StoreError::Db(e)) => return Err(e.into()),
            }
        }
    }

    /// Waits for at least one record, then takes what else arrives within `linger`.
    async fn next_batch(&self, consumer: &StreamConsumer, topic: &str, next: &HashMap<i32, i64>) -> anyhow::Result<Batch> {
        let mut batch = Batch::default();
        let first = consumer.recv().await?;
        let deadline = tokio::time::Instant::now() + self.settings.linger;
        let mut msg = Some(first.detach());
        loop {
            if let Some(m) = msg.take() {
                if m.topic() == topic {
                    let position = Position { partition: m.partition(), offset: m.offset() };
                    // Already applied (a redelivery after a re-assignment): skip.
                    if position.offset >= *next.get(&position.partition).unwrap_or(&0) {
                        batch.to.insert(position.partition, position.offset + 1);
                        match codec::decode_record(m.key(), m.headers(), m.payload()) {
                            Ok(codec::Record::Task(envelope)) => batch.tasks.push(Recorded { position, envelope }),
                            Ok(codec::Record::User(envelope)) => batch.users.push(RecordedUser { position, envelope }),
                            Err(e) => {
                                // Dead-lettering with parking of the task's later events is the
                                // projection-lifecycle work; until then the record is logged and
                                // counted, and its offset still advances.
                                metrics::counter!("projector_undecodable_total").increment(1);
                                tracing::error!(partition = position.partition, offset = position.offset, error.message = %e, "skipping an undecodable record");
                            }
                        }
                    }
                }
            }
            if batch.len() >= self.settings.max_batch {
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

    async fn apply_with_retry(
        &self,
        topic: &str,
        batch: &Batch,
        from: &HashMap<i32, i64>,
    ) -> Result<Applied, StoreError> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            match store::apply_batch(&self.pool, topic, batch, from, ApplyMode::Live).await {
                Ok(applied) => return Ok(applied),
                Err(StoreError::Db(e)) if attempt < 8 => {
                    attempt += 1;
                    self.ready.store(false, Ordering::Release);
                    tracing::warn!(error.message = %e, attempt, "applying a batch failed; retrying the same batch");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                other => {
                    self.ready.store(true, Ordering::Release);
                    return other;
                }
            }
        }
    }
}

fn assign(consumer: &StreamConsumer, topic: &str, next: &HashMap<i32, i64>) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    consumer.assign(&tpl)?;
    Ok(())
}

/// Full jitter on top of half the delay: spreads retries of several instances.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    d / 2 + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}
