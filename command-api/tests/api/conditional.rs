//! Conditional commands: `If-Match: "N"` (412 otherwise), also under concurrency.

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{assert_problem, problem_type, spawn_app, ALICE};

#[tokio::test]
async fn if_match_makes_commands_conditional() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    let r = app.patch(ALICE, &id, json!({"title": "u"}), &[("If-Match", "\"2\"")]).await;
    assert_problem(&r, 412);
    assert_eq!(problem_type(&r), "urn:taskstream:problem:version-mismatch");
    assert!(r.body["detail"].as_str().unwrap().contains('1'), "the detail names the actual version: {}", r.text);
    let r = app.patch(ALICE, &id, json!({"title": "u"}), &[("If-Match", "\"1\"")]).await;
    assert_eq!((r.status, r.version()), (StatusCode::OK, 2), "{}", r.text);
    assert_problem(&app.complete(ALICE, &id, &[("If-Match", "\"1\"")]).await, 412);
    assert_eq!(app.complete(ALICE, &id, &[("If-Match", "\"2\"")]).await.version(), 3);
    assert_problem(&app.reopen(ALICE, &id, &[("If-Match", "\"2\"")]).await, 412);
    assert_eq!(app.reopen(ALICE, &id, &[("If-Match", "\"3\"")]).await.version(), 4);
    assert_problem(&app.delete(ALICE, &id, &[("If-Match", "\"3\"")]).await, 412);
    // If-Match "0" on create: only if the id is unused.
    let fresh = Uuid::new_v4().to_string();
    let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": fresh, "title": "new"})), &[("If-Match", "\"0\"")]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": fresh, "title": "new"})), &[("If-Match", "\"0\"")]).await;
    assert!(r.status == StatusCode::PRECONDITION_FAILED || r.status == StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(app.delete(ALICE, &id, &[("If-Match", "\"4\"")]).await.version(), 5);
    assert_eq!(app.log.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_with_the_same_if_match_let_exactly_one_win() {
    let app = Arc::new(spawn_app().await);
    let id = app.create_task(ALICE, "contended").await;
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.patch(ALICE, &id, json!({"title": format!("w{i}")}), &[("If-Match", "\"1\"")]).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for h in handles {
        let r = h.await.unwrap();
        if r.status != StatusCode::OK {
            assert_problem(&r, 412);
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{statuses:?}");
    assert_eq!(app.log.len(), 2);
}
