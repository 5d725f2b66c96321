//! `Idempotency-Key`: a retry replays the first answer and appends once, also under concurrency
//! and across a restart (through the log's headers).

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::json;

use crate::helpers::{assert_field_error, assert_problem, problem_type, spawn_app, spawn_app_over, Resp, ALICE, BOB};

#[tokio::test]
async fn an_idempotent_retry_replays_the_first_answer_and_appends_once() {
    let app = spawn_app().await;
    let key = [("Idempotency-Key", "create-1")];
    let app_ref = &app;
    let send = |body: &'static str| async move {
        let app = app_ref;
        let req = Request::post("/v1/tasks")
            .header("authorization", format!("Bearer {}", app.token(ALICE)))
            .header("content-type", "application/json")
            .header("idempotency-key", "create-1")
            .body(Body::from(body))
            .unwrap();
        app.raw(req).await
    };
    let first = send(r#"{"title":"once","priority":"high"}"#).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    // Same body (other key order and whitespace) -> the same answer, replayed.
    let again = send(r#"{ "priority": "high",  "title": "once" }"#).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.text);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(again.header("etag"), first.header("etag"));
    assert_eq!(app.log.len(), 1, "the retry appended nothing");
    let rec = &app.log.records()[0];
    assert_eq!(rec.header("ce_idempotencykey").as_deref(), Some("create-1"));
    assert_eq!(rec.header("ce_requestdigest").map(|d| d.len()), Some(64), "a SHA-256 digest");

    // Same key, another body -> 422, nothing appended.
    let other = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "twice"})), &key).await;
    assert_field_error(&other, "Idempotency-Key");
    assert_eq!(problem_type(&other), "urn:taskstream:problem:idempotency-key-reused");
    // Same key on another command -> 422 too.
    let id = first.task_id();
    assert_problem(&app.complete(ALICE, &id, &key).await, 422);
    assert_eq!(app.log.len(), 1);

    // Keys belong to their user: bob's "create-1" is his own.
    let bobs = app.send(Some(BOB), "POST", "/v1/tasks", Some(&json!({"title": "once", "priority": "high"})), &key).await;
    assert_eq!(bobs.status, StatusCode::CREATED);
    assert!(bobs.header("idempotent-replayed").is_none());
    assert_ne!(bobs.task_id(), id);

    // Lifecycle commands replay too, even once the task has moved on.
    let done = app.complete(ALICE, &id, &[("Idempotency-Key", "complete-1")]).await;
    assert_eq!(done.version(), 2);
    assert_eq!(app.patch(ALICE, &id, json!({"title": "moved on"}), &[]).await.version(), 3);
    let retry = app.complete(ALICE, &id, &[("Idempotency-Key", "complete-1")]).await;
    assert_eq!((retry.status, &retry.body), (StatusCode::OK, &done.body));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.log.records_of(&id).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_requests_with_one_key_append_once() {
    let app = Arc::new(spawn_app().await);
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(
                async move { app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "exactly once"})), &[("Idempotency-Key", "burst")]).await },
            )
        })
        .collect();
    let mut answers = Vec::new();
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        answers.push(r);
    }
    let ids: HashSet<String> = answers.iter().map(Resp::task_id).collect();
    assert_eq!(ids.len(), 1, "every request got the same task: {ids:?}");
    assert!(answers.iter().all(|r| r.version() == 1 && r.body == answers[0].body));
    let fresh = answers.iter().filter(|r| r.header("idempotent-replayed").is_none()).count();
    assert_eq!(fresh, 1, "one request executed, the others were answered from it");
    assert_eq!(app.log.len(), 1, "16 concurrent requests with one key append one record");

    // The same on an existing task.
    let id = answers[0].task_id();
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.patch(ALICE, &id, json!({"title": "same"}), &[("Idempotency-Key", "burst-2")]).await })
        })
        .collect();
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!((r.status, r.version()), (StatusCode::OK, 2), "{}", r.text);
    }
    assert_eq!(app.log.len(), 2);
}

#[tokio::test]
async fn idempotency_survives_a_restart_through_the_log_headers() {
    let app = spawn_app().await;
    let created = app.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "before restart"})), &[("Idempotency-Key", "c-1")]).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.task_id();
    let patched = app.patch(ALICE, &id, json!({"title": "patched"}), &[("Idempotency-Key", "p-1")]).await;
    assert_eq!(patched.version(), 2);
    let log = app.log.clone();
    drop(app);

    let restarted = spawn_app_over(log).await;
    let retry = restarted.send(Some(ALICE), "POST", "/v1/tasks", Some(&json!({"title": "before restart"})), &[("Idempotency-Key", "c-1")]).await;
    assert_eq!((retry.status, &retry.body), (StatusCode::CREATED, &created.body), "{}", retry.text);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.header("location"), created.header("location"));
    let retry = restarted.patch(ALICE, &id, json!({"title": "patched"}), &[("Idempotency-Key", "p-1")]).await;
    assert_eq!((retry.status, &retry.body), (StatusCode::OK, &patched.body), "{}", retry.text);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    // Another body under a remembered key is still refused.
    assert_problem(&restarted.patch(ALICE, &id, json!({"title": "different"}), &[("Idempotency-Key", "p-1")]).await, 422);
    assert_eq!(restarted.log.len(), 2, "replays after the restart appended nothing");
}

/// Found by `./dev chaos`: a client that gives up (timeout, closed connection) after its command
/// reached the writer must not make the retry run it again.
#[tokio::test]
async fn a_retry_after_the_client_gave_up_is_answered_from_the_first_run_not_run_again() {
    let app = std::sync::Arc::new(spawn_app().await);
    let id = app.create_task(ALICE, "slow").await;
    app.log.set_append_delay_ms(1_000);
    let key = [("Idempotency-Key", "give-up-1")];
    // The client gives up (drops its request) once the append is in flight.
    let first = app.patch(ALICE, &id, json!({"title": "once"}), &key);
    tokio::select! {
        answered = first => panic!("the first request was answered before the client gave up: {}", answered.text),
        in_flight = test_support::eventually("the first run's append to start", std::time::Duration::from_secs(10), || async {
            (app.log.appends_in_flight() > 0).then_some(())
        }) => in_flight.unwrap(),
    }
    test_support::eventually("the first run to be appended", std::time::Duration::from_secs(5), || async {
        (app.log.records_of(&id).len() == 2).then_some(())
    })
    .await
    .unwrap();
    app.log.set_append_delay_ms(0);
    let retry = app.patch(ALICE, &id, json!({"title": "once"}), &key).await;
    assert_eq!((retry.status, retry.version(), retry.header("idempotent-replayed")), (StatusCode::OK, 2, Some("true")), "{}", retry.text);
    assert_eq!(app.log.records_of(&id).len(), 2, "the retry ran the command again");
}
