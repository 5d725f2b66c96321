//! The single writer: every command goes through one task that decides against the in-memory state
//! of all tasks and users (restored from the log at start), appends the accepted events of all
//! concurrent commands in one Kafka transaction (group commit), and only then answers. Commands on
//! one task are therefore applied in order, versions are contiguous, and the log never holds a
//! rejected event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use domain::user::{decide_user, evolve_user, UserCommand, UserCommandKind, UserEvent, UserState};
use domain::{decide, evolve, ids, Command, CommandKind, DomainError, TaskEvent, TaskId, TaskState, UserId};
use platform::codec::{self, EncodedEvent, EventEnvelope, IdempotencyTag, Record, UserEnvelope};
use platform::position::Position;

use crate::idempotency::{Answer, AnswerKind, IdempotencyCache};
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

/// A command on a task or on a user's own state.
#[derive(Debug, Clone)]
pub enum AnyCommand {
    Task(Command),
    User(UserCommand),
}

impl AnyCommand {
    fn user(&self) -> &UserId {
        match self {
            AnyCommand::Task(c) => &c.user,
            AnyCommand::User(c) => &c.user,
        }
    }
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
        let actor = Actor {
            log,
            tasks: HashMap::new(),
            users: HashMap::new(),
            offsets: Offsets::new(),
            idempotency,
            ready: ready.clone(),
            max_batch,
            recovering: true,
        };
        tokio::spawn(actor.run(rx));
        Self { tx, ready }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub async fn submit(&self, cmd: Command, meta: CommandMeta) -> Result<Answer, WriteError> {
        self.submit_any(AnyCommand::Task(cmd), meta).await
    }

    pub async fn submit_any(&self, cmd: AnyCommand, meta: CommandMeta) -> Result<Answer, WriteError> {
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
    tasks: HashMap<TaskId, TaskState>,
    users: HashMap<UserId, UserState>,
    /// Next offset per partition that this writer has seen (restored or appended).
    offsets: Offsets,
    idempotency: IdempotencyCache,
    ready: Arc<AtomicBool>,
    max_batch: usize,
    recovering: bool,
}

/// A decided command waiting for its batch to be appended.
struct Pending {
    sub: Submission,
    outcome: Result<(Uuid, AnswerKind, u32, bool, Option<Arc<str>>, usize), DomainError>,
    /// The decision looked at state staged by an earlier command of this batch.
    saw_staged: bool,
}

fn webhook_id(user: &UserId) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("taskstream:webhook:{user}").as_bytes())
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
    /// Reads the log from the offsets restored so far and applies every record to the state as it
    /// streams in (nothing is buffered, so memory follows the number of tasks, not of events). A
    /// failure part-way keeps what was applied and the offsets it reached: the retry goes on from
    /// there.
    async fn recover(&mut self) -> Result<(), LogError> {
        self.ready.store(false, Ordering::Release);
        self.log.connect().await?;
        let started = Instant::now();
        let restoring = Arc::new(std::sync::Mutex::new(Restoring {
            tasks: std::mem::take(&mut self.tasks),
            users: std::mem::take(&mut self.users),
            next: self.offsets.clone(),
            ..Restoring::default()
        }));
        let sink = restoring.clone();
        let result = self
            .log
            .read_from(self.offsets.clone(), Box::new(move |pos, rec| sink.lock().unwrap_or_else(|e| e.into_inner()).apply(pos, rec)))
            .await;
        let restored = std::mem::take(&mut *restoring.lock().unwrap_or_else(|e| e.into_inner()));
        self.tasks = restored.tasks;
        self.users = restored.users;
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
        tracing::info!(events = restored.applied, tasks = self.tasks.len(), users = self.users.len(), elapsed_ms = started.elapsed().as_millis() as u64, "state restored from the log");
        Ok(())
    }

    async fn process(&mut self, batch: Vec<Submission>) {
        let now = Utc::now();
        let now = chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        // State after this batch's accepted commands, not yet durable.
        let mut staged_tasks: HashMap<TaskId, TaskState> = HashMap::new();
        let mut staged_users: HashMap<UserId, UserState> = HashMap::new();
        let mut records: Vec<EncodedEvent> = Vec::new();
        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        for sub in batch {
            let meta = sub.meta.clone();
            let user = sub.cmd.user().clone();
            let (outcome, saw_staged) = match &sub.cmd {
                AnyCommand::Task(cmd) => {
                    let id = cmd.task_id;
                    let saw = staged_tasks.contains_key(&id);
                    let current = staged_tasks.get(&id).or_else(|| self.tasks.get(&id)).cloned().unwrap_or_default();
                    let outcome = decide(cmd, &current).map(|events| {
                        let mut state = current;
                        for event in events {
                            state = evolve(state, &cmd.user, &event);
                            if let TaskEvent::ReminderDue(r) = &event {
                                let u = staged_users.entry(user.clone()).or_insert_with(|| self.users.get(&user).cloned().unwrap_or_default());
                                *u = std::mem::take(u).with_notification(ids::reminder_notification_id(id, r.remind_at));
                            }
                            records.push(codec::encode(&EventEnvelope {
                                event_id: Uuid::now_v7(),
                                task_id: id,
                                user_id: user.clone(),
                                sequence: state.version(),
                                occurred_at: now,
                                correlation_id: meta.correlation_id.clone(),
                                causation_id: meta.causation_id.clone(),
                                traceparent: meta.traceparent.clone(),
                                idempotency: meta.idempotency.clone(),
                                event,
                            }));
                        }
                        let version = state.version();
                        staged_tasks.insert(id, state);
                        let created = matches!(cmd.kind, CommandKind::Create(_));
                        (*id.as_uuid(), AnswerKind::Task, version, created, None, records.len() - 1)
                    });
                    (outcome, saw)
                }
                AnyCommand::User(cmd) => {
                    let saw = staged_users.contains_key(&user);
                    let current = staged_users.get(&user).or_else(|| self.users.get(&user)).cloned().unwrap_or_default();
                    let outcome = decide_user(cmd, &current).map(|events| {
                        let mut state = current;
                        for event in events {
                            state = evolve_user(state, &event);
                            records.push(codec::encode_user(&UserEnvelope {
                                event_id: Uuid::now_v7(),
                                user_id: user.clone(),
                                sequence: state.version,
                                occurred_at: now,
                                correlation_id: meta.correlation_id.clone(),
                                causation_id: meta.causation_id.clone(),
                                traceparent: meta.traceparent.clone(),
                                idempotency: meta.idempotency.clone(),
                                event,
                            }));
                        }
                        let version = state.version;
                        staged_users.insert(user.clone(), state);
                        let (id, kind, secret) = match &cmd.kind {
                            UserCommandKind::MarkNotificationRead(n) => (*n, AnswerKind::Notification, None),
                            UserCommandKind::SetWebhook { secret, .. } => (webhook_id(&user), AnswerKind::Webhook, Some(secret.as_str().into())),
                            UserCommandKind::RemoveWebhook => (webhook_id(&user), AnswerKind::Webhook, None),
                        };
                        (id, kind, version, false, secret, records.len() - 1)
                    });
                    (outcome, saw)
                }
            };
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
                self.tasks.extend(staged_tasks);
                self.users.extend(staged_users);
                for p in pending {
                    let answer = p
                        .outcome
                        .map(|(id, kind, version, created, secret, last)| {
                            let mut a = Answer::new(id, kind, version, positions[last], created);
                            a.secret = secret;
                            a
                        })
                        .map_err(WriteError::from);
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

/// The state being rebuilt from the log during a restore.
#[derive(Default)]
struct Restoring {
    tasks: HashMap<TaskId, TaskState>,
    users: HashMap<UserId, UserState>,
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
        let (user, tag, answer) = match &rec {
            Record::Task(env) => {
                let entry = self.tasks.entry(env.task_id).or_default();
                let next = evolve(std::mem::take(entry), &env.user_id, &env.event);
                if next.version() != env.sequence {
                    tracing::warn!(task_id = %env.task_id, expected = env.sequence, got = next.version(), "log sequence differs from replayed version");
                }
                *entry = next;
                if let TaskEvent::ReminderDue(r) = &env.event {
                    let u = self.users.entry(env.user_id.clone()).or_default();
                    *u = std::mem::take(u).with_notification(ids::reminder_notification_id(env.task_id, r.remind_at));
                }
                let created = matches!(env.event, TaskEvent::Created(_));
                let answer = Answer::new(*env.task_id.as_uuid(), AnswerKind::Task, env.sequence, pos, created);
                (&env.user_id, &env.idempotency, answer)
            }
            Record::User(env) => {
                let u = self.users.entry(env.user_id.clone()).or_default();
                *u = evolve_user(std::mem::take(u), &env.event);
                let (id, kind, secret) = match &env.event {
                    UserEvent::NotificationRead(e) => (e.notification_id, AnswerKind::Notification, None),
                    UserEvent::WebhookRegistered(e) => (webhook_id(&env.user_id), AnswerKind::Webhook, Some(e.secret.as_str().into())),
                    UserEvent::WebhookRemoved => (webhook_id(&env.user_id), AnswerKind::Webhook, None),
                };
                let mut answer = Answer::new(id, kind, env.sequence, pos, false);
                answer.secret = secret;
                (&env.user_id, &env.idempotency, answer)
            }
        };
        if let Some(tag) = tag {
            self.keyed.push((user.clone(), tag.clone(), answer));
        }
    }
}
