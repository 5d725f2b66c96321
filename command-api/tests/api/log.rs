//! The command API over its event log: ordering under concurrency, log outages (503 with
//! `Retry-After`, nothing appended) and restarts (versions and ownership restored from the log).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;

use test_support::eventually;

use crate::helpers::{assert_problem, build_app, problem_type, spawn_app, spawn_app_over, FakeLog, ALICE, BOB};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_concurrent_patches_get_versions_2_to_41_exactly_once() {
    let app = Arc::new(spawn_app().await);
    let id = app.create_task(ALICE, "hot").await;
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.patch(ALICE, &id, json!({"title": format!("edit {i}")}), &[]).await })
        })
        .collect();
    let mut versions = Vec::new();
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.header("etag"), Some(format!("\"{}\"", r.version()).as_str()));
        versions.push(r.version());
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=41).collect::<Vec<u64>>());
    let records = app.log.records_of(&id);
    let seqs: Vec<String> = records.iter().map(|r| r.header("ce_sequence").unwrap()).collect();
    assert_eq!(seqs, (1..=41).map(|v| v.to_string()).collect::<Vec<_>>(), "ce_sequence contiguous in log order");
    assert!(records.windows(2).all(|w| w[0].position.partition == w[1].position.partition && w[1].position.offset > w[0].position.offset));
}

#[tokio::test]
async fn an_unavailable_log_is_503_with_retry_after_and_nothing_appended_until_it_recovers() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "t").await;
    app.log.set_down(true);

    let r = app.complete(ALICE, &id, &[]).await;
    assert_problem(&r, 503);
    assert_eq!(problem_type(&r), "urn:taskstream:problem:log-unavailable");
    let retry_after: u64 = r.header("retry-after").expect("Retry-After").parse().expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    assert!(!r.text.contains("test fake"), "the cause is logged, not sent: {}", r.text);
    assert!(app.log.failed_appends() >= 1);
    for r in [
        app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "during outage"})), &[]).await,
        app.patch(ALICE, &id, json!({"title": "during outage"}), &[]).await,
        app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "keyed"})), &[("Idempotency-Key", "outage")]).await,
    ] {
        assert_problem(&r, 503);
        assert!(r.header("retry-after").is_some());
    }
    // Readiness reports the outage too.
    eventually("readyz to report the outage", Duration::from_secs(10), || async {
        (app.get("/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(app.log.len(), 1, "nothing was appended while the log was down");

    app.log.set_down(false);
    let r = eventually("a command to succeed after the log recovers", Duration::from_secs(20), || async {
        let r = app.complete(ALICE, &id, &[]).await;
        match r.status {
            StatusCode::OK => Some(r),
            StatusCode::SERVICE_UNAVAILABLE => None,
            other => panic!("unexpected {other} while recovering: {}", r.text),
        }
    })
    .await
    .unwrap();
    assert_eq!(r.version(), 2, "the refused commands left no trace in the task's versions");
    app.wait_ready().await;
    // The keyed command that was refused with 503 was not remembered: it executes now.
    let keyed = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "keyed"})), &[("Idempotency-Key", "outage")]).await;
    assert_eq!(keyed.status, StatusCode::CREATED, "{}", keyed.text);
    assert!(keyed.header("idempotent-replayed").is_none());
    let seqs: Vec<u32> = app.log.envelopes().iter().filter(|e| e.subject.to_string() == id).map(|e| e.meta.sequence).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(app.log.len(), 3);
}

#[tokio::test]
async fn an_app_started_while_the_log_is_down_answers_503_then_becomes_ready() {
    let log = FakeLog::default();
    log.set_down(true);
    let app = build_app(log);
    assert_eq!(app.get("/readyz").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK, "alive even when not ready");
    let r = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "too early"})), &[]).await;
    assert_problem(&r, 503);
    assert!(r.header("retry-after").is_some());
    assert_eq!(app.log.len(), 0);
    app.log.set_down(false);
    app.wait_ready().await;
    assert_eq!(app.create(ALICE, json!({"title": "now"})).await.version(), 1);
}

#[tokio::test]
async fn a_restarted_app_continues_versions_and_ownership_from_the_log() {
    let app = spawn_app().await;
    let id = app.create_task(ALICE, "long lived").await;
    assert_eq!(app.patch(ALICE, &id, json!({"priority": "high"}), &[]).await.version(), 2);
    assert_eq!(app.complete(ALICE, &id, &[]).await.version(), 3);
    let gone = app.create_task(ALICE, "to delete").await;
    assert_eq!(app.delete(ALICE, &gone, &[]).await.version(), 2);
    let log = app.log.clone();
    drop(app);

    let app = spawn_app_over(log).await;
    assert_problem(&app.complete(ALICE, &id, &[]).await, 409);
    let r = app.reopen(ALICE, &id, &[]).await;
    assert_eq!((r.status, r.version()), (StatusCode::OK, 4), "{}", r.text);
    assert_eq!(app.patch(ALICE, &id, json!({"title": "after restart"}), &[("If-Match", "\"4\"")]).await.version(), 5);
    assert_problem(&app.patch(BOB, &id, json!({"title": "bob"}), &[]).await, 404);
    assert_problem(&app.patch(ALICE, &gone, json!({"title": "zombie"}), &[]).await, 409);
    assert_problem(&app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"task_id": id, "title": "dup"})), &[]).await, 409);
    let seqs: Vec<String> = app.log.records_of(&id).iter().map(|r| r.header("ce_sequence").unwrap()).collect();
    assert_eq!(seqs, ["1", "2", "3", "4", "5"]);

    // And once more, over the records of both runs.
    let log = app.log.clone();
    drop(app);
    let app = spawn_app_over(log).await;
    assert_eq!(app.complete(ALICE, &id, &[]).await.version(), 6);
}
