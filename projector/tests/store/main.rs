//! The projector's store against a real PostgreSQL (a fresh database per test, from
//! `test_support`; `DATABASE_URL` is required, `./dev test` sets it): exactly-once offsets,
//! reactions recorded live but never during a replay, and the notifications' record in the user's
//! stream (the reaction, the read model unchanged by `notification.created`, the backfill of old ones).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use domain::user::{NotificationCreated, NotificationRead, UserEvent};
use domain::{ids, NewTask, Recurrence, RemindBefore, ReminderDue, TaskEvent, TaskId, Title, UserId};
use platform::codec::{Envelope, Metadata};
use platform::position::Position;
use projector::model::{Batch, Recorded, RecordedUser};
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
