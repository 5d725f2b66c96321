//! The projector's store against a real PostgreSQL (a fresh database per test): exactly-once
//! offsets, and reactions recorded live but never during a replay.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use domain::{NewTask, Recurrence, RemindBefore, ReminderDue, TaskEvent, TaskId, Title, UserId};
use platform::codec::{Envelope, Metadata};
use platform::position::Position;
use projector::model::{Batch, Recorded};
use projector::store::{self, ApplyMode, StoreError};

const TOPIC: &str = "task-events";

async fn fresh_db() -> Option<(PgPool, String, String)> {
    let Ok(admin) = std::env::var("DATABASE_URL") else {
        eprintln!("SKIPPING: DATABASE_URL is not set (run with ./dev test)");
        return None;
    };
    let name = format!("ts_p_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let mut conn = PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    let pool = PgPool::connect(&format!("{base}/{name}")).await.unwrap();
    platform::db::migrate(&pool).await.unwrap();
    store::init_offsets(&pool, TOPIC, &[0]).await.unwrap();
    Some((pool, admin, name))
}

async fn drop_db(pool: PgPool, admin: &str, name: &str) {
    pool.close().await;
    let mut conn = PgConnection::connect(admin).await.unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await.unwrap();
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
        let Some((pool, admin, name)) = fresh_db().await else {
            return;
        };
        sqlx::query("INSERT INTO webhooks (user_id, url, secret, version, updated_at) VALUES ('alice', 'https://hooks.example.com/x', 's', 1, now())")
            .execute(&pool)
            .await
            .unwrap();
        let applied = store::apply_batch(&pool, TOPIC, &history(TaskId::new_v7()), &HashMap::from([(0, 0)]), mode, None).await.unwrap();
        assert_eq!((applied.reactions, applied.deliveries), (outbox as usize, outbox as usize), "{mode:?}");
        // The read models are the same either way...
        assert_eq!(count(&pool, "SELECT count(*) FROM tasks WHERE status = 'completed'").await, 1);
        assert_eq!(count(&pool, "SELECT count(*) FROM task_history").await, 3);
        assert_eq!(count(&pool, "SELECT count(*) FROM notifications").await, 1);
        assert_eq!(count(&pool, "SELECT count(*) FROM reminder_schedule").await, 0);
        // ...but only a live apply asks for side effects.
        assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, outbox, "{mode:?}");
        assert_eq!(count(&pool, "SELECT count(*) FROM webhook_deliveries").await, outbox, "{mode:?}");
        drop_db(pool, &admin, &name).await;
    }
}

#[tokio::test]
async fn offsets_move_only_with_the_rows_and_a_second_writer_is_fenced() {
    let Some((pool, admin, name)) = fresh_db().await else {
        return;
    };
    let batch = history(TaskId::new_v7());
    store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 0)]), ApplyMode::Live, None).await.unwrap();
    assert_eq!(count(&pool, "SELECT min(next_offset) FROM projection_offsets").await, 3);
    // Another instance that still believes the partition is at 0 cannot apply the batch again.
    let again = store::apply_batch(&pool, TOPIC, &batch, &HashMap::from([(0, 0)]), ApplyMode::Live, None).await;
    assert!(matches!(again, Err(StoreError::Fenced { .. })), "{again:?}");
    assert_eq!(count(&pool, "SELECT count(*) FROM task_history").await, 3);
    assert_eq!(count(&pool, "SELECT count(*) FROM reaction_outbox").await, 1);
    drop_db(pool, &admin, &name).await;
}
