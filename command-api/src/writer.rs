//! A partition's writer: every command on a stream of the partition goes through one task that
//! decides against the in-memory state of the partition's streams (restored from its snapshot and
//! the log after it), appends the accepted events of all concurrent commands in one Kafka
//! transaction of the partition's own producer (group commit), and only then answers. Commands on
//! one stream are therefore applied in order, versions are contiguous, and the log never holds a
//! rejected event. Writers of different partitions commit in parallel.
//!
//! The same transaction carries the partition's `task-updates` records: after every accepted task
//! command, the task's full state (`TaskView`, a tombstone after a deletion), so the current-state
//! topic and the log can never disagree. The writer keeps the `TaskView` of every live task of the
//! partition next to the decider's state (`States`: evolved live and at restore, recorded in the
//! snapshot), because the decider's state holds only what the rules look at (no title, description
//! or tags) and `evolve` does not see the event's time.
//!
//! Taking a partition over: fence the previous owner (`EventLog::connect`), restore the latest
//! snapshot and read the partition to its end, announce the ownership, then accept commands. Giving
//! it up (`Writer::stop`): stop accepting, finish the transaction in flight, refuse what is queued.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use domain::{
    AnyCommand, CommandVisitor, Decider, DomainError, DomainEvent, Envelope, FieldError, IdempotencyTag, Metadata, Receipt, Record, RecordVisitor, UserId,
};
use platform::codec::{self, DecodeError, EncodedEvent, EncodedState};
use platform::keys::{DataKeys, KeyRing};
use platform::position::Position;
use platform::retry::Policy;

use crate::idempotency::{Answer, IdempotencyCache, KeptAnswer};
use crate::log::{EventLog, LogError, OwnerRecord, Undecodable};
use crate::streams::{apply_event, apply_view, as_task_event, Layered, States};

/// Metadata carried with a command into its events.
#[derive(Debug, Clone, Default)]
pub struct CommandMeta {
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    pub idempotency: Option<IdempotencyTag>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Blocked(String),
}

struct Submission {
    cmd: AnyCommand,
    meta: CommandMeta,
    reply: oneshot::Sender<Result<Answer, WriteError>>,
}

/// Where a partition's writer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Fencing the previous owner and reading the snapshot and the log.
    Restoring,
    Ready,
    /// The log failed; reconnecting and reading what it missed.
    Recovering,
    /// Gave the partition up (revoked, fenced, or shutting down).
    Stopped,
}

/// How a writer is run.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub max_batch: usize,
    /// Announced as the partition's owner once restored (instance id, URL).
    pub owner: Option<(String, String)>,
    /// A snapshot is recorded after this many events since the last one...
    pub snapshot_every_events: u64,
    /// ... or after this long with at least one event.
    pub snapshot_interval: Duration,
    /// Undecodable records an operator released (`partition:offset`): skipped instead of blocking
    /// their stream.
    pub released: HashSet<(i32, i64)>,
    /// Transactions the instance's writers may have in flight at once (shared by every writer the
    /// config is cloned into; `None`: no limit). Each Kafka transaction costs the broker a fixed
    /// amount of work (the coordinator's log writes and the commit markers) whatever it holds; with
    /// one transaction per partition in flight, a saturated instance commits many small ones. A
    /// writer waiting for a slot keeps taking commands into its batch, so under load the batches
    /// grow and the transactions get fewer, while an idle instance never waits.
    pub transaction_slots: Option<Arc<tokio::sync::Semaphore>>,
    /// The users' data keys: personal fields are sealed with them on the way to the log and opened
    /// on restore; a task whose key is destroyed was erased with its user.
    pub keys: Arc<KeyRing>,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            max_batch: 2_000,
            owner: None,
            snapshot_every_events: 100_000,
            snapshot_interval: Duration::from_secs(300),
            released: HashSet::new(),
            transaction_slots: None,
            keys: KeyRing::in_memory(platform::keys::Keks::dev()),
        }
    }
}

/// An erasure seals nothing, so it needs no data key (and must not make one for the user it erases).
pub fn is_erasure(cmd: &AnyCommand) -> bool {
    matches!(cmd, AnyCommand::User(domain::user::UserCommand { kind: domain::user::UserCommandKind::Erase { .. }, .. }))
}

/// Handle of one partition's writer, used by the HTTP layer.
#[derive(Clone)]
pub struct Writer {
    partition: i32,
    tx: mpsc::Sender<Submission>,
    phase: watch::Receiver<Phase>,
    stop: Arc<watch::Sender<bool>>,
    keys: Arc<KeyRing>,
}

impl Writer {
    /// Starts the writer of `partition`: it connects (fencing the previous owner), restores, then
    /// serves commands.
    pub fn spawn<L: EventLog>(partition: i32, mut log: L, idempotency: IdempotencyCache, config: WriterConfig) -> Self {
        log.bind(partition);
        let (tx, rx) = mpsc::channel(config.max_batch * 4);
        let (phase_tx, phase) = watch::channel(Phase::Restoring);
        let (stop, stop_rx) = watch::channel(false);
        let keys = config.keys.clone();
        let actor = Actor {
            partition,
            log,
            states: States::default(),
            next_offset: 0,
            idempotency,
            phase: phase_tx,
            config,
            recovering: true,
            restored_once: false,
            blocked: HashMap::new(),
            since_snapshot: 0,
            last_snapshot: Instant::now(),
        };
        tokio::spawn(actor.run(rx, stop_rx));
        Self { partition, tx, phase, stop: Arc::new(stop), keys }
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
    }

    /// Gives the partition up: stop accepting, finish the transaction in flight, refuse the rest.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the writer has stopped (after `stop`, or after it was fenced).
    pub async fn stopped(&self) {
        let mut phase = self.phase.clone();
        let _ = phase.wait_for(|p| *p == Phase::Stopped).await;
    }

    /// Hands a command to the writer and waits for its answer. While the writer is not ready
    /// (restoring, or reconnecting after the log failed) the command is refused at once instead of
    /// waiting in the queue.
    pub async fn submit(&self, cmd: AnyCommand, meta: CommandMeta) -> Result<Answer, WriteError> {
        if !self.is_ready() {
            return Err(WriteError::Unavailable(format!(
                "partition {} is {}",
                self.partition,
                match self.phase() {
                    Phase::Stopped => "moving to another instance",
                    _ => "restoring its state from the log or reconnecting to Kafka",
                }
            )));
        }
        // The user's data key exists (durably) before their command is decided: the writer seals
        // with it without waiting.
        // (An erasure needs none: it seals nothing.)
        if !is_erasure(&cmd) {
            self.keys.ensure(cmd.actor().as_ref()).await.map_err(|e| WriteError::Unavailable(e.to_string()))?;
        }
        let (reply, rx) = oneshot::channel();
        let gone = || WriteError::Unavailable(format!("partition {} is moving to another instance", self.partition));
        self.tx.send(Submission { cmd, meta, reply }).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// What a partition snapshot holds: the state of every stream of the partition after the records
/// before `next_offset`, and the Idempotency-Key answers remembered then. `S` is the form of the
/// states: written from a JSON value, read back as raw JSON borrowed from the record, which
/// `States::from_snapshot` parses straight into the states (a JSON value tree of them took half of a restore's time).
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot<S> {
    format: u32,
    partition: i32,
    next_offset: i64,
    taken_at: DateTime<Utc>,
    states: S,
    answers: Vec<KeptAnswer>,
    /// Streams whose records cannot be decoded (key -> position of the first such record).
    #[serde(default)]
    blocked: Vec<(String, i32, i64)>,
}

/// 2: the states include the tasks' current states (`task_views`); 3: their personal fields are
/// sealed with the tasks' data keys, and a user's state says only whether a webhook exists (no
/// URL); 4: a user's state remembers each notification's remind time and forgets old read ones; 5:
/// a task's view is sealed whole (one sealed string instead of its personal fields). A
/// snapshot of an older format is ignored (the writer restores from the start of the log, which is
/// kept forever).
const SNAPSHOT_FORMAT: u32 = 5;

/// A restore that read more events than this after the snapshot records a new one at once.
const RESTORED_TAIL_SNAPSHOT: u64 = 10_000;

struct Actor<L> {
    partition: i32,
    log: L,
    /// The committed state of every stream of the partition.
    states: States,
    /// Next offset of the partition that this writer has seen (restored or appended).
    next_offset: i64,
    idempotency: IdempotencyCache,
    phase: watch::Sender<Phase>,
    config: WriterConfig,
    recovering: bool,
    restored_once: bool,
    /// Streams with a record that cannot be decoded: their writes are refused (the state would be
    /// wrong) until an operator releases the record.
    blocked: HashMap<String, Position>,
    since_snapshot: u64,
    last_snapshot: Instant,
}

/// How long the writer waits between attempts to reach the log again: 100 ms doubling up to 5 s.
const RECOVERY_BACKOFF: Policy = Policy::new(Duration::from_millis(100), Duration::from_secs(5));

/// A decided command waiting for its batch to be appended.
struct Pending {
    sub: Submission,
    outcome: Result<Decided, WriteError>,
    /// The decision looked at state staged by an earlier command of this batch.
    saw_staged: bool,
}

/// What an accepted command will be answered with once its batch is durable.
struct Decided {
    receipt: Receipt,
    /// The stream's version after the command.
    version: u32,
    /// Index in the batch's records of the command's last event (its position goes in the answer).
    last_record: usize,
}

impl<L: EventLog> Actor<L> {
    async fn run(mut self, mut rx: mpsc::Receiver<Submission>, mut stop: watch::Receiver<bool>) {
        let mut backoff = RECOVERY_BACKOFF.backoff();
        'serve: loop {
            if *stop.borrow() {
                break;
            }
            if self.recovering {
                match self.recover().await {
                    Ok(()) => {
                        self.recovering = false;
                        let _ = self.phase.send(Phase::Ready);
                        backoff.reset();
                    }
                    Err(LogError::Fenced(e)) => {
                        tracing::warn!(partition = self.partition, error.message = %e, "another instance took the partition over; stopping its writer");
                        break;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(partition = self.partition, error.message = %e, retry_in_ms = delay.as_millis() as u64, "event log unavailable; commands on the partition get 503 until it is back");
                        let until = tokio::time::Instant::now() + delay;
                        // Refuse what arrives meanwhile: nothing is appended while recovering.
                        loop {
                            tokio::select! {
                                _ = tokio::time::sleep_until(until) => break,
                                _ = stop.changed() => break 'serve,
                                s = rx.recv() => match s {
                                    Some(s) => { let _ = s.reply.send(Err(WriteError::Unavailable(e.to_string()))); }
                                    None => break 'serve,
                                },
                            }
                        }
                        continue;
                    }
                }
            }
            let first = tokio::select! {
                biased;
                _ = stop.changed() => break,
                s = rx.recv() => match s { Some(s) => s, None => break },
            };
            // Waiting for a transaction slot (the commands arriving meanwhile join this batch).
            let slot = match self.config.transaction_slots.clone() {
                None => None,
                Some(slots) => tokio::select! {
                    biased;
                    _ = stop.changed() => {
                        let _ = first.reply.send(Err(WriteError::Unavailable(format!("partition {} is moving to another instance", self.partition))));
                        break;
                    }
                    permit = slots.acquire_owned() => permit.ok(),
                },
            };
            let mut batch = vec![first];
            while batch.len() < self.config.max_batch {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            let processed = self.process(batch).await;
            drop(slot);
            if let Err(LogError::Fenced(e)) = processed {
                tracing::warn!(partition = self.partition, error.message = %e, "another instance took the partition over; stopping its writer");
                break;
            }
            // The batch is answered; its transaction must be closed in the log before the next one
            // starts (see `EventLog::settle`).
            if !self.recovering {
                if let Err(e) = self.log.settle().await {
                    tracing::warn!(partition = self.partition, error.message = %e, "the last transaction is not closed in the log; reconnecting and reading the partition before the next append");
                    self.recovering = true;
                }
            }
            if !self.recovering && self.snapshot_due() {
                self.snapshot().await;
            }
        }
        let _ = self.phase.send(Phase::Stopped);
        rx.close();
        while let Ok(s) = rx.try_recv() {
            let _ = s.reply.send(Err(WriteError::Unavailable(format!("partition {} is moving to another instance", self.partition))));
        }
        tracing::info!(partition = self.partition, "partition writer stopped");
    }

    fn snapshot_due(&self) -> bool {
        self.since_snapshot >= self.config.snapshot_every_events || (self.since_snapshot > 0 && self.last_snapshot.elapsed() >= self.config.snapshot_interval)
    }

    /// Records a snapshot of the partition's state (the writer waits for it: a few ms per thousand
    /// live streams).
    async fn snapshot(&mut self) {
        let started = Instant::now();
        let snap = Snapshot {
            format: SNAPSHOT_FORMAT,
            partition: self.partition,
            next_offset: self.next_offset,
            taken_at: Utc::now(),
            states: self.states.to_snapshot(&*self.config.keys),
            answers: self.idempotency.export(self.partition, &self.config.keys),
            blocked: self.blocked.iter().map(|(k, p)| (k.clone(), p.partition, p.offset)).collect(),
        };
        let bytes = match serde_json::to_vec(&snap) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(partition = self.partition, error.message = %e, "could not encode a snapshot");
                return;
            }
        };
        let size = bytes.len();
        match self.log.write_snapshot(bytes).await {
            Ok(()) => {
                self.since_snapshot = 0;
                self.last_snapshot = Instant::now();
                metrics::histogram!("command_api_snapshot_seconds").record(started.elapsed().as_secs_f64());
                tracing::info!(
                    partition = self.partition,
                    next_offset = self.next_offset,
                    streams = self.states.len(),
                    bytes = size,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "snapshot recorded"
                );
            }
            Err(e) => {
                tracing::warn!(partition = self.partition, error.message = %e, "could not record a snapshot; reconnecting");
                self.recovering = true;
            }
        }
    }

    /// Connects to the log (fencing the previous owner), restores the latest snapshot the first time,
    /// and reads everything of the partition this writer has not seen yet, applying every record to
    /// the state as it streams in (nothing is buffered, so memory follows the number of streams, not
    /// of events). A failure part-way keeps what was applied and the offset it reached: the retry
    /// goes on from there.
    async fn recover(&mut self) -> Result<(), LogError> {
        if self.restored_once {
            let _ = self.phase.send(Phase::Recovering);
        }
        self.log.connect().await?;
        // Every data key the partition's records were sealed with is made before they were
        // appended: once the keys topic is read this far, a key still unknown is destroyed.
        self.config.keys.catch_up().await.map_err(|e| LogError::Unavailable(e.to_string()))?;
        let started = Instant::now();
        if !self.restored_once && self.next_offset == 0 {
            if let Some(bytes) = self.log.read_snapshot().await? {
                self.restore_snapshot(&bytes).await;
            }
        }
        let partition = self.partition;
        let restoring = Arc::new(Mutex::new(Restoring {
            partition,
            states: std::mem::take(&mut self.states),
            next: self.next_offset,
            blocked: std::mem::take(&mut self.blocked),
            released: self.config.released.clone(),
            ..Restoring::default()
        }));
        let sink = restoring.clone();
        let result = self.log.read_from(self.next_offset, Box::new(move |pos, rec| sink.lock().unwrap_or_else(|e| e.into_inner()).apply(pos, rec))).await;
        let restored = std::mem::take(&mut *restoring.lock().unwrap_or_else(|e| e.into_inner()));
        self.states = restored.states;
        self.blocked = restored.blocked;
        metrics::gauge!("command_api_blocked_streams", "partition" => partition.to_string()).set(self.blocked.len() as f64);
        for (user, tag, answer) in restored.keyed {
            self.idempotency.remember(&user, &tag, answer).await;
        }
        self.since_snapshot += restored.applied;
        match result {
            Ok(next) => self.next_offset = next.max(restored.next),
            Err(e) => {
                self.next_offset = restored.next;
                return Err(e);
            }
        }
        if let Some((instance, url)) = &self.config.owner {
            self.log.announce(&OwnerRecord { partition, instance: instance.clone(), url: url.clone(), since: Utc::now() }).await?;
        }
        self.restored_once = true;
        metrics::histogram!("command_api_restore_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(
            partition,
            events = restored.applied,
            streams = self.states.len(),
            next_offset = self.next_offset,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "partition state restored"
        );
        // A long tail makes the next owner's restore long: record a snapshot now.
        if self.since_snapshot >= self.config.snapshot_every_events.min(RESTORED_TAIL_SNAPSHOT) {
            self.snapshot().await;
        }
        Ok(())
    }

    async fn restore_snapshot(&mut self, bytes: &[u8]) {
        let snap: Snapshot<&serde_json::value::RawValue> = match serde_json::from_slice(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(partition = self.partition, error.message = %e, "the partition's snapshot cannot be read; restoring from the start of the log");
                return;
            }
        };
        if snap.format != SNAPSHOT_FORMAT || snap.partition != self.partition {
            tracing::warn!(
                partition = self.partition,
                format = snap.format,
                "ignoring a snapshot of another format or partition; restoring from the start of the log"
            );
            return;
        }
        match States::from_snapshot(snap.states, &*self.config.keys) {
            Ok(states) => {
                self.states = states;
                self.next_offset = snap.next_offset;
                self.blocked = snap.blocked.into_iter().map(|(k, partition, offset)| (k, Position { partition, offset })).collect();
                self.blocked.retain(|_, p| !self.config.released.contains(&(p.partition, p.offset)));
                let answers = snap.answers.len();
                self.idempotency.import(snap.answers, &*self.config.keys).await;
                self.last_snapshot = Instant::now();
                tracing::info!(partition = self.partition, next_offset = self.next_offset, streams = self.states.len(), answers, taken_at = %snap.taken_at, "snapshot restored");
            }
            Err(e) => {
                tracing::error!(partition = self.partition, error.message = %e, "the partition's snapshot cannot be read; restoring from the start of the log");
            }
        }
    }

    async fn process(&mut self, batch: Vec<Submission>) -> Result<(), LogError> {
        let now = Utc::now();
        let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        // State after this batch's accepted commands, not yet durable.
        let mut staged = States::default();
        let mut records: Vec<EncodedEvent> = Vec::new();
        let mut updates: Vec<EncodedState> = Vec::new();
        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        let mut refused: Vec<(Submission, String)> = Vec::new();
        for sub in batch {
            if !self.blocked.is_empty() {
                if let Some(p) = self.blocked.get(&sub.cmd.stream_key()) {
                    let msg = format!(
                        "the log holds a record of this stream that cannot be decoded (partition {}, offset {}); writes to it are stopped until an operator releases that record",
                        p.partition, p.offset
                    );
                    refused.push((sub, msg));
                    continue;
                }
            }
            let mut stage = Stage {
                streams: Layered { committed: Some(&self.states), staged: &mut staged },
                records: &mut records,
                updates: &mut updates,
                meta: &sub.meta,
                now,
                saw_staged: false,
                keys: &self.config.keys,
            };
            let outcome = sub.cmd.visit(&mut stage);
            let saw_staged = stage.saw_staged;
            pending.push(Pending { sub, outcome, saw_staged });
        }
        for (sub, msg) in refused {
            let _ = sub.reply.send(Err(WriteError::Blocked(msg)));
        }
        if records.is_empty() {
            for p in pending {
                if let Err(e) = p.outcome {
                    let _ = p.sub.reply.send(Err(e));
                }
            }
            return Ok(());
        }
        let started = Instant::now();
        let n = records.len();
        let mut types: HashMap<&'static str, u64> = HashMap::new();
        for r in &records {
            *types.entry(r.event_type).or_default() += 1;
        }
        match self.log.append(records, updates).await {
            Ok(positions) => {
                metrics::histogram!("command_api_append_seconds").record(started.elapsed().as_secs_f64());
                metrics::counter!("command_api_events_appended_total").increment(n as u64);
                for (t, count) in types {
                    metrics::counter!("events_published_total", "type" => t).increment(count);
                }
                if let Some(last) = positions.last() {
                    self.next_offset = self.next_offset.max(last.offset + 1);
                }
                self.since_snapshot += n as u64;
                self.states.absorb(staged);
                for p in pending {
                    let answer = p.outcome.map(|d| Answer::new(d.receipt, d.version, positions[d.last_record]));
                    if let (Ok(a), Some(tag)) = (&answer, &p.sub.meta.idempotency) {
                        // Remembered here, before the caller hears it: a snapshot recorded right
                        // after this batch (the log records before it may then be gone) must hold
                        // the answer, and the caller's own cache insert may not have run yet.
                        self.idempotency.remember(p.sub.cmd.actor(), tag, a.clone()).await;
                    }
                    let _ = p.sub.reply.send(answer);
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(partition = self.partition, error.message = %e, events = n, "append failed; nothing acknowledged");
                let msg = e.to_string();
                for p in pending {
                    // A refusal decided on state that was never made durable is not a real answer.
                    let reply = match p.outcome {
                        Err(WriteError::Domain(d)) if !p.saw_staged => Err(WriteError::Domain(d)),
                        _ => Err(WriteError::Unavailable(msg.clone())),
                    };
                    let _ = p.sub.reply.send(reply);
                }
                // The outcome of the failed transaction is learnt from the log itself.
                self.recovering = true;
                match e {
                    LogError::Fenced(_) => Err(e),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Decides one command against the state of its stream (staged by an earlier command of the batch,
/// or committed), stages the new state and encodes the events, and for a task command the task's
/// state after it (its `task-updates` record).
struct Stage<'a> {
    streams: Layered<'a>,
    records: &'a mut Vec<EncodedEvent>,
    updates: &'a mut Vec<EncodedState>,
    meta: &'a CommandMeta,
    now: DateTime<Utc>,
    saw_staged: bool,
    keys: &'a KeyRing,
}

impl CommandVisitor for Stage<'_> {
    type Output = Result<Decided, WriteError>;

    fn command<D: Decider>(&mut self, cmd: &D::Command) -> Result<Decided, WriteError> {
        let id = D::stream_id(cmd);
        let actor = D::actor(cmd);
        let task = (&id as &dyn std::any::Any).downcast_ref::<domain::TaskId>().copied();
        if let Some(task) = task {
            // A task sealed with a destroyed key was erased with its user: it no longer exists.
            if self.streams.task_key(&task).is_some_and(|k| !self.keys.is_live(&k)) {
                self.streams.forget_task(&task);
            }
        }
        self.saw_staged = self.streams.is_staged::<D>(&id);
        let events = D::decide(cmd, &self.streams.current::<D>(&id))?;
        // A task's events are sealed with the task's key (the user's key when it was created); a
        // user's with their current key. The erasure itself names no key: it stays readable.
        let key = match task.and_then(|t| self.streams.task_key(&t)) {
            Some(k) => self.keys.data_key(&k).ok(),
            None => self.keys.current(actor.as_ref()),
        };
        let erasure = events.iter().any(|e| e.event_type() == "user.erased");
        let key = match (key, erasure) {
            (_, true) => None,
            (Some(k), false) => Some(k),
            (None, false) => {
                return Err(WriteError::Unavailable("the user's data key was destroyed (an erasure) while the command waited; send it again".into()));
            }
        };
        let count = events.len();
        let mut decided = None;
        for (i, event) in events.into_iter().enumerate() {
            let sequence = apply_event::<D>(&mut self.streams, &id, actor, &event);
            if i + 1 == count {
                decided = Some(Decided { receipt: D::receipt(&id, &event), version: sequence, last_record: self.records.len() });
            }
            let meta = Metadata {
                event_id: Uuid::now_v7(),
                user_id: actor.clone(),
                sequence,
                occurred_at: self.now,
                correlation_id: self.meta.correlation_id.clone(),
                causation_id: self.meta.causation_id.clone(),
                traceparent: self.meta.traceparent.clone(),
                idempotency: self.meta.idempotency.clone(),
                data_key: key.as_ref().map(|k| k.id),
            };
            let env = Envelope { subject: id.clone(), meta, event };
            let is_task = apply_view(&mut self.streams, &env);
            self.records.push(codec::encode(&env, key.as_deref()));
            if is_task && i + 1 == count {
                // One current-state record per accepted command: the state after its last event.
                if let Some(task) = as_task_event(&env) {
                    self.updates.push(codec::encode_state(task, self.streams.view(&task.subject), key.as_deref()));
                }
            }
        }
        decided.ok_or_else(|| WriteError::Domain(DomainError::Invalid(vec![FieldError::new("", "the command changes nothing")])))
    }
}

/// The state being rebuilt from the log during a restore.
#[derive(Default)]
struct Restoring {
    partition: i32,
    states: States,
    /// Next offset after the records applied so far.
    next: i64,
    /// Answers of commands sent with an Idempotency-Key, to remember once restored.
    keyed: Vec<(UserId, IdempotencyTag, Answer)>,
    applied: u64,
    blocked: HashMap<String, Position>,
    released: HashSet<(i32, i64)>,
}

impl Restoring {
    fn apply(&mut self, pos: Position, rec: Result<Record, Undecodable>) {
        // Only what comes after what the state holds: a record delivered again (a client re-fetch)
        // or before the offset the state covers would be applied twice.
        if pos.partition != self.partition || pos.offset < self.next {
            return;
        }
        self.next = pos.offset + 1;
        let rec = match rec {
            Ok(rec) => rec,
            Err(Undecodable { error: DecodeError::Barrier, .. }) => {
                // Not an event: a writer closed a transaction Kafka had left open here.
                tracing::info!(partition = pos.partition, offset = pos.offset, "read a barrier (a transaction Kafka had left open was closed here)");
                return;
            }
            Err(Undecodable { error: DecodeError::Erased(_), .. }) => {
                // Its user was erased (the data key is destroyed): the record is nothing now.
                metrics::counter!("command_api_restore_erased_total").increment(1);
                return;
            }
            Err(Undecodable { key, error }) => {
                metrics::counter!("command_api_restore_undecodable_total").increment(1);
                if self.released.contains(&(pos.partition, pos.offset)) {
                    tracing::warn!(partition = pos.partition, offset = pos.offset, error.message = %error, "skipping an undecodable record an operator released");
                    return;
                }
                match key {
                    Some(key) => {
                        tracing::error!(partition = pos.partition, offset = pos.offset, stream = %key, error.message = %error, "the log holds a record that cannot be decoded: writes to its stream are stopped until an operator releases it (COMMAND_API_RELEASED_RECORDS)");
                        self.blocked.entry(key).or_insert(pos);
                    }
                    None => {
                        tracing::error!(partition = pos.partition, offset = pos.offset, error.message = %error, "skipping an undecodable record without a key (it belongs to no stream)");
                    }
                }
                return;
            }
        };
        self.applied += 1;
        let answer = rec.visit(&mut Replay { streams: Layered { committed: None, staged: &mut self.states }, position: pos });
        let meta = rec.meta();
        if let Some(tag) = &meta.idempotency {
            self.keyed.push((meta.user_id.clone(), tag.clone(), answer));
        }
    }
}

/// Applies an event read from the log, exactly as the live path applied it when it was decided.
struct Replay<'a> {
    streams: Layered<'a>,
    position: Position,
}

impl RecordVisitor for Replay<'_> {
    type Output = Answer;

    fn record<D: Decider>(&mut self, env: &Envelope<D::Event>) -> Answer {
        let version = apply_event::<D>(&mut self.streams, &env.subject, &env.meta.user_id, &env.event);
        apply_view(&mut self.streams, env);
        if version != env.meta.sequence {
            tracing::warn!(subject = %env.subject, expected = env.meta.sequence, got = version, "log sequence differs from replayed version");
        }
        Answer::new(D::receipt(&env.subject, &env.event), env.meta.sequence, self.position)
    }
}
