//! Command API behaviour over an in-memory log: statuses, problem+json, events, idempotency,
//! ordering, outage and restart.

mod helpers;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use serde_json::{json, Value};

use domain::TaskEvent;
use helpers::{spawn_app, spawn_app_over, Answer, TestApp};

async fn create(app: &TestApp, user: &str, body: Value) -> String {
    let a = app.send(Some(user), "POST", "/v1/tasks", Some(&body), &[]).await;
    assert_eq!(a.status, 201, "{}", a.body);
    a.body["task_id"].as_str().unwrap().to_owned()
}

#[track_caller]
fn assert_problem(a: &Answer, status: u16) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.headers.get("content-type").unwrap(), "application/problem+json");
    assert_eq!(a.body["status"], status);
    for f in ["type", "title", "detail"] {
        assert!(a.body[f].is_string(), "{f} missing in {}", a.body);
    }
}

#[tokio::test]
async fn lifecycle_answers_and_records_cloudevents() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    let a = app.send(Some("alice"), "POST", "/v1/tasks", Some(&json!({"task_id": id, "title": "t", "tags": ["a", "a", "b"]})), &[]).await;
    assert_eq!(a.status, 201);
    assert_eq!(a.body["task_id"], id.as_str());
    assert_eq!(a.body["version"], 1);
    assert!(a.body["position"].is_string());
    assert_eq!(a.headers.get("location").unwrap().to_str().unwrap(), format!("/v1/tasks/{id}"));
    assert_eq!(a.headers.get("etag").unwrap(), "\"1\"");
    let steps = [
        ("PATCH", format!("/v1/tasks/{id}"), Some(json!({"title": "u"}))),
        ("POST", format!("/v1/tasks/{id}/complete"), None),
        ("POST", format!("/v1/tasks/{id}/reopen"), None),
        ("DELETE", format!("/v1/tasks/{id}"), None),
    ];
    for (i, (m, p, b)) in steps.iter().enumerate() {
        let a = app.send(Some("alice"), m, p, b.as_ref(), &[]).await;
        assert_eq!((a.status, a.body["version"].as_i64()), (200, Some(i as i64 + 2)), "{m} {p}");
    }
    let events = app.log.envelopes();
    let types: Vec<&str> = events.iter().map(|e| e.event.event_type()).collect();
    assert_eq!(types, ["task.created", "task.updated", "task.completed", "task.reopened", "task.deleted"]);
    assert!(events.iter().enumerate().all(|(i, e)| e.sequence == i as u32 + 1 && e.task_id.to_string() == id && e.user_id.as_ref() == "alice"));
    let TaskEvent::Created(t) = &events[0].event else { panic!() };
    assert_eq!(t.tags.to_strings(), ["a", "b"]);
    let keys: Vec<String> = app.log.records.lock().unwrap().iter().map(|r| r.key.clone()).collect();
    assert!(keys.iter().all(|k| *k == id), "key = task id");
}

#[tokio::test]
async fn auth_failures_are_401_with_www_authenticate() {
    let app = spawn_app().await;
    let body = json!({"title": "x"});
    let expired = app.auth.issue("alice", -3600);
    let foreign = platform::auth::JwtAuth::new(&platform::secret::Secret::new("other")).issue("alice", 60);
    for auth in [None, Some("Basic abc".to_owned()), Some(format!("Bearer {expired}")), Some(format!("Bearer {foreign}")), Some("Bearer ".into())] {
        let mut req = Request::post("/v1/tasks").header("content-type", "application/json");
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let a = app.raw(req.body(Body::from(body.to_string())).unwrap()).await;
        assert_problem(&a, 401);
        assert_eq!(a.headers.get("www-authenticate").unwrap(), "Bearer");
    }
    assert_eq!(app.log.len(), 0);
}

#[tokio::test]
async fn invalid_input_is_a_4xx_with_field_errors_never_5xx() {
    let app = spawn_app().await;
    let id = create(&app, "alice", json!({"title": "target"})).await;
    let long = "x".repeat(201);
    let fields: Vec<(Value, &str)> = vec![
        (json!({"title": ""}), "title"),
        (json!({"title": long}), "title"),
        (json!({}), "title"),
        (json!({"title": "x", "description": "d".repeat(10_001)}), "description"),
        (json!({"title": "x", "priority": "asap"}), "priority"),
        (json!({"title": "x", "due_at": "next week"}), "due_at"),
        (json!({"title": "x", "timezone": "Moon/Base"}), "timezone"),
        (json!({"title": "x", "due_at": "2030-01-01T00:00:00Z", "recurrence": "FREQ=HOURLY;BYDAY=XX"}), "recurrence"),
        (json!({"title": "x", "due_at": "2030-01-01T00:00:00Z", "remind_before": "P1M"}), "remind_before"),
        (json!({"title": "x", "remind_before": "PT1H"}), "remind_before"),
        (json!({"title": "x", "tags": (0..21).map(|i| i.to_string()).collect::<Vec<_>>()}), "tags"),
        (json!({"title": "x", "colour": "red"}), "colour"),
        (json!({"title": 5}), "title"),
        (json!({"title": "x", "task_id": "not-a-uuid"}), "task_id"),
    ];
    for (body, field) in fields {
        let a = app.send(Some("alice"), "POST", "/v1/tasks", Some(&body), &[]).await;
        assert_problem(&a, 422);
        let errs = a.body["errors"].as_array().unwrap();
        assert!(errs.iter().any(|e| e["field"] == field), "{body}: {}", a.body);
    }
    for body in [json!({}), json!({"title": null}), json!({"priority": null}), json!({"due_at": null, "remind_before": "PT5M"})] {
        let a = app.send(Some("alice"), "PATCH", &format!("/v1/tasks/{id}"), Some(&body), &[]).await;
        assert_problem(&a, 422);
    }
    let raw = |ct: &str, body: String| Request::post("/v1/tasks").header("authorization", format!("Bearer {}", app.token("alice"))).header("content-type", ct).body(Body::from(body)).unwrap();
    assert_problem(&app.raw(raw("text/plain", "{\"title\":\"x\"}".into())).await, 415);
    assert_problem(&app.raw(raw("application/json", "{\"title\":".into())).await, 400);
    assert_problem(&app.raw(raw("application/json", "[1,2]".into())).await, 422);
    assert_problem(&app.raw(raw("application/json", format!("{{\"title\":\"x\",\"description\":\"{}\"}}", "y".repeat(70_000)))).await, 413);
    let path = format!("/v1/tasks/{id}");
    let body = json!({"title": "y"});
    assert_problem(&app.send(Some("alice"), "PATCH", &path, Some(&body), &[("If-Match", "soon")]).await, 400);
    assert_problem(&app.send(Some("alice"), "PATCH", &path, Some(&body), &[("Idempotency-Key", "has space")]).await, 400);
    assert_problem(&app.send(Some("alice"), "POST", "/v1/tasks/nope/complete", None, &[]).await, 404);
    assert_problem(&app.send(Some("alice"), "GET", "/v1/nothing-here", None, &[]).await, 404);
    assert_eq!(app.log.len(), 1, "nothing refused was appended");
}

#[tokio::test]
async fn state_conflicts_and_versions() {
    let app = spawn_app().await;
    let id = create(&app, "alice", json!({"title": "t"})).await;
    let p = |s: &str| format!("/v1/tasks/{id}{s}");
    assert_problem(&app.send(Some("alice"), "POST", &p("/reopen"), None, &[]).await, 409);
    assert_eq!(app.send(Some("alice"), "POST", &p("/complete"), None, &[]).await.status, 200);
    assert_problem(&app.send(Some("alice"), "POST", &p("/complete"), None, &[]).await, 409);
    assert_problem(&app.send(Some("alice"), "POST", "/v1/tasks", Some(&json!({"task_id": id, "title": "again"})), &[]).await, 409);
    assert_problem(&app.send(Some("alice"), "PATCH", &p(""), Some(&json!({"title": "v"})), &[("If-Match", "\"1\"")]).await, 412);
    assert_eq!(app.send(Some("alice"), "PATCH", &p(""), Some(&json!({"title": "v"})), &[("If-Match", "\"2\"")]).await.body["version"], 3);
    // Another user: exactly like a missing task.
    let foreign = app.send(Some("bob"), "POST", &p("/reopen"), None, &[]).await;
    let missing = app.send(Some("bob"), "POST", &format!("/v1/tasks/{}/reopen", uuid::Uuid::now_v7()), None, &[]).await;
    assert_problem(&foreign, 404);
    assert_eq!(foreign.body, missing.body);
    assert_eq!(app.send(Some("alice"), "DELETE", &p(""), None, &[]).await.status, 200);
    for (m, s, b) in [("PATCH", "", Some(json!({"title": "z"}))), ("POST", "/complete", None), ("DELETE", "", None)] {
        assert_problem(&app.send(Some("alice"), m, &p(s), b.as_ref(), &[]).await, 409);
    }
}

#[tokio::test]
async fn idempotency_keys_replay_refuse_other_bodies_and_coalesce() {
    let app = Arc::new(spawn_app().await);
    let k = [("Idempotency-Key", "k-1")];
    let first = app.send(Some("alice"), "POST", "/v1/tasks", Some(&json!({"title": "once"})), &k).await;
    let again = app.send(Some("alice"), "POST", "/v1/tasks", Some(&json!({ "title": "once" })), &k).await;
    assert_eq!((first.status, again.status), (201, 201));
    assert_eq!(first.body, again.body);
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    assert_problem(&app.send(Some("alice"), "POST", "/v1/tasks", Some(&json!({"title": "twice"})), &k).await, 422);
    assert_eq!(app.log.len(), 1);

    let id = first.body["task_id"].as_str().unwrap().to_owned();
    let mut handles = Vec::new();
    for _ in 0..16 {
        let (app, id) = (app.clone(), id.clone());
        handles.push(tokio::spawn(async move {
            app.send(Some("alice"), "PATCH", &format!("/v1/tasks/{id}"), Some(&json!({"title": "same"})), &[("Idempotency-Key", "k-2")]).await
        }));
    }
    let mut bodies = Vec::new();
    for h in handles {
        let a = h.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        bodies.push(a.body);
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]), "every concurrent retry gets the one answer");
    assert_eq!(app.log.len(), 2, "16 concurrent requests with one key append once");
}

#[tokio::test]
async fn concurrent_updates_on_one_task_get_contiguous_versions() {
    let app = Arc::new(spawn_app().await);
    let id = create(&app, "alice", json!({"title": "hot"})).await;
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.send(Some("alice"), "PATCH", &format!("/v1/tasks/{id}"), Some(&json!({"title": format!("t{i}")})), &[]).await })
        })
        .collect();
    let mut versions = Vec::new();
    for h in handles {
        let a = h.await.unwrap();
        assert_eq!(a.status, 200);
        versions.push(a.body["version"].as_i64().unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=41).collect::<Vec<_>>());
    let seqs: Vec<u32> = app.log.envelopes().iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=41).collect::<Vec<_>>());
}

#[tokio::test]
async fn log_outage_is_503_with_nothing_appended_then_recovers() {
    let app = spawn_app().await;
    let id = create(&app, "alice", json!({"title": "t"})).await;
    app.log.down.store(true, Ordering::SeqCst);
    let a = app.send(Some("alice"), "POST", &format!("/v1/tasks/{id}/complete"), None, &[]).await;
    assert_problem(&a, 503);
    assert_eq!(a.headers.get("retry-after").unwrap(), "1");
    assert_eq!(app.log.len(), 1);
    app.log.down.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let ok = loop {
        let a = app.send(Some("alice"), "POST", &format!("/v1/tasks/{id}/complete"), None, &[]).await;
        if a.status == 200 {
            break a;
        }
        assert!(std::time::Instant::now() < deadline, "did not recover: {}", a.body);
        tokio::task::yield_now().await;
    };
    assert_eq!(ok.body["version"], 2);
}

#[tokio::test]
async fn a_restarted_writer_restores_state_and_idempotency_from_the_log() {
    let app = spawn_app().await;
    let id = create(&app, "alice", json!({"title": "t"})).await;
    let k = [("Idempotency-Key", "before-restart")];
    let first = app.send(Some("alice"), "POST", &format!("/v1/tasks/{id}/complete"), None, &k).await;
    assert_eq!(first.body["version"], 2);
    let restarted = spawn_app_over(app.log.clone()).await;
    let replay = restarted.send(Some("alice"), "POST", &format!("/v1/tasks/{id}/complete"), None, &k).await;
    assert_eq!((replay.status, &replay.body), (200, &first.body));
    assert_eq!(replay.headers.get("idempotent-replayed").unwrap(), "true");
    let next = restarted.send(Some("alice"), "POST", &format!("/v1/tasks/{id}/reopen"), None, &[]).await;
    assert_eq!(next.body["version"], 3);
}

#[tokio::test]
async fn openapi_health_and_metrics_are_served() {
    let app = spawn_app().await;
    let (s, body) = app.get("/v1/openapi.json").await;
    assert_eq!(s, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for p in ["/v1/tasks", "/v1/tasks/{id}", "/v1/tasks/{id}/complete", "/v1/tasks/{id}/reopen"] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing from OpenAPI");
    }
    assert!(doc["paths"]["/v1/tasks/{id}"].get("patch").is_some() && doc["paths"]["/v1/tasks/{id}"].get("delete").is_some());
    assert_eq!(app.get("/healthz").await.0, 200);
    assert_eq!(app.get("/metrics").await.0, 200);
}
