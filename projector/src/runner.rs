//! The run mode: consume `task-events` (read_committed) from the offsets stored in PostgreSQL and
//! apply it in batches, each batch and its offsets in one transaction (`dlq::apply_live`: dead
//! letters and parking, then `store`). Transient failures are retried with `platform::retry`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use sqlx::PgPool;
use tracing::Instrument;

use domain::DomainEvent as _;
use platform::position::Position;
use platform::retry::{Jitter, Policy};
use platform::settings::KafkaSettings;

use crate::consumer::{assign, log_consumer, read_batch};
use crate::dlq::{self, ApplyError, DeadLetterSink};
use crate::model::{Batch, FailedRecord, RawRecord};
use crate::store::{self, StoreError};

/// Restarting the consume loop after Kafka or PostgreSQL went away: 200 ms doubled up to 10 s,
/// each between half and all of it (spreads the restarts of several instances).
const RESTART: Policy = Policy::new(Duration::from_millis(200), Duration::from_secs(10)).with_jitter(Jitter::Equal);
/// Applying the same batch again after a failure: 100 ms doubled up to 10 s, the same jitter.
const APPLY_RETRY: Policy = Policy::new(Duration::from_millis(100), Duration::from_secs(10)).with_jitter(Jitter::Equal);

#[derive(Debug, Clone)]
pub struct RunSettings {
    pub kafka: KafkaSettings,
    pub database: platform::settings::DatabaseSettings,
    pub max_batch: usize,
    pub linger: Duration,
}

pub struct Runner {
    settings: RunSettings,
    pool: PgPool,
    ready: Arc<AtomicBool>,
    /// Woken after a batch recorded reactions.
    reactions: Arc<tokio::sync::Notify>,
    dead_letters: DeadLetterSink,
    /// Set once a rebuild of projections without stored offsets has been started.
    rebuilding: Arc<AtomicBool>,
}

impl Runner {
    pub fn new(settings: RunSettings, pool: PgPool, ready: Arc<AtomicBool>, reactions: Arc<tokio::sync::Notify>) -> anyhow::Result<Self> {
        let dead_letters = DeadLetterSink::new(&settings.kafka)?;
        Ok(Self { settings, pool, ready, reactions, dead_letters, rebuilding: Arc::default() })
    }

    /// Runs until `stop` resolves; transient failures (Kafka or PostgreSQL away) are retried with
    /// backoff, never skipped.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = RESTART.backoff();
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
                    let delay = backoff.next_delay();
                    tracing::warn!(error.message = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "projector loop failed; restarting it");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }

    async fn run_once(&self) -> anyhow::Result<()> {
        platform::kafka::ensure_topics(&self.settings.kafka).await?;
        let topic = self.settings.kafka.task_events_topic.clone();
        let consumer = Arc::new(log_consumer(&self.settings.kafka, "taskstream-projector")?);
        let c = consumer.clone();
        let t = topic.clone();
        let partitions = tokio::task::spawn_blocking(move || platform::kafka::partitions(c.as_ref(), &t, Duration::from_secs(10))).await??;
        self.rebuild_new_projections(&topic).await?;
        let mut next = store::init_offsets(&self.pool, &topic, &partitions).await?;
        assign(&consumer, &topic, &next)?;
        self.ready.store(true, Ordering::Release);
        tracing::info!(partitions = partitions.len(), "projector consuming from stored offsets");

        loop {
            let batch = read_batch(&consumer, &topic, &next, self.settings.max_batch, self.settings.linger, true).await?;
            if batch.is_empty() {
                continue;
            }
            if let Outcome::Fenced = self.apply(&topic, batch, &mut next).await? {
                tracing::warn!("offsets moved under us (another projector instance, or a rebuild switched tables); re-reading them");
                next = store::init_offsets(&self.pool, &topic, &partitions).await?;
                assign(&consumer, &topic, &next)?;
            }
        }
    }

    /// A projection added in code (no stored offsets) is rebuilt from offset zero in the
    /// background, while the live projector goes on for every projection.
    async fn rebuild_new_projections(&self, topic: &str) -> anyhow::Result<()> {
        if self.rebuilding.load(Ordering::Acquire) {
            return Ok(());
        }
        let pending = crate::rebuild::new_projections(&self.pool, topic).await?;
        if pending.is_empty() {
            return Ok(());
        }
        self.rebuilding.store(true, Ordering::Release);
        let opts = crate::rebuild::Options {
            kafka: self.settings.kafka.clone(),
            database: self.settings.database.clone(),
            projections: pending,
            max_batch: self.settings.max_batch,
            report: crate::rebuild::Report::Log,
            requested_by: "new-projection",
        };
        let flag = self.rebuilding.clone();
        tokio::spawn(async move {
            match crate::rebuild::run(opts, std::future::pending()).await {
                Ok(summary) => tracing::info!("{}", summary.line()),
                Err(e) => {
                    tracing::error!(error.message = %e, "rebuilding the new projections failed; retried at the next restart")
                }
            }
            flag.store(false, Ordering::Release);
        });
        Ok(())
    }

    /// Applies a batch; a batch that fails for good (bad data, a violated constraint) is applied
    /// record by record, and the records that fail alone become dead letters.
    async fn apply(&self, topic: &str, batch: Batch, next: &mut HashMap<i32, i64>) -> anyhow::Result<Outcome> {
        // One span per batch: it continues the trace of the batch's first record and links to the
        // others (a span per record would cost more than applying it).
        let span = tracing::info_span!("apply", records = batch.len(), trace_id = tracing::field::Empty);
        let mut traces = batch.tasks.iter().filter_map(|r| r.envelope.meta.traceparent.as_deref());
        platform::telemetry::continue_trace(&span, traces.next());
        platform::telemetry::link_traces(&span, traces.take(127));
        self.apply_in_span(topic, batch, next).instrument(span).await
    }

    async fn apply_in_span(&self, topic: &str, batch: Batch, next: &mut HashMap<i32, i64>) -> anyhow::Result<Outcome> {
        match self.apply_with_retry(topic, &batch, next).await {
            Ok(Outcome::Applied) => {
                count_consumed(&batch);
                next.extend(batch.to);
                Ok(Outcome::Applied)
            }
            Ok(Outcome::Fenced) => Ok(Outcome::Fenced),
            Err(e) if e.is_deterministic() && batch.len() > 0 => {
                tracing::warn!(error.message = %e, records = batch.len(), "a batch fails for good; applying it record by record to isolate the cause");
                self.apply_one_by_one(topic, batch, next).await
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn apply_one_by_one(&self, topic: &str, batch: Batch, next: &mut HashMap<i32, i64>) -> anyhow::Result<Outcome> {
        let mut singles: Vec<Batch> = Vec::with_capacity(batch.len() + batch.failed.len());
        let mut raw: HashMap<Position, rdkafka::message::OwnedMessage> =
            batch.raw.into_iter().map(|m| (Position { partition: m.partition(), offset: m.offset() }, m)).collect();
        let single = |position: Position| Batch { to: HashMap::from([(position.partition, position.offset + 1)]), ..Batch::default() };
        for r in batch.tasks {
            let mut b = single(r.position);
            b.raw.extend(raw.remove(&r.position));
            b.tasks.push(r);
            singles.push(b);
        }
        for r in batch.users {
            let mut b = single(r.position);
            b.raw.extend(raw.remove(&r.position));
            b.users.push(r);
            singles.push(b);
        }
        for f in batch.failed {
            let mut b = single(f.raw.position);
            b.failed.push(f);
            singles.push(b);
        }
        singles.sort_by_key(|b| b.to.iter().next().map(|(p, o)| (*p, *o)));
        for b in singles {
            match self.apply_with_retry(topic, &b, next).await {
                Ok(Outcome::Applied) => next.extend(b.to),
                Ok(Outcome::Fenced) => return Ok(Outcome::Fenced),
                Err(e) if e.is_deterministic() => {
                    let Some(message) = b.raw.first() else {
                        return Err(e.into());
                    };
                    let failed = FailedRecord { raw: RawRecord::from_message(message), error: format!("cannot apply: {e}") };
                    let letter = Batch { failed: vec![failed], to: b.to, ..Batch::default() };
                    match self.apply_with_retry(topic, &letter, next).await? {
                        Outcome::Applied => next.extend(letter.to),
                        Outcome::Fenced => return Ok(Outcome::Fenced),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Past the records: the batch's end may lie beyond them (transaction markers).
        let rest = Batch { to: batch.to, ..Batch::default() };
        let outcome = self.apply_with_retry(topic, &rest, next).await?;
        if let Outcome::Applied = outcome {
            next.extend(rest.to);
        }
        Ok(outcome)
    }

    /// Transient failures (PostgreSQL or Kafka away, timeouts, deadlocks) are retried with
    /// exponential backoff and jitter for as long as they last; a failure that repeats on the same
    /// records (bad data) is returned after a few attempts.
    async fn apply_with_retry(&self, topic: &str, batch: &Batch, from: &HashMap<i32, i64>) -> Result<Outcome, ApplyError> {
        let mut backoff = APPLY_RETRY.backoff();
        loop {
            let started = Instant::now();
            match dlq::apply_live(&self.pool, topic, batch, from, &self.dead_letters).await {
                Ok((applied, _parking)) => {
                    self.ready.store(true, Ordering::Release);
                    metrics::histogram!("projector_batch_apply_seconds").record(started.elapsed().as_secs_f64());
                    metrics::counter!("projector_events_applied_total").increment(applied.records as u64);
                    if applied.reactions > 0 || applied.deliveries > 0 {
                        self.reactions.notify_waiters();
                    }
                    return Ok(Outcome::Applied);
                }
                Err(ApplyError::Store(StoreError::Fenced { .. })) => return Ok(Outcome::Fenced),
                Err(e) if e.is_deterministic() && backoff.attempts() >= 2 => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    if !e.is_deterministic() {
                        self.ready.store(false, Ordering::Release);
                    }
                    metrics::counter!("projector_apply_retries_total").increment(1);
                    tracing::warn!(error.message = %e, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "applying a batch failed; retrying the same batch");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// `projector_events_consumed_total{projection,type}`: every projection consumes every record.
fn count_consumed(batch: &Batch) {
    let mut types: HashMap<&'static str, u64> = HashMap::new();
    for r in &batch.tasks {
        *types.entry(r.envelope.event.event_type()).or_default() += 1;
    }
    for r in &batch.users {
        *types.entry(r.envelope.event.event_type()).or_default() += 1;
    }
    for projection in store::PROJECTIONS {
        for (t, n) in &types {
            metrics::counter!("projector_events_consumed_total", "projection" => projection, "type" => *t).increment(*n);
        }
    }
}

/// Whether a batch was applied, or the stored offsets moved under this instance.
enum Outcome {
    Applied,
    Fenced,
}
