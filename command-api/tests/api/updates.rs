//! The current-state topic `task-updates` (CONTRACT.md §4): every accepted task command appends,
//! in the same append (transaction) as its events, the task's full state after it (a tombstone
//! after a deletion), keyed by the task id, in the partition of the task's events; refused
//! commands, failed appends and user-level events append none; a restart (from the log or from a
//! snapshot) goes on from the same state.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::json;

use command_api::writer::WriterConfig;
use domain::current::{TaskView, TaskViewStatus};
use domain::ids::reminder_notification_id;
use domain::TaskId;

use crate::helpers::{assert_problem, build_app_with, partition_for, spawn_app, spawn_app_over, FakeLog, TestApp, UpdateRecord, ALICE};

fn views(records: &[UpdateRecord]) -> Vec<Option<TaskView>> {
    records.iter().map(UpdateRecord::view).collect()
}

/// `POST path` with the projector's service token acting for `user`.
async fn as_service(app: &TestApp, user: &str, path: &str, body: serde_json::Value) -> StatusCode {
    let req = Request::post(path)
        .header("authorization", format!("Bearer {}", app.tokens.service("service:projector", user)))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    app.raw(req).await.status
}

#[tokio::test]
async fn every_accepted_task_command_appends_the_tasks_full_state_and_a_delete_a_tombstone() {
    let app = spawn_app().await;
    let due: DateTime<Utc> = "2030-01-01T09:00:00Z".parse().unwrap();
    let r = app.create(ALICE, json!({"title": "write", "description": "the report", "tags": ["work"], "due_at": due, "remind_before": "PT30M"})).await;
    let id = r.task_id();
    assert_eq!(app.patch(ALICE, &id, json!({"title": "rewrite", "tags": ["work", "urgent"]}), &[]).await.version(), 2);
    let remind_at = due - chrono::Duration::minutes(30);
    assert_eq!(as_service(&app, ALICE, &format!("/internal/v1/tasks/{id}/remind"), json!({"remind_at": remind_at})).await, StatusCode::OK);
    assert_eq!(app.complete(ALICE, &id, &[]).await.version(), 4);
    assert_problem(&app.complete(ALICE, &id, &[]).await, 409);
    assert_eq!(app.reopen(ALICE, &id, &[]).await.version(), 5);
    assert_eq!(app.delete(ALICE, &id, &[]).await.status, StatusCode::OK);

    let events = app.log.records_of(&id);
    let updates = app.log.updates_of(&id);
    assert_eq!(updates.len(), 6, "one record per accepted command (the refused complete wrote none)");
    let v = views(&updates);
    let first = v[0].clone().expect("the created task");
    assert_eq!((first.title.as_ref(), first.description.as_ref().map(AsRef::as_ref), first.version), ("write", Some("the report"), 1));
    assert_eq!(first.task_id.to_string(), id);
    assert_eq!((first.owner.as_ref(), first.status, first.remind_at), (ALICE, TaskViewStatus::Open, Some(remind_at)));
    let patched = v[1].clone().unwrap();
    assert_eq!(
        (patched.title.as_ref(), patched.description.as_ref().map(AsRef::as_ref), patched.version),
        ("rewrite", Some("the report"), 2),
        "the full state, not the patch"
    );
    assert_eq!(serde_json::to_value(&patched.tags).unwrap(), json!(["work", "urgent"]));
    assert_eq!(v[2].as_ref().unwrap().reminded_for, Some(remind_at));
    let done = v[3].clone().unwrap();
    assert_eq!((done.status, done.version, done.title.as_ref()), (TaskViewStatus::Completed, 4, "rewrite"));
    assert!(done.completed_at.is_some());
    assert_eq!((v[4].as_ref().unwrap().status, v[4].as_ref().unwrap().completed_at), (TaskViewStatus::Open, None));
    assert_eq!(v[5], None, "a deletion is a tombstone");
    assert!(updates[5].header("content-type").is_none());

    for (u, e) in updates.iter().zip(&events) {
        // Same key, same partition number as the task's events; the event's CloudEvents attributes.
        assert_eq!(u.key, id);
        assert_eq!(u.position.partition, e.position.partition);
        assert_eq!(u.position.partition, partition_for(&id));
        assert_eq!(u.header("ce_type").as_deref(), Some("task.state"));
        assert_eq!(u.header("ce_dataschema").as_deref(), Some("urn:taskstream:schema:task.state:v1"));
        assert_eq!(u.header("ce_specversion").as_deref(), Some("1.0"));
        for h in ["ce_subject", "ce_sequence", "ce_time", "ce_userid", "ce_source"] {
            assert_eq!(u.header(h), e.header(h), "{h}");
        }
        assert_ne!(u.header("ce_id"), e.header("ce_id"), "its own id");
    }
    let ids: std::collections::HashSet<_> = updates.iter().map(|u| u.header("ce_id")).collect();
    assert_eq!(ids.len(), updates.len(), "ce_id unique per record");
}

#[tokio::test]
async fn user_level_events_and_refused_commands_append_no_state() {
    let app = spawn_app().await;
    let due: DateTime<Utc> = "2030-01-01T09:00:00Z".parse().unwrap();
    let task = app.create(ALICE, json!({"title": "call", "due_at": due, "remind_before": "PT30M"})).await.task_id();
    let before = app.log.updates().len();
    let events = app.log.len();
    let remind_at = due - chrono::Duration::minutes(30);
    let notification = reminder_notification_id(task.parse::<TaskId>().unwrap(), remind_at);
    let recorded = as_service(&app, ALICE, &format!("/internal/v1/notifications/{notification}"), json!({"task_id": task, "remind_at": remind_at})).await;
    assert_eq!(recorded, StatusCode::OK);
    assert_eq!(app.log.len(), events + 1, "notification.created, keyed by the user");
    assert_problem(&app.patch(ALICE, &uuid::Uuid::new_v4().to_string(), json!({"title": "nobody"}), &[]).await, 404);
    assert_eq!(app.log.updates().len(), before, "no task-updates record for a user-level event or a refused command");
}

#[tokio::test]
async fn a_failed_append_writes_neither_the_events_nor_the_states() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    let (events, updates) = (app.log.len(), app.log.updates().len());
    app.log.set_down(true);
    assert_problem(&app.complete(ALICE, &id, &[]).await, 503);
    assert_problem(&app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "during the outage"})), &[]).await, 503);
    assert_eq!((app.log.len(), app.log.updates().len()), (events, updates));
    app.log.set_down(false);
    // Once the writer recovered, the command goes through with both.
    let done = test_support::eventually("the writer to recover", std::time::Duration::from_secs(10), || async {
        let r = app.complete(ALICE, &id, &[]).await;
        (r.status == StatusCode::OK).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(done.version(), 2);
    assert_eq!(app.log.updates_of(&id).last().and_then(UpdateRecord::view).map(|v| v.status), Some(TaskViewStatus::Completed));
}

#[tokio::test]
async fn after_a_restart_from_the_log_or_a_snapshot_the_states_go_on_from_the_same_task() {
    // From the log.
    let app = spawn_app().await;
    let id = app.create(ALICE, json!({"title": "kept", "description": "across restarts", "tags": ["a"]})).await.task_id();
    let log = app.log.clone();
    drop(app);
    let app = spawn_app_over(log.clone()).await;
    assert_eq!(app.complete(ALICE, &id, &[]).await.version(), 2);
    let v = log.updates_of(&id).last().and_then(UpdateRecord::view).unwrap();
    assert_eq!(
        (v.title.as_ref(), v.description.as_ref().map(AsRef::as_ref), v.status, v.version),
        ("kept", Some("across restarts"), TaskViewStatus::Completed, 2)
    );
    drop(app);

    // From snapshots only (the records they cover are gone).
    let config = WriterConfig { max_batch: 100, snapshot_every_events: 2, ..WriterConfig::default() };
    let app = build_app_with(FakeLog::default(), config.clone());
    app.wait_ready().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(app.create(ALICE, json!({"title": format!("task {i}"), "description": format!("about {i}")})).await.task_id());
    }
    assert_eq!(app.delete(ALICE, &tasks[0], &[]).await.status, StatusCode::OK);
    let log = app.log.clone();
    drop(app);
    assert!(log.drop_records_covered_by_snapshots() > 0);
    let app = build_app_with(log.clone(), config);
    app.wait_ready().await;
    for (i, t) in tasks.iter().enumerate().skip(1) {
        assert_eq!(app.reopen(ALICE, t, &[]).await.status, StatusCode::CONFLICT, "task {i} is open");
        assert_eq!(app.complete(ALICE, t, &[]).await.version(), 2);
        let v = log.updates_of(t).last().and_then(UpdateRecord::view).unwrap();
        assert_eq!((v.title.as_ref().to_owned(), v.description.as_ref().map(|d| d.as_ref().to_owned())), (format!("task {i}"), Some(format!("about {i}"))));
    }
    assert_problem(&app.complete(ALICE, &tasks[0], &[]).await, 409);
}
