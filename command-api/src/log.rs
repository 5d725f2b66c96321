//! The event log port and its Kafka adapter. The writer appends whole batches atomically (one Kafka
//! transaction) and, after a failure or at start, catches up by reading the log (read_committed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use std::sync::{Arc, Mutex};

use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};

use platform::codec::{self, DecodeError, EncodedEvent, Record};
use platform::kafka::QuietEof;
use platform::position::Position;
use platform::settings::KafkaSettings;

/// Next offset to read per partition.
pub type Offsets = HashMap<i32, i64>;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
}

impl From<KafkaError> for LogError {
    fn from(e: KafkaError) -> Self {
        LogError::Unavailable(e.to_string())
    }
}

/// Where the writer appends. One implementation talks to Kafka; tests use an in-memory one.
pub trait EventLog: Send + 'static {
    /// Makes the log writable (fences other writers) and returns immediately if it already is.
    fn connect(&mut self) -> impl std::future::Future<Output = Result<(), LogError>> + Send;
    /// Appends all records atomically; returns each record's position, in order. On error nothing
    /// is known to be appended; the caller must `read_from` its last known offsets to find out.
    fn append(&mut self, records: Vec<EncodedEvent>) -> impl std::future::Future<Output = Result<Vec<Position>, LogError>> + Send;
    /// Reads every committed record from `from` to the end, calling `apply` for each, and returns
    /// the offsets after the last one read.
    fn read_from(
        &mut self,
        from: Offsets,
        apply: Box<dyn FnMut(Position, Result<Record, DecodeError>) + Send>,
    ) -> impl std::future::Future<Output = Result<Offsets, LogError>> + Send;
}

#[derive(Debug, Clone)]
pub struct KafkaLogSettings {
    pub kafka: KafkaSettings,
    pub transactional_id: String,
    pub transaction_timeout: Duration,
}

pub struct KafkaLog {
    settings: KafkaLogSettings,
    producer: Option<Arc<BaseProducer<TxnContext>>>,
}

impl KafkaLog {
    pub fn new(settings: KafkaLogSettings) -> Self {
        Self { settings, producer: None }
    }

    fn op_timeout(&self) -> Duration {
        self.settings.transaction_timeout / 2
    }
}

impl EventLog for KafkaLog {
    async fn connect(&mut self) -> Result<(), LogError> {
        if self.producer.is_some() {
            return Ok(());
        }
        platform::kafka::ensure_topics(&self.settings.kafka).await.map_err(|e| LogError::Unavailable(format!("{e:#}")))?;
        let mut cfg = platform::kafka::client_config(&self.settings.kafka, "taskstream-command-api");
        let txn_ms = self.settings.transaction_timeout.as_millis().to_string();
        cfg.set("transactional.id", &self.settings.transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // No linger: a batch is already one transaction, and with linger.ms > 0 librdkafka's
            // flush inside commit_transaction often waited ~100 ms (measured with `loadgen
            // txn-probe`: commits of 100 ms with linger.ms=1, 2-30 ms with 0).
            .set("linger.ms", "0")
            // Back-to-back transactions meet CONCURRENT_TRANSACTIONS while the coordinator still
            // writes the previous markers; retry that quickly, and never wait long between tries
            // (max 100 ms put p99 command latency at 1 000/s at ~130 ms, max 10 ms at ~65-95 ms).
            .set("retry.backoff.ms", "5")
            .set("retry.backoff.max.ms", "10")
            .set("transaction.timeout.ms", &txn_ms)
            .set("message.timeout.ms", &txn_ms)
            .set("queue.buffering.max.messages", "200000");
        // A BaseProducer driven from the appending thread: rdkafka's threaded producers poll on a
        // 100 ms cycle, which made every commit_transaction (it flushes) take ~100 ms.
        let producer: Arc<BaseProducer<TxnContext>> = Arc::new(cfg.create_with_context(TxnContext::default())?);
        let timeout = self.op_timeout();
        let p = producer.clone();
        // Fences any other instance with the same transactional.id and completes its open transaction.
        tokio::task::spawn_blocking(move || p.init_transactions(timeout)).await.map_err(|e| LogError::Unavailable(e.to_string()))??;
        tracing::info!(transactional_id = %self.settings.transactional_id, "transactional producer ready");
        self.producer = Some(producer);
        Ok(())
    }

    async fn append(&mut self, records: Vec<EncodedEvent>) -> Result<Vec<Position>, LogError> {
        let producer = self.producer.clone().ok_or_else(|| LogError::Unavailable("not connected".into()))?;
        let topic = self.settings.kafka.task_events_topic.clone();
        let timeout = self.op_timeout();
        let result = tokio::task::spawn_blocking(move || append_in_transaction(&producer, &topic, records, timeout))
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))
            .and_then(|r| r);
        if result.is_err() {
            // Whatever state the transaction is in, a new producer with the same transactional.id
            // resolves it (init_transactions); the caller then reads the log to learn the outcome.
            self.producer = None;
        }
        result
    }

    async fn read_from(&mut self, from: Offsets, apply: Box<dyn FnMut(Position, Result<Record, DecodeError>) + Send>) -> Result<Offsets, LogError> {
        let mut cfg = platform::kafka::client_config(&self.settings.kafka, "taskstream-command-api-restore");
        cfg.set("group.id", format!("{}-restore", self.settings.transactional_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("fetch.max.bytes", "52428800")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer<QuietEof> = cfg.create_with_context(QuietEof)?;
        let topic = self.settings.kafka.task_events_topic.clone();
        let timeout = self.op_timeout();
        tokio::task::spawn_blocking(move || read_to_end(&consumer, &topic, from, apply, timeout)).await.map_err(|e| LogError::Unavailable(e.to_string()))?
    }
}

/// Collects the delivery reports of the transaction in flight: (partition, offset) by record index.
#[derive(Default)]
pub struct TxnContext {
    reports: Mutex<Vec<Option<Result<Position, String>>>>,
}

impl ClientContext for TxnContext {}

impl ProducerContext for TxnContext {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &DeliveryResult<'_>, index: Self::DeliveryOpaque) {
        let report = match result {
            Ok(m) => Ok(Position { partition: m.partition(), offset: m.offset() }),
            Err((e, _)) => Err(e.to_string()),
        };
        if let Ok(mut reports) = self.reports.lock() {
            if let Some(slot) = reports.get_mut(*index) {
                *slot = Some(report);
            }
        }
    }
}

fn append_in_transaction(producer: &BaseProducer<TxnContext>, topic: &str, records: Vec<EncodedEvent>, timeout: Duration) -> Result<Vec<Position>, LogError> {
    let n = records.len();
    *producer.context().reports.lock().map_err(|_| LogError::Unavailable("poisoned".into()))? = vec![None; n];
    producer.begin_transaction()?;
    for (i, r) in records.into_iter().enumerate() {
        let EncodedEvent { key, payload, headers, .. } = r;
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(i)).key(key.as_str()).payload(payload.as_slice()).headers(headers);
        let deadline = Instant::now() + timeout;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) if Instant::now() < deadline => {
                    producer.poll(Duration::from_millis(5));
                    record = back;
                }
                Err((e, _)) => {
                    let _ = producer.abort_transaction(timeout);
                    return Err(e.into());
                }
            }
        }
    }
    // Serve the delivery reports on this thread until every record is acknowledged, then commit.
    // (rdkafka's flush() and the flush inside commit_transaction() wait for the in-flight count to
    // reach zero, which only happens once the reports are polled: left to them, every commit took
    // 100 ms, one flush slice. Polling here makes the commit's own flush a no-op.)
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    // BaseProducer::poll(t) keeps polling until t has passed, and waits in whole milliseconds: a
    // poll(1 ms) spun on the CPU for the whole wait (45% of the command API's CPU at saturation in a
    // perf profile). Serve what is there without waiting, then sleep briefly.
    while producer.in_flight_count() > 0 {
        if Instant::now() > deadline {
            let _ = producer.abort_transaction(timeout);
            return Err(LogError::Unavailable("timed out waiting for the broker to acknowledge the records".into()));
        }
        producer.poll(Duration::ZERO);
        if producer.in_flight_count() > 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    let t1 = t0.elapsed();
    if let Err(e) = producer.commit_transaction(timeout) {
        let _ = producer.abort_transaction(timeout);
        return Err(e.into());
    }
    tracing::debug!(flush_ms = t1.as_secs_f64() * 1e3, total_ms = t0.elapsed().as_secs_f64() * 1e3, "appended");
    producer.poll(Duration::ZERO);
    let reports = std::mem::take(&mut *producer.context().reports.lock().map_err(|_| LogError::Unavailable("poisoned".into()))?);
    reports
        .into_iter()
        .map(|r| match r {
            Some(Ok(p)) => Ok(p),
            Some(Err(e)) => Err(LogError::Unavailable(format!("delivery failed after commit: {e}"))),
            None => Err(LogError::Unavailable("delivery report missing after commit".into())),
        })
        .collect()
}

fn read_to_end(
    consumer: &BaseConsumer<QuietEof>,
    topic: &str,
    mut next: Offsets,
    mut apply: Box<dyn FnMut(Position, Result<Record, DecodeError>) + Send>,
    timeout: Duration,
) -> Result<Offsets, LogError> {
    let partitions = platform::kafka::partitions(consumer, topic, timeout).map_err(|e| LogError::Unavailable(format!("{e:#}")))?;
    let mut tpl = TopicPartitionList::new();
    let mut pending = Vec::new();
    for p in &partitions {
        let (_, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
        let from = *next.entry(*p).or_insert(0);
        if from < high {
            tpl.add_partition_offset(topic, *p, Offset::Offset(from))?;
            pending.push(*p);
        }
    }
    if pending.is_empty() {
        return Ok(next);
    }
    consumer.assign(&tpl)?;
    let mut last_progress = Instant::now();
    let mut count: u64 = 0;
    let started = Instant::now();
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let pos = Position { partition: m.partition(), offset: m.offset() };
                next.insert(pos.partition, pos.offset + 1);
                apply(pos, codec::decode_record(m.key(), m.headers(), m.payload()));
                count += 1;
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.retain(|x| *x != p);
                if let Ok(position) = consumer.position() {
                    if let Some(Offset::Offset(o)) = position.find_partition(topic, p).map(|e| e.offset()) {
                        next.insert(p, o.max(*next.get(&p).unwrap_or(&0)));
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error.message = %e, "error while reading the log");
                if last_progress.elapsed() > timeout {
                    return Err(e.into());
                }
            }
            None if last_progress.elapsed() > timeout => {
                return Err(LogError::Unavailable("timed out reading the log".into()));
            }
            None => {}
        }
    }
    if count > 0 {
        tracing::info!(events = count, elapsed_ms = started.elapsed().as_millis() as u64, "read the log");
    }
    Ok(next)
}
