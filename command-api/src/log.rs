//! The event log port and its Kafka adapter, for one partition of `task-events`. A partition's
//! writer appends whole batches atomically (one Kafka transaction of its own transactional producer,
//! `<prefix>-p<partition>`), announces itself as the partition's owner in the same way, records
//! snapshots of its state, and, after a failure or when it takes the partition over, catches up by
//! reading the partition (read_committed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use std::sync::{Arc, Mutex};

use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};

use platform::codec::{self, DecodeError, EncodedEvent, EncodedState, Record};
use platform::kafka::QuietEof;
use platform::keys::DataKeys;
use platform::position::Position;
use platform::settings::KafkaSettings;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    /// Another instance took the partition over (its producer fenced ours): stop writing to it.
    #[error("another instance owns this partition now (our producer was fenced): {0}")]
    Fenced(String),
}

impl From<KafkaError> for LogError {
    fn from(e: KafkaError) -> Self {
        let fenced = matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::TransactionCoordinatorFenced
            )
        );
        if fenced {
            LogError::Fenced(e.to_string())
        } else {
            LogError::Unavailable(e.to_string())
        }
    }
}

/// The owner of a partition as it announces itself (the value of its key in the owners topic).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnerRecord {
    pub partition: i32,
    pub instance: String,
    /// Where peers forward the commands of this partition.
    pub url: String,
    pub since: chrono::DateTime<chrono::Utc>,
}

/// A record of the log that cannot be decoded, with its key (the stream it belongs to) if readable.
#[derive(Debug)]
pub struct Undecodable {
    pub key: Option<String>,
    pub error: DecodeError,
}

/// What a restore is handed for each record read.
pub type Apply = Box<dyn FnMut(Position, Result<Record, Undecodable>) + Send>;

/// A partition of the log, as its writer sees it. One implementation talks to Kafka; tests use an
/// in-memory one.
pub trait EventLog: Send + 'static {
    /// Called once by the writer of `partition` before anything else (a log that serves several
    /// partitions, like the in-memory one of the tests, learns which one it is for).
    fn bind(&mut self, _partition: i32) {}
    /// Makes the partition writable by this writer (fences any previous owner of the partition and
    /// completes or aborts its open transaction); returns at once if it already is.
    fn connect(&mut self) -> impl std::future::Future<Output = Result<(), LogError>> + Send;
    /// Appends all records atomically, and with them (in the same transaction) the `task-updates`
    /// records `states`, in the same partition number; returns each event's position, in order. On
    /// error nothing is known to be appended; the caller must `read_from` its next offset to find out.
    fn append(&mut self, records: Vec<EncodedEvent>, states: Vec<EncodedState>) -> impl std::future::Future<Output = Result<Vec<Position>, LogError>> + Send;
    /// Reads every committed record of the partition from offset `from` to the end, calling `apply`
    /// for each, and returns the offset after the last one read.
    fn read_from(&mut self, from: i64, apply: Apply) -> impl std::future::Future<Output = Result<i64, LogError>> + Send;
    /// Waits until the last append's transaction is closed in the partition (its commit markers are
    /// written), before the writer appends again; the writer calls it after it answered the batch.
    /// A commit is acknowledged once the transaction coordinator has logged it; the markers follow.
    /// A broker that restarts in between can lose them: its coordinator skips the markers of
    /// partitions whose leader it cannot find while it loads (seen with Kafka 4.4 in `./dev
    /// chaos`), leaving the acknowledged transaction open in the partition. The producer's next
    /// transaction would join it, and an abort of that one would take the acknowledged records
    /// along. On error the writer recovers before its next append, as after a failed append: a new
    /// producer (fencing), then the partition read to its end, where a transaction still open is
    /// closed as committed ([`KafkaLog`]'s barrier).
    fn settle(&mut self) -> impl std::future::Future<Output = Result<(), LogError>> + Send {
        async { Ok(()) }
    }
    /// Tells the other instances that this writer owns the partition (in its own transaction, so a
    /// fenced writer cannot).
    fn announce(&mut self, _owner: &OwnerRecord) -> impl std::future::Future<Output = Result<(), LogError>> + Send {
        async { Ok(()) }
    }
    /// Records a snapshot of the writer's state (atomically replacing the previous one).
    fn write_snapshot(&mut self, _snapshot: Vec<u8>) -> impl std::future::Future<Output = Result<(), LogError>> + Send {
        async { Ok(()) }
    }
    /// The latest snapshot recorded for the partition, if any.
    fn read_snapshot(&mut self) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, LogError>> + Send {
        async { Ok(None) }
    }
}

#[derive(Debug, Clone)]
pub struct KafkaLogSettings {
    pub kafka: KafkaSettings,
    /// The partition's producer is `<prefix>-p<partition>`.
    pub transactional_id_prefix: String,
    pub transaction_timeout: Duration,
}

impl KafkaLogSettings {
    pub fn transactional_id(&self, partition: i32) -> String {
        format!("{}-p{partition}", self.transactional_id_prefix)
    }

    /// A read_committed reader of the partition's topics (its group id names the partition and `purpose`).
    fn reader(&self, partition: i32, purpose: &str) -> Result<BaseConsumer<QuietEof>, LogError> {
        let mut cfg = platform::kafka::client_config(&self.kafka, &format!("taskstream-command-api-{purpose}"));
        cfg.set("group.id", format!("{}-{purpose}", self.transactional_id(partition)))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("fetch.max.bytes", "52428800")
            .set("max.partition.fetch.bytes", "16777216")
            // At the end of the partition the broker holds a fetch up to this long before it
            // answers "no more": the default 500 ms made every restore take half a second more.
            .set("fetch.wait.max.ms", "10")
            .set("auto.offset.reset", "earliest");
        Ok(cfg.create_with_context(QuietEof)?)
    }
}

/// Snapshots are split into records of at most this size (the snapshot topic allows 8 MiB).
const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

pub struct KafkaLog {
    settings: KafkaLogSettings,
    partition: i32,
    producer: Option<Arc<BaseProducer<TxnContext>>>,
    /// Chunks of the last snapshot written or read (the extra ones are deleted by the next).
    snapshot_chunks: usize,
    /// Opens the records' sealed fields.
    keys: Arc<dyn DataKeys>,
    /// Sees the partition's end as written, open transactions included (made with `stable`).
    written: Option<Arc<BaseConsumer>>,
    /// A producer whose `init_transactions` timed out: the next `connect` resumes it.
    initializing: Option<Arc<BaseProducer<TxnContext>>>,
    /// Reads the partition's snapshot and its log at a restore, and sees its last stable offset
    /// (read_committed; made when the writer first connects, so it is connected by the time the
    /// restore needs it, and kept: a new consumer per read cost each restore ~100 ms of connecting).
    stable: Option<Arc<BaseConsumer<QuietEof>>>,
    /// The offset of the last event appended, until [`EventLog::settle`] saw its transaction closed.
    unsettled: Option<i64>,
    /// The last stable offset at which this writer last closed an open transaction with a barrier
    /// (one barrier per stuck offset: if it did not help, the transaction is not this writer's).
    closed_at: Option<i64>,
}

impl KafkaLog {
    pub fn new(settings: KafkaLogSettings, partition: i32, keys: Arc<dyn DataKeys>) -> Self {
        Self {
            settings,
            partition,
            producer: None,
            snapshot_chunks: 0,
            keys,
            written: None,
            stable: None,
            unsettled: None,
            initializing: None,
            closed_at: None,
        }
    }

    fn op_timeout(&self) -> Duration {
        self.settings.transaction_timeout / 2
    }

    async fn transact(&mut self, records: Vec<Outgoing>) -> Result<Vec<Position>, LogError> {
        let producer = self.producer.clone().ok_or_else(|| LogError::Unavailable("not connected".into()))?;
        let timeout = self.op_timeout();
        let result = tokio::task::spawn_blocking(move || append_in_transaction(&producer, records, timeout))
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
}

impl KafkaLog {
    /// The partition's read_committed reader (see `stable`).
    fn reader(&mut self) -> Result<Arc<BaseConsumer<QuietEof>>, LogError> {
        let (settings, partition) = (&self.settings, self.partition);
        made_once(&mut self.stable, || settings.reader(partition, "stable"))
    }

    /// Sees the partition's end as written, open transactions included.
    fn written(&mut self) -> Result<Arc<BaseConsumer>, LogError> {
        let kafka = &self.settings.kafka;
        made_once(&mut self.written, || {
            Ok(platform::kafka::client_config(kafka, "taskstream-command-api-end").set("isolation.level", "read_uncommitted").create()?)
        })
    }

    /// Commits a barrier ([`codec::BARRIER_TYPE`]) in the partition. Its commit marker, written for
    /// this producer id, closes the transaction the partition still holds open from an earlier
    /// epoch of the same producer (the same transactional id): the records of that transaction
    /// become committed. Every answer given for them was either a success (their commit had been
    /// acknowledged) or a 503 whose outcome was unknown, so committing them contradicts no answer,
    /// and the restore that follows reads them before anything is decided. A writer that is no
    /// longer the partition's owner cannot commit it (its epoch is fenced).
    async fn close_open_transaction(&mut self, open_from: i64, written_to: i64) -> Result<(), LogError> {
        let (payload, headers) = codec::encode_barrier(self.partition, open_from, written_to);
        let barrier = Outgoing {
            topic: self.settings.kafka.task_events_topic.clone(),
            partition: self.partition,
            key: None,
            payload: Some(payload),
            headers: headers.clone(),
        };
        // The open transaction also wrote the same partition of task-updates: close it there too,
        // with a tombstone (a compacted topic needs a key; no task has this one).
        let updates = Outgoing {
            topic: self.settings.kafka.updates_topic(),
            partition: self.partition,
            key: Some(codec::BARRIER_TYPE.to_owned()),
            payload: None,
            headers,
        };
        let positions = self.transact(vec![barrier, updates]).await?;
        metrics::counter!("command_api_barriers_total").increment(1);
        tracing::warn!(partition = self.partition, open_from, written_to, barrier = ?positions.first().map(|p| p.offset), "closed the open transaction with a barrier");
        Ok(())
    }
}

/// A record to send in a transaction.
struct Outgoing {
    topic: String,
    partition: i32,
    /// `None`: a record of no stream (a barrier).
    key: Option<String>,
    /// `None` deletes the key (a tombstone, in a compacted topic).
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

impl EventLog for KafkaLog {
    async fn connect(&mut self) -> Result<(), LogError> {
        if self.producer.is_some() {
            return Ok(());
        }
        // The restore's consumers are made first: they connect while the previous owner is fenced.
        self.reader()?;
        self.written()?;
        // The topics exist: the instance created them (if needed) before it joined the group.
        let transactional_id = self.settings.transactional_id(self.partition);
        let mut cfg = platform::kafka::client_config(&self.settings.kafka, "taskstream-command-api");
        let txn_ms = self.settings.transaction_timeout.as_millis().to_string();
        cfg.set("transactional.id", &transactional_id)
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
            .set("message.max.bytes", "8388608")
            .set("queue.buffering.max.messages", "200000");
        // A BaseProducer driven from the appending thread: rdkafka's threaded producers poll on a
        // 100 ms cycle, which made every commit_transaction (it flushes) take ~100 ms.
        // A producer whose fencing timed out is asked again: a new one would start the fencing
        // over (and fence the first one's half-done attempt), so on a slow broker no attempt
        // ever finished (writes stayed down for minutes after broker kills on a loaded box).
        let producer: Arc<BaseProducer<TxnContext>> = match self.initializing.take() {
            Some(p) => p,
            None => Arc::new(cfg.create_with_context(TxnContext::default())?),
        };
        let timeout = self.op_timeout();
        let p = producer.clone();
        // Fences the previous owner of the partition (same transactional.id) and completes or
        // aborts its open transaction.
        let fenced = tokio::task::spawn_blocking(move || p.init_transactions(timeout)).await.map_err(|e| LogError::Unavailable(e.to_string()))?;
        if let Err(e) = fenced {
            let retriable = match &e {
                KafkaError::Transaction(t) => t.is_retriable() && !t.is_fatal(),
                _ => false,
            };
            if retriable {
                self.initializing = Some(producer);
            }
            return Err(e.into());
        }
        tracing::debug!(transactional_id, "transactional producer ready");
        self.producer = Some(producer);
        Ok(())
    }

    async fn append(&mut self, records: Vec<EncodedEvent>, states: Vec<EncodedState>) -> Result<Vec<Position>, LogError> {
        let topic = &self.settings.kafka.task_events_topic;
        let updates = self.settings.kafka.updates_topic();
        let events = records.len();
        let mut outgoing: Vec<Outgoing> = Vec::with_capacity(events + states.len());
        outgoing.extend(records.into_iter().map(|r| Outgoing {
            topic: topic.clone(),
            partition: self.partition,
            key: Some(r.key),
            payload: Some(r.payload),
            headers: r.headers,
        }));
        // The same partition number as the task's events (the topics have as many partitions).
        outgoing.extend(states.into_iter().map(|s| Outgoing {
            topic: updates.clone(),
            partition: self.partition,
            key: Some(s.key),
            payload: s.payload,
            headers: s.headers,
        }));
        let mut positions = self.transact(outgoing).await?;
        positions.truncate(events);
        self.unsettled = positions.last().map(|p| p.offset);
        Ok(positions)
    }

    async fn settle(&mut self) -> Result<(), LogError> {
        let Some(last) = self.unsettled.take() else { return Ok(()) };
        let stable = self.reader()?;
        let (topic, partition, timeout) = (self.settings.kafka.task_events_topic.clone(), self.partition, self.op_timeout());
        let settled = tokio::task::spawn_blocking(move || wait_closed(&stable, &topic, partition, last, OPEN_TRANSACTION_GRACE, timeout))
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))
            .and_then(|r| r);
        if settled.is_err() {
            // The recovery starts with a new producer (see `EventLog::settle`).
            self.producer = None;
        }
        settled
    }

    async fn read_from(&mut self, from: i64, apply: Apply) -> Result<i64, LogError> {
        let consumer = self.reader()?;
        let written = self.written()?;
        let topic = self.settings.kafka.task_events_topic.clone();
        let timeout = self.op_timeout();
        let partition = self.partition;
        let find = |wait: Duration| {
            let (consumer, written, topic) = (consumer.clone(), written.clone(), topic.clone());
            async move {
                tokio::task::spawn_blocking(move || stable_end(&consumer, &written, &topic, partition, wait, timeout))
                    .await
                    .map_err(|e| LogError::Unavailable(e.to_string()))?
            }
        };
        // Fencing completed or aborted whatever the previous owner had open, so the partition's
        // end is stable at once; a transaction still open after that is one Kafka left open (its
        // marker is missing) and would block every read_committed reader for good: close it.
        let end = match find(OPEN_TRANSACTION_GRACE).await? {
            End::Stable(end) => end,
            End::Open { stable, high } => {
                // One barrier per open offset: a transaction it did not close (another producer
                // id's) is waited for, never closed twice.
                if self.closed_at != Some(stable) {
                    tracing::warn!(
                        partition,
                        stable,
                        high,
                        "a transaction is still open on the partition after fencing, and Kafka does not complete it; closing it with a barrier"
                    );
                    self.close_open_transaction(stable, high).await?;
                    self.closed_at = Some(stable);
                }
                match find(timeout).await? {
                    End::Stable(end) => end,
                    End::Open { stable, high } => return Err(still_open(partition, stable, high)),
                }
            }
        };
        let keys = self.keys.clone();
        tokio::task::spawn_blocking(move || {
            let read = read_to_end(&consumer, &topic, partition, from, end, apply, timeout, &*keys);
            unassign(&consumer);
            read
        })
        .await
        .map_err(|e| LogError::Unavailable(e.to_string()))?
    }

    async fn announce(&mut self, owner: &OwnerRecord) -> Result<(), LogError> {
        let payload = serde_json::to_vec(owner).map_err(|e| LogError::Unavailable(e.to_string()))?;
        let record = Outgoing {
            topic: self.settings.kafka.owners_topic(),
            partition: 0,
            key: Some(self.partition.to_string()),
            payload: Some(payload),
            headers: OwnedHeaders::new(),
        };
        self.transact(vec![record]).await.map(|_| ())
    }

    async fn write_snapshot(&mut self, snapshot: Vec<u8>) -> Result<(), LogError> {
        let topic = self.settings.kafka.snapshots_topic();
        let id = uuid::Uuid::now_v7().to_string();
        let chunks: Vec<&[u8]> = snapshot.chunks(SNAPSHOT_CHUNK_BYTES).collect();
        let n = chunks.len();
        let mut records: Vec<Outgoing> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| Outgoing {
                topic: topic.clone(),
                partition: self.partition,
                key: Some(format!("{}:{i}", self.partition)),
                payload: Some(c.to_vec()),
                headers: OwnedHeaders::new()
                    .insert(Header { key: "snapshot_id", value: Some(id.as_str()) })
                    .insert(Header { key: "chunks", value: Some(n.to_string().as_str()) }),
            })
            .collect();
        // The previous snapshot's extra chunks are deleted in the same transaction.
        for i in n..self.snapshot_chunks {
            records.push(Outgoing {
                topic: topic.clone(),
                partition: self.partition,
                key: Some(format!("{}:{i}", self.partition)),
                payload: None,
                headers: OwnedHeaders::new(),
            });
        }
        self.transact(records).await?;
        self.snapshot_chunks = n;
        Ok(())
    }

    async fn read_snapshot(&mut self) -> Result<Option<Vec<u8>>, LogError> {
        let consumer = self.reader()?;
        let topic = self.settings.kafka.snapshots_topic();
        let timeout = self.op_timeout();
        let partition = self.partition;
        let chunks = tokio::task::spawn_blocking(move || {
            let read = read_snapshot_chunks(&consumer, &topic, partition, timeout);
            unassign(&consumer);
            read
        })
        .await
        .map_err(|e| LogError::Unavailable(e.to_string()))??;
        self.snapshot_chunks = self.snapshot_chunks.max(chunks.len());
        Ok(assemble_snapshot(chunks))
    }
}

/// One chunk of a snapshot as read back: (snapshot id, chunk count, bytes), by chunk index.
type SnapshotChunks = HashMap<usize, (String, usize, Vec<u8>)>;

/// The latest snapshot whose chunks are all present (they are written in one transaction, so the
/// latest value of every key belongs to the same snapshot unless a previous one had more chunks).
fn assemble_snapshot(mut chunks: SnapshotChunks) -> Option<Vec<u8>> {
    let (id, n, _) = chunks.get(&0)?.clone();
    let mut out = Vec::new();
    for i in 0..n {
        let (cid, _, bytes) = chunks.remove(&i)?;
        if cid != id {
            tracing::error!(chunk = i, "snapshot chunks of different snapshots; ignoring the snapshot");
            return None;
        }
        out.extend_from_slice(&bytes);
    }
    Some(out)
}

fn read_snapshot_chunks(consumer: &BaseConsumer<QuietEof>, topic: &str, partition: i32, timeout: Duration) -> Result<SnapshotChunks, LogError> {
    let mut chunks = SnapshotChunks::new();
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    if high <= low {
        return Ok(chunks);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    platform::kafka::assign_when_known(consumer, &tpl, timeout)?;
    let mut last_progress = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let Some(index) = m.key().and_then(|k| std::str::from_utf8(k).ok()).and_then(|k| k.rsplit(':').next()).and_then(|i| i.parse::<usize>().ok())
                else {
                    continue;
                };
                match m.payload() {
                    None => {
                        chunks.remove(&index);
                    }
                    Some(bytes) => {
                        let header = |name: &str| {
                            m.headers()
                                .and_then(|h| h.iter().find(|x| x.key == name))
                                .and_then(|x| x.value)
                                .and_then(|v| std::str::from_utf8(v).ok())
                                .map(str::to_owned)
                        };
                        let (Some(id), Some(n)) = (header("snapshot_id"), header("chunks").and_then(|n| n.parse().ok())) else { continue };
                        chunks.insert(index, (id, n, bytes.to_vec()));
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(chunks),
            Some(Err(e)) if last_progress.elapsed() > timeout => return Err(e.into()),
            Some(Err(e)) => tracing::warn!(error.message = %e, "error while reading the snapshot"),
            None if last_progress.elapsed() > timeout => return Err(LogError::Unavailable("timed out reading the snapshot".into())),
            None => {}
        }
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

fn append_in_transaction(producer: &BaseProducer<TxnContext>, records: Vec<Outgoing>, timeout: Duration) -> Result<Vec<Position>, LogError> {
    let n = records.len();
    *producer.context().reports.lock().map_err(|_| LogError::Unavailable("poisoned".into()))? = vec![None; n];
    producer.begin_transaction()?;
    for (i, r) in records.into_iter().enumerate() {
        let Outgoing { topic, partition, key, payload, headers } = r;
        let mut record = BaseRecord::with_opaque_to(&topic, Box::new(i)).partition(partition).headers(headers);
        if let Some(key) = &key {
            record = record.key(key.as_str());
        }
        if let Some(payload) = &payload {
            record = record.payload(payload.as_slice());
        }
        let deadline = Instant::now() + timeout;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) if Instant::now() < deadline => {
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
    // With a writer per partition many of these loops run at once: the pause doubles from 100 µs
    // to 1 ms (acks from the broker take 1-5 ms), so they do not keep the cores busy waking up.
    let mut pause = Duration::from_micros(100);
    while producer.in_flight_count() > 0 {
        if Instant::now() > deadline {
            let _ = producer.abort_transaction(timeout);
            return Err(LogError::Unavailable("timed out waiting for the broker to acknowledge the records".into()));
        }
        producer.poll(Duration::ZERO);
        if producer.in_flight_count() > 0 {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
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

/// Stops fetching what a read was assigned (a kept consumer would otherwise go on fetching the
/// partition in the background).
fn unassign(consumer: &BaseConsumer<QuietEof>) {
    if let Err(e) = consumer.unassign() {
        tracing::debug!(error.message = %e, "could not unassign the reader");
    }
}

/// The client in `slot`, made by `make` the first time.
fn made_once<C>(slot: &mut Option<Arc<C>>, make: impl FnOnce() -> Result<C, LogError>) -> Result<Arc<C>, LogError> {
    if let Some(c) = slot {
        return Ok(c.clone());
    }
    Ok(slot.insert(Arc::new(make()?)).clone())
}

/// Waits until the partition's last stable offset is past `last`, an offset the writer's last
/// transaction wrote and committed: its commit markers are written. Normally they follow the commit
/// within a millisecond or two; after `grace` they are taken as lost.
fn wait_closed(consumer: &BaseConsumer<QuietEof>, topic: &str, partition: i32, last: i64, grace: Duration, timeout: Duration) -> Result<(), LogError> {
    let started = Instant::now();
    let mut polls = 0u32;
    loop {
        let (_, stable) = consumer.fetch_watermarks(topic, partition, timeout)?;
        polls += 1;
        if stable > last {
            tracing::debug!(polls, settle_ms = started.elapsed().as_secs_f64() * 1e3, "settled");
            return Ok(());
        }
        if started.elapsed() > grace {
            return Err(LogError::Unavailable(format!(
                "the transaction that wrote offset {last} of partition {partition} was committed but is still open there (last stable offset {stable}): its commit markers are missing"
            )));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Where the partition ends for the restore: the writer calls this after fencing (which completes
/// or aborts the previous owner's transaction), so the last stable offset is normally the end.
/// Should a transaction still be open, reading now would miss it if it then commits, and the writer
/// would decide on a state without its events: wait up to `wait` for it to close, else answer
/// [`End::Open`] (the caller closes it or stays unavailable). Each offset query may take up to
/// `timeout`.
fn stable_end(
    committed: &BaseConsumer<QuietEof>,
    written: &BaseConsumer,
    topic: &str,
    partition: i32,
    wait: Duration,
    timeout: Duration,
) -> Result<End, LogError> {
    let started = Instant::now();
    let mut warned = false;
    loop {
        let (_, stable) = committed.fetch_watermarks(topic, partition, timeout)?;
        let (_, high) = written.fetch_watermarks(topic, partition, timeout)?;
        if stable >= high {
            return Ok(End::Stable(stable));
        }
        if started.elapsed() > wait {
            return Ok(End::Open { stable, high });
        }
        if !warned {
            tracing::warn!(partition, stable, high, "a transaction is still open on the partition after fencing; waiting for it to complete");
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where a partition ends for a reader that must see everything committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// No transaction is open: the partition is written up to here, all of it settled.
    Stable(i64),
    /// A transaction is open from `stable` (the last stable offset) in records written to `high`.
    Open { stable: i64, high: i64 },
}

fn still_open(partition: i32, stable: i64, high: i64) -> LogError {
    LogError::Unavailable(format!("a transaction is still open on partition {partition} after fencing (stable offset {stable}, written to {high})"))
}

/// How long a transaction may stay open on the partition after fencing before the writer closes it:
/// fencing returns once the previous owner's transaction is completed or aborted, so the end is
/// stable at once unless Kafka left a marker out.
const OPEN_TRANSACTION_GRACE: Duration = Duration::from_secs(3);

/// Reads every committed record of the partition from `next` up to `end` (the stable end the
/// caller found), calling `apply` for each; returns the offset after the last one.
#[allow(clippy::too_many_arguments)]
fn read_to_end(
    consumer: &BaseConsumer<QuietEof>,
    topic: &str,
    partition: i32,
    mut next: i64,
    end: i64,
    mut apply: Apply,
    timeout: Duration,
    keys: &dyn DataKeys,
) -> Result<i64, LogError> {
    if next >= end {
        return Ok(next);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(next))?;
    platform::kafka::assign_when_known(consumer, &tpl, timeout)?;
    let mut last_progress = Instant::now();
    let mut count: u64 = 0;
    let started = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let pos = Position { partition: m.partition(), offset: m.offset() };
                next = pos.offset + 1;
                let rec = codec::decode_record(m.key(), m.headers(), m.payload(), keys)
                    .map_err(|error| Undecodable { key: m.key().and_then(|k| std::str::from_utf8(k).ok()).map(str::to_owned), error });
                apply(pos, rec);
                count += 1;
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // Past transaction markers and aborted records the position is further than the
                // last record read.
                if let Ok(position) = consumer.position() {
                    if let Some(Offset::Offset(o)) = position.find_partition(topic, partition).map(|e| e.offset()) {
                        next = next.max(o);
                    }
                }
                // The end of what the broker serves now; the records up to `end` were committed
                // before the read began, so an end short of it is waited past, never taken.
                if next >= end {
                    break;
                }
                if last_progress.elapsed() > timeout {
                    return Err(LogError::Unavailable(format!("partition {partition} was read to {next}, short of its stable end {end}")));
                }
                tracing::warn!(partition, next, end, "the log ended short of its stable end; reading on");
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
        tracing::info!(partition, events = count, elapsed_ms = started.elapsed().as_millis() as u64, "read the log");
    }
    Ok(next)
}
