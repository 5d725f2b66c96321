//! Consistency tokens (`X-Consistency-Token`): a query waits for the projector's commit of a
//! position (woken by NOTIFY, or by the periodic re-read), and answers a clear 503 rather than
//! stale data when the position is never reached.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use platform::position::Position;
use query_api::Limits;

use crate::helpers::{base, spawn_app, spawn_app_with, FakeWatermarks, SeedTask, TestApp, STATS, TOPIC};

/// The projector's commit as the test plays it: a task row, the offsets and/or the notifications
/// (one per projection), in one transaction.
#[derive(Clone)]
struct Commit {
    task: Option<SeedTask>,
    next_offset: i64,
    update_table: bool,
    notify: bool,
}

impl Commit {
    async fn run(self, pool: sqlx::PgPool) {
        let mut tx = pool.begin().await.unwrap();
        if let Some(t) = &self.task {
            sqlx::query(
                "INSERT INTO tasks (id, user_id, title, status, priority, timezone, version, created_at, updated_at)
                 VALUES ($1, $2, $3, 'open', 1, 'UTC', 1, now(), now())",
            )
            .bind(t.id)
            .bind(t.user)
            .bind(&t.title)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        if self.update_table {
            sqlx::query("UPDATE projection_offsets SET next_offset = $2 WHERE topic = $1 AND partition = 0")
                .bind(TOPIC)
                .bind(self.next_offset)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        if self.notify {
            for p in platform::projections::PROJECTIONS {
                let payload = json!({"topic": TOPIC, "projection": p, "offsets": [[0, self.next_offset]]}).to_string();
                sqlx::query("SELECT pg_notify('projection_progress', $1)").bind(payload).execute(&mut *tx).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
}

/// Runs `commit` in the background as soon as a request is waiting for a position (so that the
/// request really has to wait for it).
fn commit_once_waiting(app: &TestApp, commit: Commit) -> tokio::task::JoinHandle<()> {
    let (progress, pool) = (app.progress.clone(), app.pool.clone());
    tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(10), async {
            while progress.waiting() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a request starts waiting");
        commit.run(pool).await;
    })
}

/// Both read projections at next offset 5 on partition 0, as the tracker knows.
async fn at_offset_5(app: &TestApp) {
    for p in ["tasks", "task_history"] {
        app.set_offset(p, 0, 5).await;
    }
    app.progress.reload(&app.pool).await.unwrap();
    assert!(app.progress.is_applied(Position { partition: 0, offset: 4 }));
}

#[tokio::test]
async fn a_consistency_token_waits_for_the_projectors_commit_and_sees_its_rows() {
    let app = spawn_app().await;
    at_offset_5(&app).await;
    // An applied position answers at once.
    let a = app.post("alice", STATS, json!({}), Some(&Position { partition: 0, offset: 4 }.token())).await;
    assert_eq!((a.status, &a.body["data"]["stats"]["total"]), (200, &json!(0)), "{}", a.body);
    // The command's event is at offset 9; the projector commits it (and the task) while we wait.
    let task = SeedTask::new("alice", "written by the command", base());
    let commit = Commit { task: Some(task), next_offset: 10, update_table: true, notify: true };
    let writer = commit_once_waiting(&app, commit);
    let a = app.post("alice", STATS, json!({}), Some(&Position { partition: 0, offset: 9 }.token())).await;
    writer.await.unwrap();
    assert_eq!((a.status, &a.body["data"]["stats"]["total"]), (200, &json!(1)), "the answer includes the write: {}", a.body);
}

#[tokio::test]
async fn a_notification_alone_wakes_the_waiting_request() {
    let app = spawn_app().await;
    at_offset_5(&app).await;
    // The table is never updated, so only the LISTEN path can let this request through.
    let commit = Commit { task: Some(SeedTask::new("alice", "t", base())), next_offset: 10, update_table: false, notify: true };
    let writer = commit_once_waiting(&app, commit);
    let a = app.post("alice", STATS, json!({}), Some(&Position { partition: 0, offset: 9 }.token())).await;
    writer.await.unwrap();
    assert_eq!((a.status, &a.body["data"]["stats"]["total"]), (200, &json!(1)), "{}", a.body);
}

#[tokio::test]
async fn a_lost_notification_only_delays_the_answer() {
    let app = spawn_app().await;
    at_offset_5(&app).await;
    // No notification at all: the periodic re-read of projection_offsets finds the progress.
    let commit = Commit { task: Some(SeedTask::new("alice", "t", base())), next_offset: 10, update_table: true, notify: false };
    let writer = commit_once_waiting(&app, commit);
    let a = app.post("alice", STATS, json!({}), Some(&Position { partition: 0, offset: 9 }.token())).await;
    writer.await.unwrap();
    assert_eq!((a.status, &a.body["data"]["stats"]["total"]), (200, &json!(1)), "{}", a.body);
}

#[tokio::test]
async fn a_position_never_reached_is_a_clear_503_and_never_stale_data() {
    let limits = Limits { consistency_wait: Duration::from_millis(300), ..Limits::default() };
    let app = spawn_app_with(limits, FakeWatermarks(Some(HashMap::new()))).await;
    at_offset_5(&app).await;
    // Only one of the two projections is past the position: still not applied.
    app.set_offset("tasks", 0, 100).await;
    app.progress.reload(&app.pool).await.unwrap();
    for position in [Position { partition: 0, offset: 9 }, Position { partition: 0, offset: 500 }, Position { partition: 7, offset: 0 }] {
        let a = app.post("alice", STATS, json!({}), Some(&position.token())).await;
        assert_eq!((a.status, a.code()), (503, Some("CONSISTENCY_TIMEOUT")), "{position:?}: {}", a.body);
        assert!(a.message().contains("have not yet reached"), "{}", a.body);
        assert!(a.body.get("data").is_none(), "no data at all: {}", a.body);
        assert_eq!(a.headers["retry-after"], "1");
    }
    for bad in ["garbage", "", "djEuMC4x="] {
        let a = app.post("alice", STATS, json!({}), Some(bad)).await;
        assert_eq!((a.status, a.code()), (400, Some("BAD_CONSISTENCY_TOKEN")), "{bad:?}: {}", a.body);
    }
}
