//! The run mode: a member of the projectors' consumer group of `task-events` (read_committed;
//! `group`), applying the records of the partitions Kafka assigns it from the offsets stored in
//! PostgreSQL, in batches, each batch and its offsets in one transaction (`dlq::apply_live`: dead
//! letters and parking, then `store`). After a rebalance it drops what it read of revoked
//! partitions and seeks assigned ones to their stored offsets before applying anything. Transient
//! failures are retried with `platform::retry`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tracing::Instrument;

use domain::DomainEvent as _;
use platform::keys::KeyRing;
use platform::position::Position;
use platform::retry::{Jitter, Policy};
use platform::settings::KafkaSettings;

use crate::consumer::read_batch;
use crate::dlq::{self, ApplyError, DeadLetterSink};
use crate::group::{self, GroupContext, Instance, Membership};
use crate::model::{Batch, FailedRecord, RawRecord};
use crate::store::{self, StoreError};

/// Restarting the consume loop after Kafka or PostgreSQL went away: 200 ms doubled up to 10 s,
/// each between half and all of it (spreads the restarts of several instances).
const RESTART: Policy = Policy::new(Duration::from_millis(200), Duration::from_secs(10)).with_jitter(Jitter::Equal);
/// Applying the same batch again after a failure: 100 ms doubled up to 10 s, the same jitter.
const APPLY_RETRY: Policy = Policy::new(Duration::from_millis(100), Duration::from_secs(10)).with_jitter(Jitter::Equal);
/// Ready once Kafka assigned this member its partitions, or after this long in the group (an
/// instance that gets no partition, e.g. more projectors than partitions, is ready too).
const JOIN_WAIT: Duration = Duration::from_secs(10);
/// Seeking an assigned partition again after it could not be sought.
const POSITION_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct RunSettings {
    pub kafka: KafkaSettings,
    pub database: platform::settings::DatabaseSettings,
    pub max_batch: usize,
    /// Transactions a batch is applied in at once (whole partitions in each).
    pub apply_parallelism: usize,
    pub linger: Duration,
    pub instance: Instance,
    /// The users' data keys (opens the sealed fields; started by the run).
    pub keys: Arc<KeyRing>,
}

pub struct Runner {
    settings: RunSettings,
    pool: PgPool,
    ready: Arc<AtomicBool>,
    /// The partitions Kafka assigned this instance (shared with `/readyz`).
    membership: Arc<Membership>,
    /// Woken after a batch recorded reactions.
    reactions: Arc<tokio::sync::Notify>,
    dead_letters: DeadLetterSink,
    /// Set once a rebuild of projections without stored offsets has been started.
    rebuilding: Arc<AtomicBool>,
    reader: Reader,
}

type GroupConsumer = Arc<StreamConsumer<GroupContext>>;

impl Runner {
    pub fn new(
        settings: RunSettings,
        pool: PgPool,
        ready: Arc<AtomicBool>,
        membership: Arc<Membership>,
        reactions: Arc<tokio::sync::Notify>,
    ) -> anyhow::Result<Self> {
        let dead_letters = DeadLetterSink::new(&settings.kafka)?;
        Ok(Self { settings, pool, ready, membership, reactions, dead_letters, rebuilding: Arc::default(), reader: Reader::new()? })
    }

    /// Runs until `stop` resolves; transient failures (Kafka or PostgreSQL away) are retried with
    /// backoff, never skipped. Stopping leaves the group (the partitions move to the other
    /// instances at once) and deletes this instance's owner rows.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = RESTART.backoff();
        loop {
            if *stop.borrow() {
                break;
            }
            let result = tokio::select! {
                r = self.run_once() => r,
                _ = stop.changed() => break,
            };
            self.ready.store(false, Ordering::Release);
            self.membership.reset();
            publish_owned(0);
            match result {
                Ok(()) => break,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error.message = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "projector loop failed; restarting it");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = stop.changed() => break,
                    }
                }
            }
        }
        self.membership.reset();
        let topic = &self.settings.kafka.task_events_topic;
        if let Err(e) = group::forget_owners(&self.pool, topic, None, &self.settings.instance).await {
            tracing::debug!(error.message = %e, "could not delete this instance's partition owner rows");
        }
    }

    async fn run_once(&self) -> anyhow::Result<()> {
        platform::kafka::ensure_topics(&self.settings.kafka).await?;
        self.settings.keys.start(&self.settings.kafka, "taskstream-projector").await?;
        let topic = self.settings.kafka.task_events_topic.clone();
        self.rebuild_new_projections(&topic).await?;
        self.membership.reset();
        let consumer: GroupConsumer = Arc::new(group::consumer(&self.settings.kafka, self.membership.clone())?);
        consumer.subscribe(&[&topic])?;
        tracing::info!(group = %group::group_id(&topic), instance = %self.settings.instance.id, "projector joined its consumer group");
        let joined_by = Instant::now() + JOIN_WAIT;
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut batch = Batch::default();
        loop {
            // Rebalances happen only inside `read_batch`: take their changes before applying what
            // it read, so nothing of a revoked partition is applied after its revocation, and
            // nothing read of a partition before it was (re)positioned: such records come from
            // where the consumer was, which may lie past the stored offset (after a fenced batch,
            // the consumer stands at that batch's end while another instance committed less), and
            // applying them from the stored offset would skip the records in between.
            let stale = self.follow_rebalances(&consumer, &topic, &mut next).await?;
            if self.membership.books().joined() || Instant::now() >= joined_by {
                self.ready.store(true, Ordering::Release);
            }
            // Only partitions owned now, and neither revoked nor repositioned since they were read; a revocation waits
            // until this batch has committed or been given up (the guard, dropped before reading:
            // the callbacks run inside the read).
            let applying = self.membership.applying(|books| batch.retain_partitions(|p| books.owns(p) && !stale.contains(&p) && next.contains_key(&p)));
            // The next batch is read while this one is applied: during a catch-up PostgreSQL and
            // the reading and decoding no longer take turns. Nothing is sought while it reads (the
            // seeks are above), a revocation in its callbacks waits for this batch (the guard),
            // and what it read of a partition revoked or repositioned meanwhile is dropped above.
            let reading = self.reader.read(self.read_next(&consumer, &topic, &next));
            let outcome = if batch.is_empty() { Ok(Outcome::Applied) } else { self.apply(&topic, batch, &mut next).await };
            drop(applying);
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(e) => {
                    // The read ends before the consumer does (below, as the loop returns): a
                    // consumer closed later, on the reader, would revoke into the next loop's books.
                    reading.cancel().await;
                    return Err(e);
                }
            };
            if let Outcome::Fenced = outcome {
                tracing::warn!("offsets moved under us (a partition moved to another instance, or a rebuild switched tables); re-reading them");
                self.membership.books().reposition_all();
            }
            batch = reading.finish().await?;
        }
    }

    /// The read of the next batch, to run on the reader: from `next` on, stopped early by a
    /// rebalance, or soon when a partition still waits to be positioned.
    fn read_next(
        &self,
        consumer: &GroupConsumer,
        topic: &str,
        next: &HashMap<i32, i64>,
    ) -> impl std::future::Future<Output = anyhow::Result<Batch>> + Send + 'static {
        let (consumer, topic, next) = (consumer.clone(), topic.to_owned(), next.clone());
        let (membership, keys) = (self.membership.clone(), self.settings.keys.clone());
        let (max_batch, linger) = (self.settings.max_batch, self.settings.linger);
        let retry_soon = membership.books().unpositioned();
        async move {
            let interrupted = async {
                tokio::select! {
                    () = membership.rebalanced() => {}
                    () = tokio::time::sleep(POSITION_RETRY), if retry_soon => {}
                }
            };
            read_batch(&consumer, &topic, &next, max_batch, linger, &keys, interrupted).await
        }
    }

    /// Takes the rebalances' changes: forgets revoked partitions and seeks assigned (or
    /// repositioned) ones to their stored offsets, then lets them be fetched; records the owners
    /// for `projector status`. Returns both kinds, so that what was read of them is dropped.
    async fn follow_rebalances(&self, consumer: &GroupConsumer, topic: &str, next: &mut HashMap<i32, i64>) -> anyhow::Result<BTreeSet<i32>> {
        let changes = self.membership.books().take_changes();
        let me = &self.settings.instance;
        let mut stale = changes.revoked.clone();
        for p in &changes.revoked {
            next.remove(p);
        }
        if !changes.revoked.is_empty() {
            let revoked: Vec<i32> = changes.revoked.iter().copied().collect();
            if let Err(e) = group::forget_owners(&self.pool, topic, Some(&revoked), me).await {
                tracing::warn!(error.message = %e, "could not delete the owner rows of revoked partitions (display only)");
            }
        }
        if !changes.to_position.is_empty() {
            let positioned = match self.position(consumer, topic, &changes.to_position, next).await {
                Ok(positioned) => positioned,
                Err(e) => {
                    // Positioned afresh after the restart of the loop (a new member of the group).
                    for p in &changes.to_position {
                        next.remove(p);
                    }
                    return Err(e);
                }
            };
            let owned = self.membership.books().owned();
            if !positioned.is_empty() {
                tracing::info!(partitions = ?positioned, "consuming assigned partitions from their stored offsets");
            }
            stale.extend(positioned);
            if let Err(e) = group::record_owners(&self.pool, topic, &owned, me).await {
                tracing::warn!(error.message = %e, "could not record the partitions' owner (display only)");
            }
        }
        if !changes.revoked.is_empty() || !changes.to_position.is_empty() {
            publish_owned(self.membership.books().owned().len());
        }
        Ok(stale)
    }

    /// Reads the stored offsets of `partitions`, resumes fetching them and seeks them there. A
    /// partition that cannot be sought now (revoked meanwhile, or not fetchable yet) is paused
    /// again and stays unpositioned: it is tried again at the next turn of the loop, and none of
    /// its records is taken until then.
    ///
    /// Resumed before it is sought: librdkafka wakes its fetcher on a seek, not on a resume, so a
    /// partition resumed after its seek waited for the fetcher's idle wait, up to a second, before
    /// its first fetch (measured at every assignment: 1.1 s of a 1M-event catch-up). What is
    /// fetched between the resume and the seek is older than the seek's version barrier, and
    /// librdkafka drops it; `read_batch` takes no offset of a partition twice either way.
    async fn position(&self, consumer: &GroupConsumer, topic: &str, partitions: &[i32], next: &mut HashMap<i32, i64>) -> anyhow::Result<Vec<i32>> {
        let stored = store::init_offsets(&self.pool, topic, partitions).await?;
        let mut tpl = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for p in partitions {
            next.remove(p);
            tpl.add_partition_offset(topic, *p, Offset::Offset(stored.get(p).copied().unwrap_or(0)))?;
            resume.add_partition(topic, *p);
        }
        consumer.resume(&resume)?;
        let c = consumer.clone();
        let sought = tokio::task::spawn_blocking(move || c.seek_partitions(tpl, Duration::from_secs(10))).await??;
        let mut positioned = Vec::new();
        let mut unsought = TopicPartitionList::new();
        for e in sought.elements() {
            match e.error() {
                Ok(()) => {
                    positioned.push(e.partition());
                    next.insert(e.partition(), stored.get(&e.partition()).copied().unwrap_or(0));
                }
                Err(err) => {
                    tracing::info!(partition = e.partition(), error.message = %err, "cannot seek an assigned partition yet; trying again");
                    unsought.add_partition(topic, e.partition());
                }
            }
        }
        if unsought.count() > 0 {
            if let Err(e) = consumer.pause(&unsought) {
                tracing::warn!(error.message = %e, "could not pause the partitions that could not be sought");
            }
        }
        self.membership.books().positioned(&positioned);
        Ok(positioned)
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
            apply_parallelism: self.settings.apply_parallelism,
            report: crate::rebuild::Report::Log,
            requested_by: "new-projection",
            keys: self.settings.keys.clone(),
        };
        let flag = self.rebuilding.clone();
        tokio::spawn(async move {
            match crate::rebuild::run(opts, std::future::pending()).await {
                Ok(summary) => tracing::info!("{}", summary.line()),
                Err(crate::rebuild::RebuildError::Busy) => {
                    tracing::info!("another rebuild is running (another projector instance, or the command line); the new projections are rebuilt by it or at the next start")
                }
                Err(e) => {
                    tracing::error!(error.message = %e, "rebuilding the new projections failed; retried at the next restart")
                }
            }
            flag.store(false, Ordering::Release);
        });
        Ok(())
    }

    /// Applies a batch in `PROJECTOR_APPLY_PARALLELISM` transactions at once, each with whole
    /// partitions (their offsets compared and set in it, as with one). One transaction at a time
    /// left the box half idle during a catch-up: PostgreSQL and the projector took turns.
    async fn apply(&self, topic: &str, batch: Batch, next: &mut HashMap<i32, i64>) -> anyhow::Result<Outcome> {
        let parts = batch.split_by_partition(self.settings.apply_parallelism);
        if parts.len() <= 1 {
            let Some(batch) = parts.into_iter().next() else { return Ok(Outcome::Applied) };
            return self.apply_part(topic, batch, next).await;
        }
        let runs = parts.into_iter().map(|part| {
            let mut from = next.clone();
            async move {
                let partitions: Vec<i32> = part.to.keys().copied().collect();
                let outcome = self.apply_part(topic, part, &mut from).await;
                (outcome, partitions, from)
            }
        });
        let mut result = Ok(Outcome::Applied);
        for (outcome, partitions, from) in futures::future::join_all(runs).await {
            // Whatever the others did, a part that committed moved its partitions on.
            for p in partitions {
                if let Some(o) = from.get(&p) {
                    next.insert(p, *o);
                }
            }
            result = match (result, outcome) {
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(Outcome::Fenced), _) | (_, Ok(Outcome::Fenced)) => Ok(Outcome::Fenced),
                _ => Ok(Outcome::Applied),
            };
        }
        result
    }

    /// Applies (part of) a batch in one transaction; a batch that fails for good (bad data, a
    /// violated constraint) is applied record by record, and the records that fail alone become
    /// dead letters.
    async fn apply_part(&self, topic: &str, batch: Batch, next: &mut HashMap<i32, i64>) -> anyhow::Result<Outcome> {
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
            Err(e) if e.is_deterministic() && !batch.is_empty() => {
                tracing::warn!(error.message = %e, records = batch.len(), "a batch fails for good; applying it record by record to isolate the cause");
                self.apply_one_by_one(topic, batch, next).await
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn apply_one_by_one(&self, topic: &str, batch: Batch, next: &mut HashMap<i32, i64>) -> anyhow::Result<Outcome> {
        let mut singles: Vec<Batch> = Vec::with_capacity(batch.len() + batch.failed.len());
        let mut raw: HashMap<Position, RawRecord> = batch.raw.into_iter().map(|r| (r.position, r)).collect();
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
                    let failed = FailedRecord { raw: message.clone(), error: format!("cannot apply: {e}") };
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
/// Where the live loop reads: a runtime of its own, with one thread. A revocation's callback runs
/// inside the read and blocks its thread until the batch in flight is applied; on the services'
/// runtime that thread could hold the very task applying it (with one worker, or in its LIFO slot).
struct Reader(Option<tokio::runtime::Runtime>);

impl Reader {
    fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("projector-reader").enable_all().build()?;
        Ok(Self(Some(rt)))
    }

    /// Starts `read` on the reader.
    fn read(&self, read: impl std::future::Future<Output = anyhow::Result<Batch>> + Send + 'static) -> Reading {
        Reading(self.0.as_ref().expect("the reader runs until the runner is dropped").spawn(read))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed on an async thread.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A read in flight on the reader; dropping it stops the read (the loop was stopped).
struct Reading(tokio::task::JoinHandle<anyhow::Result<Batch>>);

impl Reading {
    /// The batch it read.
    async fn finish(mut self) -> anyhow::Result<Batch> {
        (&mut self.0).await?
    }

    /// Stops the read and waits until it has let go of the consumer.
    async fn cancel(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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

/// `projector_partitions_owned`: the partitions this instance applies.
fn publish_owned(n: usize) {
    metrics::gauge!("projector_partitions_owned").set(n as f64);
}

/// Whether a batch was applied, or the stored offsets moved under this instance.
enum Outcome {
    Applied,
    Fenced,
}
