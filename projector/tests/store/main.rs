//! The projector's store against a real PostgreSQL (a fresh database per test, from
//! `test_support`; `DATABASE_URL` is required, `./dev test` sets it): exactly-once offsets,
//! reactions recorded live but never during a replay, the notifications' record in the user's
//! stream (the reaction, the read model unchanged by `notification.created`, the backfill of old
//! ones), and how the reactor takes the command API's answers (against a stand-in command API).
//! `rebuild`: the rebuild's bulk phase, and whole rebuilds over a real log (`KAFKA_BROKERS` too).

mod rebuild;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use domain::user::{NotificationCreated, NotificationRead, UserEvent};
use domain::{ids, NewTask, Recurrence, RemindBefore, ReminderDue, TaskEvent, TaskId, TaskPatch, Title, UserId};
use platform::auth::JwtAuth;
use platform::codec::{Envelope, Metadata};
use platform::position::Position;
use platform::secret::Secret;
use projector::model::{self, Batch, Recorded, RecordedUser};
use projector::reactor::{self, Failure, Reactor};
use projector::store::{self, ApplyMode, StoreError};
use test_support::{fresh_database, TestDatabase};

const TOPIC: &str = "task-events";

/// A fresh migrated database (`DATABASE_URL` is required) with partition 0's offsets initialised.
async fn fresh_store() -> (TestDatabase, PgPool) {
    let db = fresh_database().await;
    store::init_offsets(&db.pool, TOPIC, &[0]).await.unwrap();
    let pool = db.pool.clone();
    (db, pool)
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_900_000_000 + secs, 0).unwrap()
}

/// A recurring task with a reminder: created, reminded, completed (offsets 0, 1, 2).
fn history(task: TaskId) -> Batch {
    let mut t = NewTask::new(Title::parse("water plants".into()).unwrap());
    t.due_at = Some(at(3600));
    t.recurrence = Some(Recurrence::parse("FREQ=DAILY".into()).unwrap());
    t.remind_before = Some(RemindBefore::parse("PT10M".into()).unwrap());
    let events = [TaskEvent::Created(t), TaskEvent::ReminderDue(ReminderDue { remind_at: at(3000), due_at: at(3600) }), TaskEvent::Completed];
    let mut batch = Batch::default();
    for (i, event) in events.into_iter().enumerate() {
        batch.tasks.push(Recorded {
            position: Position { partition: 0, offset: i as i64 },
            envelope: Envelope {
                subject: task,
                meta: Metadata {
                    event_id: Uuid::now_v7(),
                    user_id: UserId::parse("alice".into()).unwrap(),
                    sequence: i as u32 + 1,
                    occurred_at: at(i as i64 * 1000),
                    correlation_id: None,
                    causation_id: None,
                    traceparent: None,
                    idempotency: None,
                    data_key: None,
                },
                event,
            },
        });
    }
    batch.to.insert(0, 3);
    batch
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn live_mode_records_reactions_and_replay_never_does() {
    // Live: the next occurrence and the reminder's RecordNotification; one webhook delivery.
    for (mode, outbox, deliveries) in [(ApplyMode::Live, 2, 1), (ApplyMode::Replay, 0, 0)] {
        let (db, pool) = fresh_store().await;
        sqlx::query("INSERT INTO webhooks (user_id, url, secret, version, updated_at) VALUES ('alice', 'https://hooks.example.com/x', 's', 1, now())")
            .execute(&pool)
            .await
            .unwrap();
        let applied = store::apply_batch(&pool, TOPIC, &history(TaskId::new_v7()), &HashMap::from([(0, 0)]), mode).await.unwrap();
        assert_eq!((applied.reactions, applied.deliveries), (outbox as usize, deliveries as usize), "{mode:?}");
        // The read models are the same either way...
        assert_eq!(count(&pool, "SELECT count(*) FROM tasks WHERE status = 'completed'").await, 1);
        assert_eq!(count(&pool, "SELECT count(*) FROM task_history").await, 3);
        assert_eq!(count(&pool, "SELECT count(*) FROM notifications").await, 1);
        assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 0);
        // ...but only a live apply asks for side effects.
        assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, outbox, "{mode:?}");
        assert_eq!(count(&pool, "SELECT count(*) FROM webhook_deliveries").await, deliveries, "{mode:?}");
        db.drop_database().await.unwrap();
    }
}

#[tokio::test]
async fn offsets_move_only_with_the_rows_and_a_second_writer_is_fenced() {
    let (db, pool) = fresh_store().await;
    let batch = history(TaskId::new_v7());
    store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    assert_eq!(count(&pool, "SELECT min(next_offset) FROM projection_offsets").await, 3);
    // Another instance that still believes the partition is at 0 cannot apply the batch again.
    let again = store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 0)]), ApplyMode::Live).await;
    assert!(matches!(again, Err(StoreError::Fenced { .. })), "{again:?}");
    assert_eq!(count(&pool, "SELECT count(*) FROM task_history").await, 3);
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, 2);
    db.drop_database().await.unwrap();
}

/// Large batches add their history rows with COPY; when the log repeats events whose rows are
/// there already (the same event ids, or a task's version), the batch is written again skipping
/// them, in the same transaction: the new events are recorded, the repeated ones once, and the
/// offsets move.
#[tokio::test]
async fn a_batch_that_repeats_recorded_events_adds_only_the_new_ones() {
    let (db, pool) = fresh_store().await;
    let task = TaskId::new_v7();
    let first = history(task);
    store::apply_batch(&pool, TOPIC, &first, &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    // The log holds the three events again at offsets 3-5, then reopenings and completions
    // (versions 4 on) at 6 on: enough rows for COPY.
    let mut repeated = Batch::default();
    for (i, r) in first.tasks.iter().enumerate() {
        let mut again = r.clone();
        again.position.offset = 3 + i as i64;
        repeated.tasks.push(again);
    }
    let new = store::COPY_MIN_ROWS as i64 + 1;
    let events = (0..new).map(|i| if i % 2 == 0 { TaskEvent::Reopened } else { TaskEvent::Completed }).collect();
    for (i, mut r) in events_batch(task, 4, events).tasks.into_iter().enumerate() {
        r.position.offset = 6 + i as i64;
        repeated.tasks.push(r);
    }
    repeated.to.insert(0, 6 + new);
    store::apply_batch(&pool, TOPIC, &repeated, &HashMap::from([(0, 3)]), ApplyMode::Live).await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM task_history").await, 3 + new);
    assert_eq!(count(&pool, "SELECT max(version)::int8 FROM task_history").await, 3 + new);
    assert_eq!(count(&pool, "SELECT max(log_offset) FROM task_history WHERE version < 4").await, 2, "a repeated event keeps its first row");
    assert_eq!(count(&pool, &format!("SELECT count(*) FROM tasks WHERE status = 'open' AND version = {}", 3 + new)).await, 1);
    assert_eq!(count(&pool, "SELECT min(next_offset) FROM projection_offsets").await, 6 + new);
    db.drop_database().await.unwrap();
}

/// Two instances that both believe they own partition 0 (a zombie whose partition moved while it
/// was cut off, and the new owner) apply the same records at the same time: the first to commit
/// wins; the other waits on the first's row locks, then fails the compare-and-set and is rolled
/// back whole (rows, history, outbox): nothing is applied twice.
#[tokio::test]
async fn a_zombie_batch_racing_the_new_owner_is_fenced_and_rolled_back() {
    zombie_race(history(TaskId::new_v7())).await;
}

/// The same race over a batch large enough for COPY: the zombie's COPY of the new task rows waits
/// for the owner's uncommitted ones, fails on their keys once the owner commits, and the rows are
/// written again with the upsert (which finds them as new as its own) before the compare-and-set
/// fences the zombie.
#[tokio::test]
async fn a_large_zombie_batch_racing_the_new_owner_is_fenced_and_rolled_back() {
    let mut batch = Batch::default();
    for i in 0..store::COPY_MIN_ROWS as i64 {
        for mut r in history(TaskId::new_v7()).tasks {
            r.position.offset += 3 * i;
            batch.tasks.push(r);
        }
    }
    batch.to.insert(0, batch.tasks.len() as i64);
    zombie_race(batch).await;
}

async fn zombie_race(batch: Batch) {
    let (db, pool) = fresh_store().await;
    let (records, tasks) = (batch.tasks.len() as i64, batch.tasks.len() as i64 / 3);
    let from = HashMap::from([(0, 0)]);
    let mut owner = pool.begin().await.unwrap();
    store::apply_batch_in(&mut owner, TOPIC, &batch, &from, ApplyMode::Live).await.unwrap();
    let zombie = {
        let (pool, batch, from) = (pool.clone(), batch.clone(), from.clone());
        tokio::spawn(async move { store::apply_batch(&pool, TOPIC, &batch, &from, ApplyMode::Live).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&pool, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await == 0 {
        assert!(Instant::now() < deadline && !zombie.is_finished(), "the zombie must wait for the owner's row locks");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    owner.commit().await.unwrap();
    let late = zombie.await.unwrap();
    assert!(matches!(late, Err(StoreError::Fenced { .. })), "{late:?}");
    assert_eq!(count(&pool, "SELECT min(next_offset) FROM projection_offsets").await, records);
    assert_eq!(count(&pool, "SELECT count(*) FROM task_history").await, records);
    assert_eq!(count(&pool, "SELECT count(*) FROM tasks WHERE status = 'completed' AND version = 3").await, tasks);
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, 2 * tasks);
    db.drop_database().await.unwrap();
}

/// A batch of one user-level event at `offset` of partition 0.
fn user_batch(offset: i64, sequence: u32, event: UserEvent) -> Batch {
    let mut batch = Batch::default();
    batch.users.push(RecordedUser {
        position: Position { partition: 0, offset },
        envelope: Envelope {
            subject: UserId::parse("alice".into()).unwrap(),
            meta: Metadata {
                event_id: Uuid::now_v7(),
                user_id: UserId::parse("alice".into()).unwrap(),
                sequence,
                occurred_at: at(10_000 + offset),
                correlation_id: None,
                causation_id: None,
                traceparent: None,
                idempotency: None,
                data_key: None,
            },
            event,
        },
    });
    batch.to.insert(0, offset + 1);
    batch
}

async fn notification_rows(pool: &PgPool) -> Vec<(Uuid, String, Option<DateTime<Utc>>)> {
    sqlx::query_as("SELECT n.id, n.message, r.read_at FROM notifications n LEFT JOIN notification_reads r ON r.notification_id = n.id ORDER BY n.id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_fired_reminder_records_its_notification_in_the_users_stream_and_notification_created_changes_no_row() {
    let (db, pool) = fresh_store().await;
    let task = TaskId::new_v7();
    store::apply_batch(&pool, TOPIC, &history(task), &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    let id = ids::reminder_notification_id(task, at(3000));
    let (kind, user, payload): (String, String, serde_json::Value) =
        sqlx::query_as("SELECT kind, user_id, payload FROM reaction_outbox WHERE id = $1").bind(id).fetch_one(&pool).await.unwrap();
    assert_eq!((kind.as_str(), user.as_str()), ("record_notification", "alice"));
    assert_eq!(payload, serde_json::json!({ "task_id": task, "remind_at": at(3000) }));
    let before = notification_rows(&pool).await;
    assert_eq!(before.len(), 1);
    // The user stream's record of it leaves the rows as a log without it gives them (old logs).
    let created = UserEvent::NotificationCreated(NotificationCreated { notification_id: id, task_id: task, remind_at: at(3000) });
    store::apply_batch(&pool, TOPIC, &user_batch(3, 1, created), &HashMap::from([(0, 3)]), ApplyMode::Live).await.unwrap();
    assert_eq!(notification_rows(&pool).await, before);
    // The read mark still comes from notification.read.
    let read = UserEvent::NotificationRead(NotificationRead { notification_id: id });
    store::apply_batch(&pool, TOPIC, &user_batch(4, 2, read), &HashMap::from([(0, 4)]), ApplyMode::Live).await.unwrap();
    assert_eq!(notification_rows(&pool).await[0].2, Some(at(10_004)));
    db.drop_database().await.unwrap();
}

/// The migration that queues RecordNotification for notifications projected before the user's
/// stream recorded them: once per unread notification, with the very body the live fold writes
/// (so a re-send under the same Idempotency-Key is the same request).
#[tokio::test]
async fn notifications_from_before_notification_created_are_queued_for_recording_once_if_unread() {
    const BACKFILL: &str = include_str!("../../../migrations/20261124100000_record_existing_notifications.sql");
    let (db, pool) = fresh_store().await;
    let (unread, read) = (TaskId::new_v7(), TaskId::new_v7());
    let mut both = history(unread);
    let mut second = history(read);
    for r in &mut second.tasks {
        r.position.offset += 3;
    }
    both.tasks.append(&mut second.tasks);
    both.to.insert(0, 6);
    store::apply_batch(&pool, TOPIC, &both, &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    let live: Vec<(Uuid, String, String, Uuid, serde_json::Value, Uuid)> =
        sqlx::query_as("SELECT id, kind, user_id, task_id, payload, causation_id FROM reaction_outbox WHERE kind = 'record_notification' AND task_id = $1")
            .bind(unread.as_uuid())
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(live.len(), 1);
    // As the database of an older projector holds them: no outbox rows, one of the two read.
    sqlx::query("DELETE FROM reaction_outbox").execute(&pool).await.unwrap();
    let read_id = ids::reminder_notification_id(read, at(3000));
    let mark = UserEvent::NotificationRead(NotificationRead { notification_id: read_id });
    store::apply_batch(&pool, TOPIC, &user_batch(6, 1, mark), &HashMap::from([(0, 6)]), ApplyMode::Live).await.unwrap();
    for _ in 0..2 {
        sqlx::raw_sql(BACKFILL).execute(&pool).await.unwrap();
        let queued: Vec<(Uuid, String, String, Uuid, serde_json::Value, Uuid)> =
            sqlx::query_as("SELECT id, kind, user_id, task_id, payload, causation_id FROM reaction_outbox").fetch_all(&pool).await.unwrap();
        assert_eq!(queued, live);
    }
    db.drop_database().await.unwrap();
}

/// A request the stand-in command API received.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    path: String,
    key: Option<String>,
    body: serde_json::Value,
}

/// How the stand-in answers a request (status, body), given the earlier ones.
type Answer = Arc<dyn Fn(&Seen, &[Seen]) -> (u16, String) + Send + Sync>;

/// A stand-in for the command API on a free port: answers what `answer` decides and remembers
/// every request.
struct FakeCommandApi {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Arc<Mutex<Answer>>,
    /// How long it takes to answer (a slow command API).
    delay: Arc<Mutex<Duration>>,
}

impl FakeCommandApi {
    async fn start(answer: Answer) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let answer = Arc::new(Mutex::new(answer));
        let delay: Arc<Mutex<Duration>> = Arc::default();
        let (s, a, d) = (seen.clone(), answer.clone(), delay.clone());
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let (seen, answer, delay) = (s.clone(), a.clone(), d.clone());
            async move {
                let request = Seen {
                    path: uri.path().to_owned(),
                    key: headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned),
                    body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
                };
                let (status, text) = {
                    let mut seen = seen.lock().unwrap();
                    let answer = (answer.lock().unwrap())(&request, &seen[..]);
                    seen.push(request);
                    answer
                };
                let delay = *delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                (axum::http::StatusCode::from_u16(status).unwrap(), [(axum::http::header::CONTENT_TYPE, "application/problem+json")], text)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, seen, answer, delay }
    }

    fn answer_with(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Answers each request only after `delay` (requests are received, and counted, at once).
    fn answer_after(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn reactor(&self, pool: &PgPool) -> Reactor {
        let auth = JwtAuth::new(&Secret::new("store-test-user-secret")).with_service_secret(Some(&Secret::new("store-test-service-secret")));
        Reactor::new(pool.clone(), self.url.clone(), auth, false).unwrap()
    }
}

/// The command API's problem+json for `status`.
fn problem(status: u16, slug: &str) -> String {
    serde_json::json!({ "type": format!("urn:taskstream:problem:{slug}"), "title": "t", "status": status, "detail": "d" }).to_string()
}

/// Always the same answer.
fn always(status: u16, body: String) -> Answer {
    Arc::new(move |_: &Seen, _: &[Seen]| (status, body.clone()))
}

/// Whatever waits for a retry is due now (as if its backoff had passed).
async fn backoff_over(pool: &PgPool) {
    sqlx::query("UPDATE reminder_attempts SET next_attempt_at = now()").execute(pool).await.unwrap();
    sqlx::query("UPDATE reaction_outbox SET next_attempt_at = now()").execute(pool).await.unwrap();
}

async fn schedule_due_reminder(pool: &PgPool, task: Uuid) {
    sqlx::query("INSERT INTO reminder_schedule (task_id, user_id, remind_at) VALUES ($1, 'alice', now() - interval '1 second')")
        .bind(task)
        .execute(pool)
        .await
        .unwrap();
}

/// The reminders a pass fired leave the schedule in one statement, which skips the rows a batch
/// being applied holds instead of waiting for them (waiting deadlocked with such batches under a
/// burst of reminders: both lock several rows). The skipped one keeps its claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fired_reminders_leave_the_schedule_without_waiting_for_rows_a_batch_holds() {
    let (db, pool) = fresh_store().await;
    let fake = FakeCommandApi::start(always(200, "{}".into())).await;
    fake.answer_after(Duration::from_secs(1));
    let sender = fake.reactor(&pool);
    let (held, free) = (Uuid::now_v7(), Uuid::now_v7());
    schedule_due_reminder(&pool, held).await;
    schedule_due_reminder(&pool, free).await;
    let pass = tokio::spawn(async move { sender.fire_due_reminders().await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.seen().len() < 2 {
        assert!(Instant::now() < deadline, "the pass never fired both reminders");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A batch being applied holds one of the two rows (as applying its task's events does).
    let mut batch = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM reminder_schedule WHERE task_id = $1 FOR UPDATE").bind(held).execute(&mut *batch).await.unwrap();
    let fired = tokio::time::timeout(Duration::from_secs(30), pass).await.expect("the pass waited for the row the batch holds");
    assert_eq!(fired.unwrap().unwrap(), 2);
    let scheduled: Vec<Uuid> = sqlx::query_scalar("SELECT task_id FROM reminder_schedule").fetch_all(&pool).await.unwrap();
    assert_eq!(scheduled, [held], "the free row is gone, the held one skipped");
    let claimed: Vec<(Uuid, bool)> = sqlx::query_as("SELECT task_id, claimed_until > now() FROM reminder_attempts").fetch_all(&pool).await.unwrap();
    assert_eq!(claimed, [(held, true)], "the skipped reminder keeps its claim (not fired again at once)");
    batch.rollback().await.unwrap();
    db.drop_database().await.unwrap();
}

/// Issue 11, defect 3: a 401 (the projector's SERVICE_JWT_SECRET differs from the command API's)
/// used to delete the reminder for good. Only a definitive "stale" answer may drop one.
#[tokio::test]
async fn a_reminder_refused_for_authentication_is_kept_retried_with_backoff_and_reported_until_it_fires() {
    let (db, pool) = fresh_store().await;
    let fake = FakeCommandApi::start(always(401, problem(401, "unauthorized"))).await;
    let sender = fake.reactor(&pool);
    let task = Uuid::now_v7();
    schedule_due_reminder(&pool, task).await;
    assert_eq!(sender.fire_due_reminders().await.unwrap(), 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 1, "a 401 must not drop the reminder");
    let (attempts, failure, later): (i32, String, bool) =
        sqlx::query_as("SELECT attempts, failure, next_attempt_at > now() FROM reminder_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!((attempts, failure.as_str(), later), (1, "auth", true));
    // Not sent again before its backoff is over.
    assert_eq!(sender.fire_due_reminders().await.unwrap(), 0);
    assert_eq!(fake.seen().len(), 1);
    assert_eq!(fake.seen()[0].path, format!("/internal/v1/tasks/{task}/remind"));
    // Reported (readyz, status, gauges).
    let (failure, error) = reactor::configuration_failure(&pool).await.unwrap().expect("a configuration failure");
    assert_eq!(failure, Failure::Auth);
    assert!(error.contains("401"), "{error}");
    let waiting = reactor::waiting(&pool).await.unwrap();
    assert_eq!(waiting.iter().map(|w| (w.reaction.as_str(), w.failure, w.count)).collect::<Vec<_>>(), [(reactor::FIRE_REMINDER, Failure::Auth, 1)]);

    // Another server's 404 (a wrong COMMAND_API_URL) is no "task gone" either.
    fake.answer_with(always(404, "<html>Not Found</html>".into()));
    backoff_over(&pool).await;
    assert_eq!(sender.fire_due_reminders().await.unwrap(), 1);
    let (attempts, failure): (i32, String) = sqlx::query_as("SELECT attempts, failure FROM reminder_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!((attempts, failure.as_str()), (2, "config"));
    assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 1);

    // Accepted: fired, and nothing waits any more.
    fake.answer_with(always(200, "{}".into()));
    backoff_over(&pool).await;
    assert_eq!(sender.fire_due_reminders().await.unwrap(), 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM reminder_attempts").await, 0);
    assert_eq!(reactor::configuration_failure(&pool).await.unwrap(), None);
    assert!(reactor::waiting(&pool).await.unwrap().is_empty());

    // The command API's definitive "stale" answers drop one: the task is gone, or the reminder
    // already fired or was moved.
    for (status, slug) in [(404, "not-found"), (409, "conflict")] {
        fake.answer_with(always(status, problem(status, slug)));
        schedule_due_reminder(&pool, Uuid::now_v7()).await;
        assert_eq!(sender.fire_due_reminders().await.unwrap(), 1);
        assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 0, "{status}");
        assert_eq!(count(&pool, "SELECT count(*) FROM reminder_attempts").await, 0, "{status}");
    }
    db.drop_database().await.unwrap();
}

/// The batch of `events` for `task`, at sequence numbers and offsets from `first` on.
fn events_batch(task: TaskId, first: u32, events: Vec<TaskEvent>) -> Batch {
    let mut batch = Batch::default();
    for (i, event) in events.into_iter().enumerate() {
        let sequence = first + i as u32;
        batch.tasks.push(Recorded {
            position: Position { partition: 0, offset: i64::from(sequence) - 1 },
            envelope: Envelope {
                subject: task,
                meta: Metadata {
                    event_id: Uuid::now_v7(),
                    user_id: UserId::parse("alice".into()).unwrap(),
                    sequence,
                    occurred_at: at(i64::from(sequence) * 1000),
                    correlation_id: None,
                    causation_id: None,
                    traceparent: None,
                    idempotency: None,
                    data_key: None,
                },
                event,
            },
        });
    }
    batch.to.insert(0, i64::from(first) - 1 + batch.tasks.len() as i64);
    batch
}

/// Issue 11, defect 4: complete a recurring task, edit its title, reopen and complete again: the
/// next-occurrence reaction comes again under the same Idempotency-Key with another body, which the
/// command API answers 422 `idempotency-key-reused`; that reaction was marked failed for good. It
/// is already done (the command API remembers only a key whose command succeeded).
#[tokio::test]
async fn a_next_occurrence_reaction_repeated_after_an_edit_is_recognised_as_already_done() {
    let (db, pool) = fresh_store().await;
    // Like the command API: a key's first request succeeds, a repeat with another body is refused.
    let idempotent: Answer = Arc::new(|now: &Seen, before: &[Seen]| match before.iter().find(|s| s.key == now.key) {
        Some(first) if first.body != now.body => (422, problem(422, "idempotency-key-reused")),
        _ => (201, "{}".into()),
    });
    let fake = FakeCommandApi::start(idempotent).await;
    let sender = fake.reactor(&pool);
    let task = TaskId::new_v7();
    let mut t = NewTask::new(Title::parse("water plants".into()).unwrap());
    t.due_at = Some(at(3600));
    t.recurrence = Some(Recurrence::parse("FREQ=DAILY".into()).unwrap());
    store::apply_batch(&pool, TOPIC, &events_batch(task, 1, vec![TaskEvent::Created(t), TaskEvent::Completed]), &HashMap::from([(0, 0)]), ApplyMode::Live)
        .await
        .unwrap();
    assert_eq!(sender.send_outbox().await.unwrap(), 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, 0);
    let edit = TaskEvent::Updated(TaskPatch { title: Some(Title::parse("water the plants".into()).unwrap()), ..Default::default() });
    let again = events_batch(task, 3, vec![edit, TaskEvent::Reopened, TaskEvent::Completed]);
    store::apply_batch(&pool, TOPIC, &again, &HashMap::from([(0, 2)]), ApplyMode::Live).await.unwrap();
    assert_eq!(sender.send_outbox().await.unwrap(), 1);
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].path.as_str(), &seen[0].key), ("/v1/tasks", &seen[1].key));
    assert_ne!(seen[0].body, seen[1].body, "the repeat carries the edited title");
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox WHERE failed").await, 0, "a repeated reaction must not be marked failed");
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, 0);
    db.drop_database().await.unwrap();
}

/// A reaction refused for authentication, or by an unavailable command API, is retried for as
/// long as it takes (it used to be marked failed after 12 attempts); only a refusal of what the
/// command says (422 `validation`) marks it failed, for an operator.
#[tokio::test]
async fn reactions_are_retried_for_as_long_as_auth_fails_and_marked_failed_only_when_refused() {
    let (db, pool) = fresh_store().await;
    let fake = FakeCommandApi::start(always(401, problem(401, "unauthorized"))).await;
    let sender = fake.reactor(&pool);
    store::apply_batch(&pool, TOPIC, &history(TaskId::new_v7()), &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    for round in 0..14 {
        fake.answer_with(if round % 2 == 0 { always(401, problem(401, "unauthorized")) } else { always(503, problem(503, "log-unavailable")) });
        assert_eq!(sender.send_outbox().await.unwrap(), 2, "round {round}");
        assert_eq!(sender.send_outbox().await.unwrap(), 0, "round {round}: backing off");
        backoff_over(&pool).await;
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox WHERE NOT failed AND attempts = 14 AND failure = 'unavailable'").await, 2);
    fake.answer_with(always(401, problem(401, "unauthorized")));
    sender.send_outbox().await.unwrap();
    let waiting = reactor::waiting(&pool).await.unwrap();
    let mut by_reaction: Vec<(&str, Failure, i64)> = waiting.iter().map(|w| (w.reaction.as_str(), w.failure, w.count)).collect();
    by_reaction.sort();
    assert_eq!(by_reaction, [(model::RECORD_NOTIFICATION, Failure::Auth, 1), (model::SPAWN_OCCURRENCE, Failure::Auth, 1)]);
    assert_eq!(reactor::configuration_failure(&pool).await.unwrap().map(|f| f.0), Some(Failure::Auth));
    // Refused for what it says: kept, marked failed, no longer waiting or blocking readiness.
    fake.answer_with(always(422, problem(422, "validation")));
    backoff_over(&pool).await;
    assert_eq!(sender.send_outbox().await.unwrap(), 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox WHERE failed AND failure = 'refused'").await, 2);
    assert_eq!(reactor::failed_for_good(&pool).await.unwrap(), 2);
    assert!(reactor::waiting(&pool).await.unwrap().is_empty());
    assert_eq!(reactor::configuration_failure(&pool).await.unwrap(), None);
    db.drop_database().await.unwrap();
}

/// Polls `done` every 10 ms for at most 10 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A task created at offset 0 whose reminder is due (remind time a minute ago).
async fn task_with_a_due_reminder(pool: &PgPool) -> TaskId {
    let task = TaskId::new_v7();
    let mut t = NewTask::new(Title::parse("call the bank".into()).unwrap());
    t.due_at = Some(Utc::now() + chrono::Duration::minutes(59));
    t.remind_before = Some(RemindBefore::parse("PT1H".into()).unwrap());
    store::apply_batch(pool, TOPIC, &events_batch(task, 1, vec![TaskEvent::Created(t)]), &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    assert_eq!(count(pool, "SELECT count(*) FROM reminder_schedule WHERE remind_at <= now()").await, 1);
    task
}

/// Issue 11, defect 5: the reminder pass held `FOR UPDATE` on its schedule rows across the HTTP
/// calls, so a batch touching a task whose reminder was being fired waited for the command API
/// (up to its 10 s timeout). The rows are claimed in a short transaction and the call is made
/// outside it: the batch is applied while the command API is still answering.
#[tokio::test]
async fn a_batch_touching_a_task_whose_reminder_is_being_fired_does_not_wait_for_the_command_api() {
    let (db, pool) = fresh_store().await;
    let fake = FakeCommandApi::start(always(200, "{}".into())).await;
    fake.answer_after(Duration::from_secs(4));
    let task = task_with_a_due_reminder(&pool).await;
    let sender = fake.reactor(&pool);
    let firing = tokio::spawn(async move { sender.fire_due_reminders().await });
    wait_until("the reminder to be sent", || fake.seen().len() == 1).await;
    let edit = TaskEvent::Updated(TaskPatch { title: Some(Title::parse("call the bank today".into()).unwrap()), ..Default::default() });
    let started = Instant::now();
    let (batch, from) = (events_batch(task, 2, vec![edit]), HashMap::from([(0, 1)]));
    let applied = tokio::time::timeout(Duration::from_secs(2), store::apply_batch(&pool, TOPIC, &batch, &from, ApplyMode::Live)).await;
    assert!(matches!(applied, Ok(Ok(_))), "the batch waited for the reminder's HTTP call: {applied:?} after {:?}", started.elapsed());
    assert!(!firing.is_finished(), "the command API has not answered yet");
    // The reminder's outcome is recorded once the command API answers.
    assert_eq!(firing.await.unwrap().unwrap(), 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM reminder_attempts").await, 0);
    assert_eq!(count(&pool, "SELECT min(next_offset) FROM projection_offsets").await, 2);
    db.drop_database().await.unwrap();
}

/// Issue 11, defect 5: reminders due together are fired concurrently (a slow command API does not
/// make them wait for each other), and a reminder being fired is never sent by a second reactor
/// (another projector instance) at the same time.
#[tokio::test]
async fn due_reminders_fire_concurrently_and_a_claimed_one_is_not_sent_twice() {
    let (db, pool) = fresh_store().await;
    let fake = FakeCommandApi::start(always(200, "{}".into())).await;
    fake.answer_after(Duration::from_millis(500));
    for _ in 0..40 {
        schedule_due_reminder(&pool, Uuid::now_v7()).await;
    }
    let (one, two) = (fake.reactor(&pool), fake.reactor(&pool));
    let started = Instant::now();
    let (a, b) = tokio::join!(one.fire_due_reminders(), two.fire_due_reminders());
    let elapsed = started.elapsed();
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a + b, 40, "every reminder handled once: {a} + {b}");
    assert!(elapsed < Duration::from_secs(5), "40 reminders of 500 ms each took {elapsed:?}: not fired concurrently");
    let seen = fake.seen();
    let mut paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    paths.sort_unstable();
    paths.dedup();
    assert_eq!((seen.len(), paths.len()), (40, 40), "a reminder was sent twice");
    assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 0);
    db.drop_database().await.unwrap();
}

/// Found by the short chaos run in CI (PostgreSQL restarted while webhooks were sent): a POST
/// answered 2xx whose outcome could not be recorded (the database was away) stayed leased, and
/// was sent again when the lease ran out, 30 s later: the receiver got the notification twice.
/// The outcome of a POST that was made is recorded, retried until the database takes it; the
/// delivery is never sent again. (Here the receiver takes `webhook_attempts` away for a second
/// when the POST arrives, so the first attempt to record fails.)
#[tokio::test]
async fn a_webhook_whose_outcome_cannot_be_recorded_at_once_is_recorded_later_not_sent_again() {
    let (db, pool) = fresh_store().await;
    let posts = Arc::new(Mutex::new(0_u32));
    let (p, admin) = (posts.clone(), pool.clone());
    let receiver = axum::Router::new().fallback(move || {
        let (posts, admin) = (p.clone(), admin.clone());
        async move {
            let first = {
                let mut n = posts.lock().unwrap();
                *n += 1;
                *n == 1
            };
            if first {
                sqlx::query("ALTER TABLE webhook_attempts RENAME TO webhook_attempts_away").execute(&admin).await.unwrap();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    sqlx::query("ALTER TABLE webhook_attempts_away RENAME TO webhook_attempts").execute(&admin).await.unwrap();
                });
            }
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    sqlx::query("INSERT INTO webhooks (user_id, url, secret, version, updated_at) VALUES ('alice', $1, 's', 1, now())")
        .bind(&url)
        .execute(&pool)
        .await
        .unwrap();
    queue_delivery(&pool, &url).await;
    let deliverer = tokio::spawn(
        projector::webhooks::Deliverer::new(pool.clone(), platform::keys::KeyRing::in_memory(platform::keys::Keks::dev()), true, Arc::default()).run(),
    );
    // Before the fix the delivery was recorded only after the lease (30 s) ran out and a second POST.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&pool, "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'").await == 0 {
        assert!(Instant::now() < deadline, "the delivery was never recorded as delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    deliverer.abort();
    assert_eq!(*posts.lock().unwrap(), 1, "the receiver got the notification more than once");
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_attempts WHERE status_code = 204 AND attempt = 1").await, 1);
    db.drop_database().await.unwrap();
}

/// A pending webhook delivery to Alice's `url`.
async fn queue_delivery(pool: &PgPool, url: &str) {
    sqlx::query("INSERT INTO webhook_deliveries (id, notification_id, user_id, url, payload) VALUES ($1, $2, 'alice', $3, '{}')")
        .bind(Uuid::now_v7())
        .bind(Uuid::now_v7())
        .bind(url)
        .execute(pool)
        .await
        .unwrap();
}

/// One task event of `user` sealed with `data_key` at `offset` of partition 0.
fn sealed(user: &str, task: TaskId, offset: i64, sequence: u32, data_key: Option<Uuid>, event: TaskEvent) -> Recorded {
    Recorded {
        position: Position { partition: 0, offset },
        envelope: Envelope {
            subject: task,
            meta: Metadata {
                event_id: Uuid::now_v7(),
                user_id: UserId::parse(user.into()).unwrap(),
                sequence,
                occurred_at: at(offset),
                correlation_id: None,
                causation_id: None,
                traceparent: None,
                idempotency: None,
                data_key,
            },
            event,
        },
    }
}

#[tokio::test]
async fn an_erasure_drops_exactly_the_rows_of_the_keys_it_destroys_in_any_order() {
    let (_db, pool) = fresh_store().await;
    let (old_key, new_key, bobs_key) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let created = |title: &str| TaskEvent::Created(NewTask::new(Title::parse(title.into()).unwrap()));
    // Alice: a task written before sealing (no key) with its reminder and reactions, one sealed
    // with her key; Bob: one task of his own.
    let mut batch = history(TaskId::new_v7());
    let alices = TaskId::new_v7();
    batch.tasks.push(sealed("alice", alices, 3, 1, Some(old_key), created("alice's")));
    let bobs = TaskId::new_v7();
    batch.tasks.push(sealed("bob", bobs, 4, 1, Some(bobs_key), created("bob's")));
    batch.to.insert(0, 5);
    store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM tasks WHERE user_id = 'alice'").await, 2);
    // The erasure arrives in the same batch as a task of Alice's fresh identity (another
    // partition may well be applied first): that task stays.
    let mut batch = user_batch(7, 1, UserEvent::Erased(domain::user::UserErased { data_keys: vec![old_key] }));
    let fresh = TaskId::new_v7();
    batch.tasks.push(sealed("alice", fresh, 6, 1, Some(new_key), created("alice again")));
    store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 5)]), ApplyMode::Live).await.unwrap();
    let alice_tasks: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tasks WHERE user_id = 'alice'").fetch_all(&pool).await.unwrap();
    assert_eq!(alice_tasks, [*fresh.as_uuid()], "only the fresh identity's task is left");
    let history = format!("SELECT count(*) FROM task_history WHERE user_id = 'alice' AND task_id <> '{fresh}'");
    assert_eq!(count(&pool, &history).await, 0, "task_history keeps nothing of the erased identity");
    for table in ["notifications", "reminder_schedule", "reaction_outbox", "webhook_deliveries"] {
        assert_eq!(count(&pool, &format!("SELECT count(*) FROM {table} WHERE user_id = 'alice'")).await, 0, "{table} keeps nothing of the erased identity");
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM tasks WHERE user_id = 'bob'").await, 1, "another user is untouched");
    assert_eq!(count(&pool, "SELECT count(*) FROM task_history WHERE user_id = 'bob'").await, 1);
}

/// A sealed task of Alice's with a reminder (`data_key`), created at offset 0, and her webhook.
async fn alices_reminded_task(pool: &PgPool, data_key: Uuid) -> TaskId {
    let task = TaskId::new_v7();
    let mut t = NewTask::new(Title::parse("see the doctor".into()).unwrap());
    t.due_at = Some(at(3600));
    t.remind_before = Some(RemindBefore::parse("PT10M".into()).unwrap());
    let mut batch = Batch::default();
    batch.tasks.push(sealed("alice", task, 0, 1, Some(data_key), TaskEvent::Created(t)));
    batch.users.push(user_batch(1, 1, webhook("https://93.184.216.34/alice")).users.remove(0));
    batch.to.insert(0, 2);
    store::apply_batch(pool, TOPIC, &batch, &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    task
}

fn webhook(url: &str) -> UserEvent {
    UserEvent::WebhookRegistered(domain::user::WebhookRegistered { url: domain::user::WebhookUrl::parse(url.into(), false).unwrap(), secret: "s".into() })
}

#[tokio::test]
async fn an_erasure_drops_the_notifications_and_reactions_its_own_batch_produced() {
    for mode in [ApplyMode::Live, ApplyMode::Replay] {
        let (db, pool) = fresh_store().await;
        let key = Uuid::now_v7();
        let task = alices_reminded_task(&pool, key).await;
        // The reminder fires (a notification, its reaction and its webhook delivery) and the
        // erasure of the task's key arrives in the same batch (another partition, read together).
        let mut batch = user_batch(3, 2, UserEvent::Erased(domain::user::UserErased { data_keys: vec![key] }));
        batch.tasks.push(sealed("alice", task, 2, 2, None, TaskEvent::ReminderDue(ReminderDue { remind_at: at(3000), due_at: at(3600) })));
        store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 2)]), mode).await.unwrap();
        for table in ["tasks", "task_history", "notifications", "reaction_outbox", "webhook_deliveries"] {
            let left = count(&pool, &format!("SELECT count(*) FROM {table} WHERE user_id = 'alice'")).await;
            assert_eq!(left, 0, "{mode:?}: {table} keeps a row of the erased identity");
        }
        db.drop_database().await.unwrap();
    }
}

#[tokio::test]
async fn events_of_a_task_whose_creation_was_erased_leave_no_history() {
    for mode in [ApplyMode::Live, ApplyMode::Replay] {
        let (db, pool) = fresh_store().await;
        // The task's `task.created` was sealed with a key destroyed before the projector read it
        // (skipped as erased); its later events carry no personal field and decode.
        let task = TaskId::new_v7();
        let mut batch = Batch::default();
        batch.tasks.push(sealed("alice", task, 0, 2, None, TaskEvent::ReminderDue(ReminderDue { remind_at: at(3000), due_at: at(3600) })));
        batch.tasks.push(sealed("alice", task, 1, 3, None, TaskEvent::Completed));
        batch.tasks.push(sealed("alice", task, 2, 4, None, TaskEvent::Deleted));
        batch.to.insert(0, 3);
        store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 0)]), mode).await.unwrap();
        for table in ["tasks", "task_history", "notifications", "reaction_outbox"] {
            let left = count(&pool, &format!("SELECT count(*) FROM {table} WHERE user_id = 'alice'")).await;
            assert_eq!(left, 0, "{mode:?}: {table} has a row of a task that was never projected");
        }
        db.drop_database().await.unwrap();
    }
}

#[tokio::test]
async fn a_webhooks_signing_secret_is_sealed_in_the_read_model_and_deliveries_are_signed_with_it() {
    let (db, pool) = fresh_store().await;
    // The signature header and the body of the delivery received.
    type Received = Option<(String, Vec<u8>)>;
    let received: Arc<Mutex<Received>> = Arc::default();
    let r = received.clone();
    let receiver = axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
        let r = r.clone();
        async move {
            let signature = headers.get("taskstream-signature").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            *r.lock().unwrap() = Some((signature, body.to_vec()));
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    // The registration as the log holds it (sealed with Alice's key), decoded as the projector does.
    let keys = platform::keys::KeyRing::in_memory(platform::keys::Keks::dev());
    let key = keys.ensure("alice").await.unwrap();
    let registered = UserEvent::WebhookRegistered(domain::user::WebhookRegistered {
        url: domain::user::WebhookUrl::parse(url.clone(), true).unwrap(),
        secret: "whsec-alices-own".into(),
    });
    let mut env = user_batch(0, 1, registered).users.remove(0).envelope;
    env.meta.data_key = Some(key.id);
    let encoded = platform::codec::encode(&env, Some(&key));
    use rdkafka::message::Headers as _;
    let headers: Vec<(&str, Option<&[u8]>)> = encoded.headers.iter().map(|h| (h.key, h.value)).collect();
    let raw = model::RawRecord::new(Position { partition: 0, offset: 0 }, Some(encoded.key.as_bytes()), &headers, Some(&encoded.payload));
    let mut batch = Batch::default();
    batch.push(raw, &keys).await.unwrap();
    assert_eq!(batch.users.len(), 1, "decoded: {:?}", batch.failed);
    store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 0)]), ApplyMode::Live).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT secret FROM webhooks WHERE user_id = 'alice'").fetch_one(&pool).await.unwrap();
    assert!(stored.starts_with("sealed:v1:") && !stored.contains("whsec"), "the read model holds the secret sealed: {stored}");
    // A delivery is signed with the secret itself.
    queue_delivery(&pool, &url).await;
    // A deliverer that does not know Alice's key yet (a process starting) defers the delivery:
    // it is neither sent nor cancelled.
    let unknowing = platform::keys::KeyRing::in_memory(platform::keys::Keks::dev());
    let early = tokio::spawn(projector::webhooks::Deliverer::new(pool.clone(), unknowing, true, Arc::default()).run());
    let deferred = "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' AND lease_until IS NULL AND next_attempt_at > now() + interval '1 second'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&pool, deferred).await == 0 {
        assert!(Instant::now() < deadline, "the delivery was not deferred");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    early.abort();
    assert!(received.lock().unwrap().is_none(), "nothing was sent without the secret");
    sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = now()").execute(&pool).await.unwrap();
    let deliverer = tokio::spawn(projector::webhooks::Deliverer::new(pool.clone(), keys.clone(), true, Arc::default()).run());
    wait_until("the delivery", || received.lock().unwrap().is_some()).await;
    deliverer.abort();
    let (signature, body) = received.lock().unwrap().clone().unwrap();
    let t: i64 = signature.split(',').next().and_then(|t| t.strip_prefix("t=")).and_then(|t| t.parse().ok()).expect("t=<seconds>");
    assert_eq!(signature, projector::webhooks::signature("whsec-alices-own", t, &body));
    // Without the key (the user erased), the sealed secret opens for nobody.
    keys.forget(&[key.id]);
    assert_eq!(projector::webhooks::open_secret(&keys, "alice", &stored), None);
    assert_eq!(projector::webhooks::open_secret(&keys, "alice", "plain-from-an-older-log").as_deref(), Some("plain-from-an-older-log"));
    db.drop_database().await.unwrap();
}
