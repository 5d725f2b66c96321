//! The single writer: every command goes through one task that decides against the in-memory state
//! of all tasks and users (restored from the log at start), appends the accepted events of all
//! concurrent commands in one Kafka transaction (group commit), and only then answers. Commands on
//! one task are therefore applied in order, versions are contiguous, and the log never holds a
//! rejected event.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use domain::{
    AnyCommand, CommandVisitor, Decider, DomainError, DomainEvent, Envelope, FieldError, IdempotencyTag, Metadata, Receipt, Record, RecordVisitor, UserId,
};
use platform::codec::{self, EncodedEvent};
use platform::position::Position;
use platform::retry::Policy;

use crate::idempotency::{Answer, IdempotencyCache};
use crate::log::{EventLog, LogError, Offsets};

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
}

struct Submission {
    cmd: AnyCommand,
    meta: CommandMeta,
    reply: oneshot::Sender<Result<Answer, WriteError>>,
}

/// Handle used by the HTTP layer.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Submission>,
    ready: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the writer task. It connects, restores state from the log, then serves commands.
    pub fn spawn<L: EventLog>(log: L, idempotency: IdempotencyCache, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let ready = Arc::new(AtomicBool::new(false));
        let actor = Actor { log, states: States::default(), offsets: Offsets::new(), idempotency, ready: ready.clone(), max_batch, recovering: true };
        tokio::spawn(actor.run(rx));
        Self { tx, ready }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Hands a command to the writer and waits for its answer. While the writer is not ready
    /// (restoring, or reconnecting after the log failed) the command is refused at once instead of
    /// waiting in the queue.
    pub async fn submit(&self, cmd: AnyCommand, meta: CommandMeta) -> Result<Answer, WriteError> {
        if !self.is_ready() {
            return Err(WriteError::Unavailable("the writer is restoring its state from the log or reconnecting to Kafka".into()));
        }
        let (reply, rx) = oneshot::channel();
        self.tx.send(Submission { cmd, meta, reply }).await.map_err(|_| WriteError::Unavailable("the writer has stopped".into()))?;
        rx.await.map_err(|_| WriteError::Unavailable("the writer has stopped".into()))?
    }
}

struct Actor<L> {
    log: L,
    /// The committed state of every stream of every aggregate.
    states: States,
    /// Next offset per partition that this writer has seen (restored or appended).
    offsets: Offsets,
    idempotency: IdempotencyCache,
    ready: Arc<AtomicBool>,
    max_batch: usize,
    recovering: bool,
}

/// How long the writer waits between attempts to reach the log again: 100 ms doubling up to 5 s.
const RECOVERY_BACKOFF: Policy = Policy::new(Duration::from_millis(100), Duration::from_secs(5));

/// A decided command waiting for its batch to be appended.
struct Pending {
    sub: Submission,
    outcome: Result<Decided, DomainError>,
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
    async fn run(mut self, mut rx: mpsc::Receiver<Submission>) {
        let mut backoff = RECOVERY_BACKOFF.backoff();
        loop {
            if self.recovering {
                match self.recover().await {
                    Ok(()) => {
                        self.recovering = false;
                        self.ready.store(true, Ordering::Release);
                        backoff.reset();
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error.message = %e, retry_in_ms = delay.as_millis() as u64, "event log unavailable; commands get 503 until it is back");
                        let until = Instant::now() + delay;
                        // Refuse what arrives meanwhile: nothing is appended while recovering.
                        while let Ok(Some(s)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
                            let _ = s.reply.send(Err(WriteError::Unavailable(e.to_string())));
                        }
                        continue;
                    }
                }
            }
            let Some(first) = rx.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            self.process(batch).await;
        }
    }

    /// Connects to the log and reads everything this writer has not seen yet.
    /// Reads the log from the offsets restored so far and applies every record to the state as it
    /// streams in (nothing is buffered, so memory follows the number of tasks, not of events). A
    /// failure part-way keeps what was applied and the offsets it reached: the retry goes on from
    /// there.
    async fn recover(&mut self) -> Result<(), LogError> {
        self.ready.store(false, Ordering::Release);
        self.log.connect().await?;
        let started = Instant::now();
        let restoring =
            Arc::new(std::sync::Mutex::new(Restoring { states: std::mem::take(&mut self.states), next: self.offsets.clone(), ..Restoring::default() }));
        let sink = restoring.clone();
        let result = self.log.read_from(self.offsets.clone(), Box::new(move |pos, rec| sink.lock().unwrap_or_else(|e| e.into_inner()).apply(pos, rec))).await;
        let restored = std::mem::take(&mut *restoring.lock().unwrap_or_else(|e| e.into_inner()));
        self.states = restored.states;
        for (user, tag, answer) in restored.keyed {
            self.idempotency.remember(&user, &tag, answer).await;
        }
        match result {
            Ok(offsets) => self.offsets = offsets,
            Err(e) => {
                self.offsets = restored.next;
                return Err(e);
            }
        }
        tracing::info!(
            events = restored.applied,
            streams = self.states.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "state restored from the log"
        );
        Ok(())
    }

    async fn process(&mut self, batch: Vec<Submission>) {
        let now = Utc::now();
        let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        // State after this batch's accepted commands, not yet durable.
        let mut staged = States::default();
        let mut records: Vec<EncodedEvent> = Vec::new();
        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        for sub in batch {
            let mut stage = Stage {
                streams: Layered { committed: Some(&self.states), staged: &mut staged },
                records: &mut records,
                meta: &sub.meta,
                now,
                saw_staged: false,
            };
            let outcome = sub.cmd.visit(&mut stage);
            let saw_staged = stage.saw_staged;
            pending.push(Pending { sub, outcome, saw_staged });
        }
        if records.is_empty() {
            for p in pending {
                if let Err(e) = p.outcome {
                    let _ = p.sub.reply.send(Err(WriteError::Domain(e)));
                }
            }
            return;
        }
        let started = Instant::now();
        let n = records.len();
        let mut types: HashMap<&'static str, u64> = HashMap::new();
        for r in &records {
            *types.entry(r.event_type).or_default() += 1;
        }
        match self.log.append(records).await {
            Ok(positions) => {
                metrics::histogram!("command_api_append_seconds").record(started.elapsed().as_secs_f64());
                metrics::counter!("command_api_events_appended_total").increment(n as u64);
                for (t, count) in types {
                    metrics::counter!("events_published_total", "type" => t).increment(count);
                }
                for p in &positions {
                    let next = self.offsets.entry(p.partition).or_insert(0);
                    *next = (*next).max(p.offset + 1);
                }
                self.states.absorb(staged);
                for p in pending {
                    let answer = p.outcome.map(|d| Answer::new(d.receipt, d.version, positions[d.last_record])).map_err(WriteError::from);
                    let _ = p.sub.reply.send(answer);
                }
            }
            Err(e) => {
                tracing::warn!(error.message = %e, events = n, "append failed; nothing acknowledged");
                let msg = e.to_string();
                for p in pending {
                    // A refusal decided on state that was never made durable is not a real answer.
                    let reply = match p.outcome {
                        Err(d) if !p.saw_staged => Err(WriteError::Domain(d)),
                        _ => Err(WriteError::Unavailable(msg.clone())),
                    };
                    let _ = p.sub.reply.send(reply);
                }
                // The outcome of the failed transaction is learnt from the log itself.
                self.recovering = true;
            }
        }
    }
}

/// Decides one command against the state of its stream (staged by an earlier command of the batch,
/// or committed), stages the new state and encodes the events.
struct Stage<'a> {
    streams: Layered<'a>,
    records: &'a mut Vec<EncodedEvent>,
    meta: &'a CommandMeta,
    now: DateTime<Utc>,
    saw_staged: bool,
}

impl CommandVisitor for Stage<'_> {
    type Output = Result<Decided, DomainError>;

    fn command<D: Decider>(&mut self, cmd: &D::Command) -> Result<Decided, DomainError> {
        let id = D::stream_id(cmd);
        let actor = D::actor(cmd);
        self.saw_staged = self.streams.is_staged::<D>(&id);
        let events = D::decide(cmd, &self.streams.current::<D>(&id))?;
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
            };
            self.records.push(codec::encode(&Envelope { subject: id.clone(), meta, event }));
        }
        decided.ok_or_else(|| DomainError::Invalid(vec![FieldError::new("", "the command changes nothing")]))
    }
}

/// The state being rebuilt from the log during a restore.
#[derive(Default)]
struct Restoring {
    states: States,
    /// Next offset per partition after the records applied so far.
    next: Offsets,
    /// Answers of commands sent with an Idempotency-Key, to remember once restored.
    keyed: Vec<(UserId, IdempotencyTag, Answer)>,
    applied: u64,
}

impl Restoring {
    fn apply(&mut self, pos: Position, rec: Result<Record, codec::DecodeError>) {
        let next = self.next.entry(pos.partition).or_insert(0);
        *next = (*next).max(pos.offset + 1);
        let rec = match rec {
            Ok(rec) => rec,
            Err(e) => {
                metrics::counter!("command_api_restore_undecodable_total").increment(1);
                tracing::error!(partition = pos.partition, offset = pos.offset, error.message = %e, "skipping an undecodable record in the log");
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
        if version != env.meta.sequence {
            tracing::warn!(subject = %env.subject, expected = env.meta.sequence, got = version, "log sequence differs from replayed version");
        }
        Answer::new(D::receipt(&env.subject, &env.event), env.meta.sequence, self.position)
    }
}

type Subject<D> = <<D as Decider>::Event as DomainEvent>::Subject;

/// Applies one accepted event to its stream's state (and to no other stream's: every command is
/// decided from its own stream); returns the stream's version after it. The live path and the
/// restore both go through here.
fn apply_event<D: Decider>(streams: &mut Layered<'_>, id: &Subject<D>, actor: &UserId, event: &D::Event) -> u32 {
    let state = streams.state::<D>(id);
    *state = D::evolve(std::mem::take(state), actor, event);
    D::version(state)
}

/// The states of every stream, one map per aggregate (keyed by the decider's type).
#[derive(Default)]
struct States(HashMap<TypeId, Box<dyn AnyStreams>>);

/// One aggregate's states by stream id.
struct Streams<D: Decider>(HashMap<Subject<D>, D::State>, PhantomData<fn() -> D>);

trait AnyStreams: Send {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn len(&self) -> usize;
    /// Moves every state into `into`, replacing what it held for the same streams.
    fn merge_into(self: Box<Self>, into: &mut States);
}

impl<D: Decider> AnyStreams for Streams<D> {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn merge_into(self: Box<Self>, into: &mut States) {
        into.of::<D>().extend(self.0);
    }
}

impl States {
    fn get<D: Decider>(&self) -> Option<&HashMap<Subject<D>, D::State>> {
        self.0.get(&TypeId::of::<D>()).and_then(|s| s.as_any().downcast_ref::<Streams<D>>()).map(|s| &s.0)
    }

    fn of<D: Decider>(&mut self) -> &mut HashMap<Subject<D>, D::State> {
        let streams = self.0.entry(TypeId::of::<D>()).or_insert_with(|| Box::new(Streams::<D>(HashMap::new(), PhantomData)));
        &mut streams.as_any_mut().downcast_mut::<Streams<D>>().expect("keyed by the decider's type").0
    }

    /// Takes over every state of `staged` (a batch made durable).
    fn absorb(&mut self, staged: States) {
        for (_, streams) in staged.0 {
            streams.merge_into(self);
        }
    }

    fn len(&self) -> usize {
        self.0.values().map(|s| s.len()).sum()
    }
}

/// A batch's staged states over the committed ones: reads see staged first, writes go to staged.
struct Layered<'a> {
    committed: Option<&'a States>,
    staged: &'a mut States,
}

impl Layered<'_> {
    fn is_staged<D: Decider>(&self, id: &Subject<D>) -> bool {
        self.staged.get::<D>().is_some_and(|m| m.contains_key(id))
    }

    /// The stream's current state, to decide on (nothing is staged for a refused command).
    fn current<D: Decider>(&self, id: &Subject<D>) -> D::State {
        let staged = self.staged.get::<D>().and_then(|m| m.get(id));
        staged.or_else(|| self.committed.and_then(|c| c.get::<D>()).and_then(|m| m.get(id))).cloned().unwrap_or_default()
    }

    /// The stream's state to evolve (copied from the committed state on first touch).
    fn state<D: Decider>(&mut self, id: &Subject<D>) -> &mut D::State {
        let committed = self.committed;
        self.staged.of::<D>().entry(id.clone()).or_insert_with(|| committed.and_then(|c| c.get::<D>()).and_then(|m| m.get(id)).cloned().unwrap_or_default())
    }
}
