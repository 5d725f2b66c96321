//! The projector's store against a real PostgreSQL (a fresh database per test, from
//! `test_support`; `DATABASE_URL` is required, `./dev test` sets it): exactly-once offsets, and
//! reactions recorded live but never during a replay.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use domain::{NewTask, Recurrence, RemindBefore, ReminderDue, TaskEvent, TaskId, Title, UserId};
use platform::codec::{Envelope, Metadata};
use platform::position::Position;
use projector::model::{Batch, Recorded};
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
    for (mode, outbox) in [(ApplyMode::Live, 1), (ApplyMode::Replay, 0)] {
        let (db, pool) = fresh_store().await;
        sqlx::query("INSERT INTO webhooks (user_id, url, secret, version, updated_at) VALUES ('alice', 'https://hooks.example.com/x', 's', 1, now())")
            .execute(&pool)
            .await
            .unwrap();
        let applied = store::apply_batch(&pool, TOPIC, &history(TaskId::new_v7()), &HashMap::from([(0, 0)]), mode).await.unwrap();
        assert_eq!((applied.reactions, applied.deliveries), (outbox as usize, outbox as usize), "{mode:?}");
        // The read models are the same either way...
        assert_eq!(count(&pool, "SELECT count(*) FROM tasks WHERE status = 'completed'").await, 1);
        assert_eq!(count(&pool, "SELECT count(*) FROM task_history").await, 3);
        assert_eq!(count(&pool, "SELECT count(*) FROM notifications").await, 1);
        assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 0);
        // ...but only a live apply asks for side effects.
        assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, outbox, "{mode:?}");
        assert_eq!(count(&pool, "SELECT count(*) FROM webhook_deliveries").await, outbox, "{mode:?}");
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
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, 1);
    db.drop_database().await.unwrap();
}
