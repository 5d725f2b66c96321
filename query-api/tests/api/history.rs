//! `taskHistory`: the events of a task by version, also after the task is deleted.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{base, spawn_app, SeedTask};

#[tokio::test]
async fn history_pages_by_version_and_outlives_the_task() {
    let app = spawn_app().await;
    let id = app.seed(&SeedTask::new("alice", "short-lived", base())).await;
    let types = ["task.created", "task.updated", "task.completed", "task.reopened", "task.deleted"];
    // Inserted out of order: the answer is by version all the same.
    for v in [3, 1, 5, 2, 4] {
        app.seed_event(id, "alice", v, types[v as usize - 1], json!({"v": v, "nested": {"ok": true}})).await;
    }
    sqlx::query("DELETE FROM tasks WHERE id = $1").bind(id).execute(&app.pool).await.unwrap();
    let q = "query($id: ID!, $after: String) { task(id: $id) { id }
             taskHistory(taskId: $id, first: 2, after: $after) {
               edges { cursor node { eventId type version occurredAt data correlationId } }
               pageInfo { hasNextPage hasPreviousPage endCursor } } }";
    let (mut after, mut seen) = (Value::Null, Vec::new());
    loop {
        let d = app.data("alice", q, json!({"id": id, "after": after})).await;
        assert!(d["task"].is_null(), "a deleted task is gone");
        let h = &d["taskHistory"];
        for e in h["edges"].as_array().unwrap() {
            let n = &e["node"];
            assert_eq!(n["data"], json!({"v": n["version"], "nested": {"ok": true}}));
            assert_eq!(n["correlationId"], "corr-1");
            assert!(n["eventId"].as_str().unwrap().parse::<Uuid>().is_ok() && n["occurredAt"].is_string());
            seen.push((n["version"].as_i64().unwrap(), n["type"].as_str().unwrap().to_owned()));
        }
        assert_eq!(h["pageInfo"]["hasPreviousPage"], !after.is_null());
        if !h["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            break;
        }
        after = h["pageInfo"]["endCursor"].clone();
    }
    let want: Vec<(i64, String)> = types.iter().enumerate().map(|(i, t)| (i as i64 + 1, (*t).to_owned())).collect();
    assert_eq!(seen, want);
    // Still nobody else's.
    let bob = app.data("bob", q, json!({"id": id, "after": null})).await;
    assert_eq!(bob["taskHistory"]["edges"], json!([]));
}
