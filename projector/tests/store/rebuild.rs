//! A rebuild's bulk phase (task rows folded in memory, history with COPY, rows written once) gives
//! the tables that applying the same batches one by one gives, live or replayed; and a whole
//! rebuild over a real log (Kafka and PostgreSQL) gives exactly the tables the live projection
//! built, with the bulk phase ending at the live head or at its memory bound.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use uuid::Uuid;

use domain::user::{NotificationRead, UserErased, UserEvent, WebhookRegistered, WebhookUrl};
use domain::{ids, NewTask, Recurrence, RemindBefore, ReminderDue, TaskEvent, TaskId, TaskPatch, Title, UserId};
use platform::codec::{self, Envelope, Metadata};
use platform::keys::{DataKey, Keks, KeyRing};
use platform::position::Position;
use platform::secret::Secret;
use platform::settings::{DatabaseSettings, KafkaSettings};
use projector::model::{Batch, RawRecord, Recorded, RecordedUser, TaskTable};
use projector::rebuild;
use projector::store::{self, ApplyMode};
use test_support::{fresh_database, required_env};

use crate::{at, TOPIC};

/// The read-model tables a rebuild switches in.
const READ_MODELS: [&str; 6] = ["tasks", "task_history", "notifications", "notification_reads", "webhooks", "reminder_schedule"];

/// Every row of every read model, as text, in order.
async fn read_models(pool: &PgPool) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    for t in READ_MODELS {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {t} t ORDER BY 1")).fetch_all(pool).await.unwrap();
        out.push((t, rows));
    }
    out
}

/// Two snapshots of the read models are equal; else names the rows only one of them has.
fn assert_same(first: &[(&str, Vec<String>)], second: &[(&str, Vec<String>)], what: &str) {
    for ((table, a), (_, b)) in first.iter().zip(second) {
        let only_first: Vec<&String> = a.iter().filter(|row| !b.contains(row)).collect();
        let only_second: Vec<&String> = b.iter().filter(|row| !a.contains(row)).collect();
        assert!(a == b, "{what}: {table} differs\nonly in the first: {only_first:#?}\nonly in the second: {only_second:#?}");
    }
}

fn meta(user: &str, sequence: u32, occurred_at: i64, data_key: Option<Uuid>) -> Metadata {
    Metadata {
        event_id: Uuid::now_v7(),
        user_id: UserId::parse(user.into()).unwrap(),
        sequence,
        occurred_at: at(occurred_at),
        correlation_id: Some(format!("corr-{sequence}")),
        causation_id: None,
        traceparent: None,
        idempotency: None,
        data_key,
    }
}

fn new_task(title: &str, due: Option<i64>, remind: Option<&str>, recurrence: Option<&str>) -> TaskEvent {
    let mut t = NewTask::new(Title::parse(title.into()).unwrap());
    t.due_at = due.map(at);
    t.remind_before = remind.map(|r| RemindBefore::parse(r.into()).unwrap());
    t.recurrence = recurrence.map(|r| Recurrence::parse(r.into()).unwrap());
    t.tags = domain::Tags::parse(vec!["home".into(), "a \"quoted\", {braced} tag\\".into(), "NULL".into()]).unwrap();
    TaskEvent::Created(t)
}

fn rename(title: &str) -> TaskEvent {
    TaskEvent::Updated(TaskPatch { title: Some(Title::parse(title.into()).unwrap()), ..Default::default() })
}

fn reminder(remind_at: i64, due_at: i64) -> TaskEvent {
    TaskEvent::ReminderDue(ReminderDue { remind_at: at(remind_at), due_at: at(due_at) })
}

/// Batches of one partition, written record by record.
#[derive(Default)]
struct Log {
    batches: Vec<Batch>,
    current: Batch,
    next: i64,
}

impl Log {
    fn task(&mut self, user: &str, key: Option<Uuid>, task: TaskId, sequence: u32, event: TaskEvent) -> Uuid {
        let offset = self.next;
        self.next += 1;
        let envelope = Envelope { subject: task, meta: meta(user, sequence, offset, key), event };
        let id = envelope.meta.event_id;
        self.current.tasks.push(Recorded { position: Position { partition: 0, offset }, envelope });
        self.current.to.insert(0, self.next);
        id
    }

    fn user(&mut self, user: &str, sequence: u32, event: UserEvent) {
        let offset = self.next;
        self.next += 1;
        let envelope = Envelope { subject: UserId::parse(user.into()).unwrap(), meta: meta(user, sequence, offset, None), event };
        self.current.users.push(RecordedUser { position: Position { partition: 0, offset }, envelope });
        self.current.to.insert(0, self.next);
    }

    /// A record again, at the next offset (a log that repeats an event).
    fn repeat(&mut self, batch: usize, record: usize) {
        let mut r = self.batches[batch].tasks[record].clone();
        r.position.offset = self.next;
        self.next += 1;
        self.current.tasks.push(r);
        self.current.to.insert(0, self.next);
    }

    fn cut(&mut self) {
        self.batches.push(std::mem::take(&mut self.current));
    }
}

/// Creations, updates, reminders (fired and pending), a recurring task completed and its next
/// occurrence, deletions, read marks, webhooks, an erasure of a user whose tasks were written before
/// sealing (one of them created in the erasure's own batch, one of the fresh identity's after it, a
/// reminder of an erased task fired in the same batch), events of erased and deleted tasks, and an
/// event the log repeats.
fn log() -> Log {
    let mut log = Log::default();
    let (alice_key, carols_fresh_key) = (Some(Uuid::now_v7()), Some(Uuid::now_v7()));
    let (t1, t2, t3) = (TaskId::new_v7(), TaskId::new_v7(), TaskId::new_v7());
    let (c1, c2, c3, c4, c5) = (TaskId::new_v7(), TaskId::new_v7(), TaskId::new_v7(), TaskId::new_v7(), TaskId::new_v7());
    let (b1, b2) = (TaskId::new_v7(), TaskId::new_v7());

    log.task("alice", alice_key, t1, 1, new_task("pay rent", Some(7200), Some("PT30M"), None));
    log.task("alice", alice_key, t2, 1, new_task("stand-up", Some(3600), Some("PT5M"), Some("FREQ=DAILY")));
    log.task("carol", None, c1, 1, new_task("legacy one", Some(9000), Some("PT1H"), None));
    log.task("carol", None, c2, 1, new_task("legacy two", Some(9000), Some("PT1H"), None));
    log.task("bob", None, b1, 1, new_task("bob's", None, None, None));
    log.user(
        "bob",
        1,
        UserEvent::WebhookRegistered(WebhookRegistered { url: WebhookUrl::parse("https://93.184.216.34/bob".into(), false).unwrap(), secret: "s".into() }),
    );
    log.cut();

    log.task("alice", alice_key, t1, 2, rename("pay the rent"));
    log.task("alice", alice_key, t1, 3, reminder(7200 - 1800, 7200));
    log.task("alice", alice_key, t2, 2, TaskEvent::Completed);
    log.task("alice", alice_key, t3, 1, {
        let TaskEvent::Created(mut t) = new_task("stand-up", Some(3600 + 86_400), Some("PT5M"), Some("FREQ=DAILY")) else { unreachable!() };
        t.recurrence_parent_id = Some(t2);
        t.occurrence = Some(2);
        TaskEvent::Created(t)
    });
    log.task("carol", None, c1, 2, rename("legacy one, renamed"));
    log.task("bob", None, b1, 2, TaskEvent::Deleted);
    log.user("alice", 1, UserEvent::NotificationRead(NotificationRead { notification_id: ids::reminder_notification_id(t1, at(7200 - 1800)) }));
    log.cut();

    // The erasure's batch: Carol's legacy tasks (one created here, one reminded here) go; her
    // fresh identity's task, sealed with a key the erasure does not name, stays.
    log.task("carol", None, c3, 1, new_task("legacy three", None, None, None));
    log.task("carol", None, c2, 2, reminder(9000 - 3600, 9000));
    log.task("alice", alice_key, t3, 2, rename("stand-up, day two"));
    log.user("carol", 1, UserEvent::Erased(UserErased { data_keys: vec![] }));
    log.task("carol", carols_fresh_key, c4, 1, new_task("fresh", Some(9000), Some("PT1H"), None));
    log.cut();

    // After the erasure: rows written at it change, one is deleted; events of erased tasks.
    log.task("alice", alice_key, t1, 4, TaskEvent::Deleted);
    log.task("alice", alice_key, t3, 3, TaskEvent::Completed);
    log.task("carol", None, c1, 3, rename("erased, changes nothing"));
    log.task("carol", carols_fresh_key, c4, 2, TaskEvent::Reopened);
    log.task("carol", carols_fresh_key, c5, 1, new_task("fresh two", None, None, None));
    log.repeat(0, 0);
    log.cut();

    log.task("alice", alice_key, t2, 3, TaskEvent::Reopened);
    log.task("bob", None, b2, 1, new_task("bob's second", Some(20_000), Some("PT10M"), None));
    log.user("bob", 2, UserEvent::WebhookRemoved);
    log.cut();
    log
}

#[tokio::test]
async fn the_bulk_phase_writes_the_tables_that_applying_each_batch_writes() {
    let log = log();
    // Each batch applied as it comes, replayed and live.
    let mut per_batch = Vec::new();
    for mode in [ApplyMode::Replay, ApplyMode::Live] {
        let db = fresh_database().await;
        store::init_offsets(&db.pool, TOPIC, &[0]).await.unwrap();
        let mut from = HashMap::from([(0, 0)]);
        for batch in &log.batches {
            store::apply_batch(&db.pool, TOPIC, batch, &from, mode).await.unwrap();
            from.extend(batch.to.clone());
        }
        per_batch.push((read_models(&db.pool).await, db));
    }
    assert_same(&per_batch[0].0, &per_batch[1].0, "a replay and the live projection");
    assert!(per_batch[0].0.iter().all(|(_, rows)| !rows.is_empty()), "every read model has rows: {:?}", per_batch[0].0);

    // The bulk phase: rows folded onto the table, written at the erasure and at the end.
    let db = fresh_database().await;
    store::init_offsets(&db.pool, TOPIC, &[0]).await.unwrap();
    let mut table = TaskTable::default();
    let mut at = HashMap::new();
    for batch in &log.batches {
        let erases = batch.users.iter().any(|u| matches!(u.envelope.event, UserEvent::Erased(_)));
        let effects = table.fold(&batch.tasks);
        let erased = store::apply_bulk(&db.pool, batch, &effects, erases.then_some(&table)).await.unwrap();
        if erases {
            assert_eq!(erased.len(), 3, "the erasure deletes Carol's legacy tasks: {erased:?}");
            table.mark_written();
            table.forget(&erased);
        } else {
            assert!(erased.is_empty());
        }
        at.extend(batch.to.clone());
    }
    assert_eq!(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasks").fetch_one(&db.pool).await.unwrap(), 4, "the rows written at the erasure");
    store::flush_bulk(&db.pool, TOPIC, &table, &at).await.unwrap();
    assert_same(&read_models(&db.pool).await, &per_batch[0].0, "the bulk phase and the per-batch path");
    let offsets = "SELECT projection, partition, next_offset FROM projection_offsets ORDER BY 1, 2";
    let bulk: Vec<(String, i32, i64)> = sqlx::query_as(offsets).fetch_all(&db.pool).await.unwrap();
    assert_eq!(bulk, sqlx::query_as::<_, (String, i32, i64)>(offsets).fetch_all(&per_batch[0].1.pool).await.unwrap());
    db.drop_database().await.unwrap();
    for (_, db) in per_batch {
        db.drop_database().await.unwrap();
    }
}

/// The users of the Kafka test and the partition of each (a user's tasks and stream in one
/// partition, so that the order of an erasure and the user's tasks is the log's).
const USERS: [(&str, i32); 4] = [("ann", 0), ("ben", 1), ("legacy", 1), ("sealed", 2)];

/// Appends records to a fresh three-partition topic and applies them as the live projector does.
struct LiveLog {
    kafka: KafkaSettings,
    producer: FutureProducer,
    keys: Arc<KeyRing>,
    /// Per partition: the next offset the live projection applies.
    applied: HashMap<i32, i64>,
    sequences: HashMap<String, u32>,
}

const KEK: &str = "test1:dGFza3N0cmVhbS10ZXN0LWtlay0xLTMyLWJ5dGVzISE";

impl LiveLog {
    async fn start(pool: &PgPool) -> Self {
        let kafka = KafkaSettings {
            kafka_brokers: required_env("KAFKA_BROKERS"),
            task_events_topic: format!("projector-rebuild-test-{}", Uuid::new_v4().simple()),
            task_events_partitions: 3,
            task_events_replication: 1,
            kafka_config: Default::default(),
            data_keys_erasure_bound_ms: 86_400_000,
        };
        platform::kafka::ensure_topics(&kafka).await.unwrap();
        let keys = Arc::new(KeyRing::new(Keks::parse(KEK).unwrap()));
        keys.start(&kafka, "projector-rebuild-test").await.unwrap();
        let producer = platform::kafka::client_config(&kafka, "projector-rebuild-test").create().unwrap();
        let topic = kafka.task_events_topic.clone();
        let applied = store::init_offsets(pool, &topic, &[0, 1, 2]).await.unwrap();
        Self { kafka, producer, keys, applied, sequences: HashMap::new() }
    }

    fn partition(user: &str) -> i32 {
        USERS.iter().find(|(u, _)| *u == user).map(|(_, p)| *p).unwrap()
    }

    async fn send<E: domain::DomainEvent>(&self, user: &str, envelope: Envelope<E>, key: Option<&DataKey>) {
        let e = codec::encode(&envelope, key);
        let record = FutureRecord::to(&self.kafka.task_events_topic).partition(Self::partition(user)).key(&e.key).payload(&e.payload).headers(e.headers);
        self.producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }

    /// A task event; `sealed` seals it with the user's current data key (made if needed).
    async fn task(&mut self, user: &str, task: TaskId, event: TaskEvent, sealed: bool) {
        let key = if sealed { Some(self.keys.ensure(user).await.unwrap()) } else { None };
        let sequence = self.sequences.entry(task.to_string()).or_default();
        *sequence += 1;
        let envelope = Envelope { subject: task, meta: meta(user, *sequence, i64::from(*sequence) * 60, key.as_ref().map(|k| k.id)), event };
        self.send(user, envelope, key.as_deref()).await;
    }

    async fn user(&mut self, user: &str, event: UserEvent) {
        let sequence = self.sequences.entry(user.to_owned()).or_default();
        *sequence += 1;
        let envelope = Envelope { subject: UserId::parse(user.into()).unwrap(), meta: meta(user, *sequence, 0, None), event };
        self.send(user, envelope, None).await;
    }

    /// Reads what was appended since the last call and applies it in live mode, a few records per
    /// batch, partition after partition.
    async fn apply(&mut self, pool: &PgPool) {
        let consumer: StreamConsumer = platform::kafka::client_config(&self.kafka, "projector-rebuild-test")
            .set("group.id", format!("projector-rebuild-test-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let topic = self.kafka.task_events_topic.clone();
        for partition in 0..3 {
            let (_, high) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)).unwrap();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, Offset::Offset(self.applied[&partition])).unwrap();
            consumer.assign(&tpl).unwrap();
            let mut batch = Batch::default();
            while self.applied[&partition] < high {
                let m = tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await.expect("a record within 10 s").unwrap();
                let raw = RawRecord::from_message(&m);
                batch.push(raw, &self.keys).await.unwrap();
                let end = batch.to[&partition];
                if batch.len() == 4 || end == high {
                    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
                    store::apply_batch(pool, &topic, &batch, &self.applied, ApplyMode::Live).await.unwrap();
                    self.applied.insert(partition, end);
                    batch = Batch::default();
                }
            }
        }
    }

    /// What `projector rebuild` is given (with a key ring of its own, that reads the keys topic).
    async fn rebuild_options(&self, database_url: &str, max_batch: usize) -> rebuild::Options {
        let keys = Arc::new(KeyRing::new(Keks::parse(KEK).unwrap()));
        keys.start(&self.kafka, "projector-rebuild-test").await.unwrap();
        rebuild::Options {
            kafka: self.kafka.clone(),
            database: DatabaseSettings { database_url: Secret::new(database_url.to_owned()), database_max_connections: 4 },
            projections: Vec::new(),
            max_batch,
            apply_parallelism: 2,
            report: rebuild::Report::Log,
            requested_by: "cli",
            keys,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_gives_exactly_the_tables_the_live_projection_built() {
    let db = fresh_database().await;
    let pool = db.pool.clone();
    let mut log = LiveLog::start(&pool).await;
    // Ann and Ben: tasks created, renamed, reminded, completed (recurring ones with their next
    // occurrence), reopened, deleted; read marks and webhooks.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (user, _) = USERS[i % 2];
        let task = TaskId::new_v7();
        let recurring = i % 5 == 0;
        log.task(user, task, new_task(&format!("task {i}"), Some(100_000 + i as i64), Some("PT1H"), recurring.then_some("FREQ=WEEKLY")), true).await;
        tasks.push((user, task, recurring, i as i64));
    }
    for (user, task, recurring, i) in &tasks {
        log.task(user, *task, rename(&format!("renamed {i}")), true).await;
        if i % 3 == 0 {
            log.task(user, *task, reminder(100_000 + i - 3600, 100_000 + i), true).await;
        }
        log.task(user, *task, TaskEvent::Completed, true).await;
        if *recurring {
            let TaskEvent::Created(mut next) = new_task(&format!("renamed {i}"), Some(100_000 + i + 7 * 86_400), Some("PT1H"), Some("FREQ=WEEKLY")) else {
                unreachable!()
            };
            next.recurrence_parent_id = Some(*task);
            next.occurrence = Some(2);
            log.task(user, ids::next_occurrence_id(*task, 2), TaskEvent::Created(next), true).await;
        }
        match i % 4 {
            0 => log.task(user, *task, TaskEvent::Deleted, true).await,
            1 => log.task(user, *task, TaskEvent::Reopened, true).await,
            _ => {}
        }
    }
    let read = ids::reminder_notification_id(tasks[3].1, at(100_000 + 3 - 3600));
    log.user("ben", UserEvent::NotificationRead(NotificationRead { notification_id: read })).await;
    for (user, url) in [("ann", "https://93.184.216.34/ann"), ("ben", "https://93.184.216.34/ben")] {
        log.user(user, UserEvent::WebhookRegistered(WebhookRegistered { url: WebhookUrl::parse(url.into(), false).unwrap(), secret: "s".into() })).await;
    }
    log.user("ann", UserEvent::WebhookRemoved).await;
    // A user whose tasks were written before sealing, with a reminder fired, and one whose tasks
    // are sealed, renamed. (The reminder is kept more than a batch away from the erasure: a
    // notification made in an erasure's own batch is written after the erasure, live or replayed,
    // and stays. The sealed user's tasks get only events with personal fields: an event without
    // any, say a fired reminder, still decodes once the key is destroyed, so a rebuild keeps its
    // history row where the live erasure deleted it; a difference of the replay itself.)
    let legacy: Vec<TaskId> = (0..10).map(|_| TaskId::new_v7()).collect();
    let sealed: Vec<TaskId> = (0..10).map(|_| TaskId::new_v7()).collect();
    for (i, (l, s)) in legacy.iter().zip(&sealed).enumerate() {
        log.task("legacy", *l, new_task(&format!("legacy {i}"), Some(50_000), Some("PT1H"), None), false).await;
        log.task("sealed", *s, new_task(&format!("sealed {i}"), Some(50_000), Some("PT1H"), None), true).await;
        if i == 0 {
            log.task("legacy", *l, reminder(50_000 - 3600, 50_000), false).await;
            log.task("sealed", *s, rename("sealed, renamed"), true).await;
        }
    }
    log.apply(&pool).await;

    // Both erased; their fresh identities' tasks (sealed with new keys) stay.
    log.user("legacy", UserEvent::Erased(UserErased { data_keys: vec![] })).await;
    let sealed_key = log.keys.current("sealed").unwrap().id;
    log.user("sealed", UserEvent::Erased(UserErased { data_keys: vec![sealed_key] })).await;
    log.keys.destroy(&[sealed_key]).await.unwrap();
    for user in ["legacy", "sealed"] {
        log.task(user, TaskId::new_v7(), new_task("afresh", Some(60_000), Some("PT1H"), None), true).await;
    }
    for (user, task, _, i) in tasks.iter().take(20) {
        log.task(user, *task, rename(&format!("late {i}")), true).await;
    }
    // More than a batch after the erasure: an event of a task it deleted changes nothing.
    log.task("legacy", legacy[1], rename("erased: changes nothing"), false).await;
    log.apply(&pool).await;
    let live = read_models(&pool).await;
    let count = |t: &str| live.iter().find(|(n, _)| *n == t).map(|(_, rows)| rows.len()).unwrap();
    assert!(READ_MODELS.iter().all(|t| count(t) > 0), "every read model has rows: {live:?}");
    let erased: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE user_id IN ('legacy', 'sealed')").fetch_one(&pool).await.unwrap();
    assert_eq!(erased, 2, "only the fresh identities' tasks are left");

    // Small batches, so there are many; the bulk phase ends at the live head, then at its bound.
    let url = db.url().to_owned();
    for bound in [rebuild::BULK_MAX_TASKS, 5] {
        let summary = rebuild::run_bounded(log.rebuild_options(&url, 7).await, bound, std::future::pending()).await.unwrap();
        assert_eq!(summary.offsets, log.applied, "bound {bound}");
        assert_same(&read_models(&pool).await, &live, &format!("bound {bound}: the rebuild and the live projection"));
    }
    db.drop_database().await.unwrap();
    platform::kafka::delete_topics(&log.kafka).await;
}
