//! The single writer: every command goes through one task that decides against the in-memory state
//! of all tasks (restored from the log at start), appends the accepted events of all concurrent
//! commands in one Kafka transaction (group commit), and only then answers. Commands on one task are
//! therefore applied in order, versions are contiguous, and the log never holds a rejected event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use domain::{decide, evolve, Command, CommandKind, DomainError, TaskId, TaskState};
use platform::codec::{self, DecodeError, EventEnvelope, IdempotencyTag};
use platform::position::Position;

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
    cmd: Command,
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
        let actor = Actor { log, state: HashMap::new(), offsets: Offsets::new(), idempotency, ready: ready.clone(), max_batch, recovering: true };
        tokio::spawn(actor.run(rx));
        Self { tx, ready }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub async fn submit(&self, cmd: Command, meta: CommandMeta) -> Result<Answer, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submission { cmd, meta, reply })
            .await
            .map_err(|_| WriteError::Unavailable("the writer has stopped".into()))?;
        rx.await.map_err(|_| WriteError::Unavailable("the writer has stopped".into()))?
    }
}

struct Actor<L> {
    log: L,
    state: HashMap<TaskId, TaskState>,
    /// Next offset per partition that this writer has seen (restored or appended).
    offsets: Offsets,
    idempotency: IdempotencyCache,
    ready: Arc<AtomicBool>,
    max_batch: usize,
    recovering: bool,
}

impl<L: EventLog> Actor<L> {
    async fn run(mut self, mut rx: mpsc::Receiver<Submission>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.recovering {
                match self.recover().await {
                    Ok(()) => {
                        self.recovering = false;
                        self.ready.store(true, Ordering::Release);
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::warn!(error.message = %e, retry_in_ms = backoff.as_millis() as u64, "event log unavailable; commands get 503 until it is back");
                        let until = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
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
    async fn recover(&mut self) -> Result<(), LogError> {
        self.ready.store(false, Ordering::Release);
        self.log.connect().await?;
        let started = Instant::now();
        let mut seen: Vec<(Position, Result<EventEnvelope, DecodeError>)> = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let offsets = self
            .log
            .read_from(self.offsets.clone(), Box::new(move |pos, env| {
                let _ = tx.send((pos, env));
            }))
            .await?;
        seen.extend(rx.try_iter());
        let mut applied = 0u64;
        for (pos, env) in seen {
            match env {
                Ok(env) => {
                    self.apply_restored(pos, &env).await;
                    applied += 1;
                }
                Err(e) => {
                    metrics::counter!("command_api_restore_undecodable_total").increment(1);
                    tracing::error!(partition = pos.partition, offset = pos.offset, error.message = %e, "skipping an undecodable record in the log");
                }
            }
        }
        self.offsets = offsets;
        tracing::info!(events = applied, tasks = self.state.len(), elapsed_ms = started.elapsed().as_millis() as u64, "state restored from the log");
        Ok(())
    }

    async fn apply_restored(&mut self, pos: Position, env: &EventEnvelope) {
        let entry = self.state.entry(env.task_id).or_default();
        let next = evolve(std::mem::take(entry), &env.user_id, &env.event);
        if next.version() != env.sequence {
            tracing::warn!(task_id = %env.task_id, expected = env.sequence, got = next.version(), "log sequence differs from replayed version");
        }
        *entry = next;
        if let Some(tag) = &env.idempotency {
            let answer = Answer { task_id: env.task_id, version: env.sequence, position: pos, created: matches!(env.event, domain::TaskEvent::Created(_)) };
            self.idempotency.remember(&env.user_id, tag, answer).await;
        }
    }

    async fn process(&mut self, batch: Vec<Submission>) {
        let now = Utc::now();
        let now = chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        // State after this batch's accepted commands, not yet durable.
        let mut staged: HashMap<TaskId, TaskState> = HashMap::new();
        let mut records = Vec::new();
        // (reply, outcome before the log decides, index of the command's last record, saw staged state)
        let mut outcomes: Vec<(Submission, Result<(TaskId, u32, bool, usize), DomainError>, bool)> = Vec::with_capacity(batch.len());
        for sub in batch {
            let id = sub.cmd.task_id;
            let from_staged = staged.contains_key(&id);
            let current = staged.get(&id).or_else(|| self.state.get(&id)).cloned().unwrap_or_default();
            match decide(&sub.cmd, &current) {
                Err(e) => outcomes.push((sub, Err(e), from_staged)),
                Ok(events) => {
                    let mut state = current;
                    for event in events {
                        state = evolve(state, &sub.cmd.user, &event);
                        let env = EventEnvelope {
                            event_id: Uuid::now_v7(),
                            task_id: id,
                            user_id: sub.cmd.user.clone(),
                            sequence: state.version(),
                            occurred_at: now,
                            correlation_id: sub.meta.correlation_id.clone(),
                            causation_id: sub.meta.causation_id.clone(),
                            traceparent: sub.meta.traceparent.clone(),
                            idempotency: sub.meta.idempotency.clone(),
                            event,
                        };
                        records.push(codec::encode(&env));
                    }
                    let version = state.version();
                    staged.insert(id, state);
                    let created = matches!(sub.cmd.kind, CommandKind::Create(_));
                    outcomes.push((sub, Ok((id, version, created, records.len() - 1)), from_staged));
                }
            }
        }
        if records.is_empty() {
            for (sub, outcome, _) in outcomes {
                if let Err(e) = outcome {
                    let _ = sub.reply.send(Err(WriteError::Domain(e)));
                }
            }
            return;
        }
        let started = Instant::now();
        let n = records.len();
        match self.log.append(records).await {
            Ok(positions) => {
                metrics::histogram!("command_api_append_seconds").record(started.elapsed().as_secs_f64());
                metrics::counter!("command_api_events_appended_total").increment(n as u64);
                for p in &positions {
                    let next = self.offsets.entry(p.partition).or_insert(0);
                    *next = (*next).max(p.offset + 1);
                }
                self.state.extend(staged);
                for (sub, outcome, _) in outcomes {
                    let answer = outcome
                        .map(|(task_id, version, created, last)| Answer { task_id, version, position: positions[last], created })
                        .map_err(WriteError::from);
                    let _ = sub.reply.send(answer);
                }
            }
            Err(e) => {
                tracing::warn!(error.message = %e, events = n, "append failed; nothing acknowledged");
                let msg = e.to_string();
                for (sub, outcome, from_staged) in outcomes {
                    // A refusal decided on state that was never made durable is not a real answer.
                    let reply = match outcome {
                        Err(d) if !from_staged => Err(WriteError::Domain(d)),
                        _ => Err(WriteError::Unavailable(msg.clone())),
                    };
                    let _ = sub.reply.send(reply);
                }
                // The outcome of the failed transaction is learnt from the log itself.
                self.recovering = true;
            }
        }
    }
}

