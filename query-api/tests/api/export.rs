//! `GET /v1/me/export`: all of one user's rows as one JSON document, streamed; never the webhook's
//! secret, never another user's rows; problem+json when refused.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use uuid::Uuid;

use query_api::export::{CHUNK_BYTES, EXPORTS_AT_ONCE};
use query_api::Limits;

use crate::helpers::{base, spawn_app, spawn_app_with, FakeWatermarks, SeedTask, TestApp};

fn export_request(authorization: Option<&str>) -> Request<Body> {
    let mut req = Request::get("/v1/me/export");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    req.body(Body::empty()).unwrap()
}

/// alice: an open and a completed task, the history of those and of a deleted task, two
/// notifications (one read), a webhook with a secret. bob: a task, an event, a notification, a
/// removed webhook.
async fn seed(app: &TestApp) -> (Uuid, Uuid, Uuid) {
    let open = app.seed(&SeedTask::new("alice", "alice open", base())).await;
    let completed = app.seed(&SeedTask { status: "completed", tags: vec!["home".into()], ..SeedTask::new("alice", "alice done", base()) }).await;
    let deleted = Uuid::new_v4();
    for (task, events) in [(open, 1), (completed, 2), (deleted, 2)] {
        for v in 1..=events {
            let kind = match (task == deleted, v) {
                (_, 1) => "task.created",
                (true, _) => "task.deleted",
                (false, _) => "task.completed",
            };
            app.seed_event(task, "alice", v, kind, json!({"title": format!("title of {task}")})).await;
        }
    }
    let bobs = app.seed(&SeedTask::new("bob", "bob's task", base())).await;
    app.seed_event(bobs, "bob", 1, "task.created", json!({"title": "bob's task"})).await;
    sqlx::query(
        "INSERT INTO notifications (id, user_id, task_id, kind, message, created_at, event_id)
         SELECT gen_random_uuid(), u, $1, 'reminder', u || ' reminder ' || i, $2 + i * interval '1 minute', gen_random_uuid()
         FROM unnest(ARRAY['alice', 'alice', 'bob']) WITH ORDINALITY AS t(u, i)",
    )
    .bind(open)
    .bind(base())
    .execute(&app.pool)
    .await
    .expect("seed notifications");
    sqlx::query(
        "INSERT INTO notification_reads (notification_id, user_id, read_at)
         SELECT id, user_id, $1 + interval '1 hour' FROM notifications WHERE message = 'alice reminder 1'",
    )
    .bind(base())
    .execute(&app.pool)
    .await
    .expect("seed a read mark");
    sqlx::query(
        "INSERT INTO webhooks (user_id, url, secret, version, updated_at)
         VALUES ('alice', 'https://hooks.example.com/alice', 'whsec_do-not-export-me', 1, $1), ('bob', NULL, NULL, 2, $1)",
    )
    .bind(base())
    .execute(&app.pool)
    .await
    .expect("seed webhooks");
    (open, completed, deleted)
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().expect("an object").keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

#[tokio::test]
async fn the_export_holds_every_row_of_the_caller_and_nothing_else() {
    let app = spawn_app().await;
    let (open, completed, deleted) = seed(&app).await;
    let a = app.send(export_request(Some(&app.bearer("alice")))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.headers["content-disposition"], "attachment; filename=\"taskstream-export-alice.json\"");
    let doc = &a.body;
    assert_eq!(keys(doc), ["exported_at", "history", "notifications", "tasks", "user_id", "webhook"]);
    assert_eq!(doc["user_id"], "alice");
    assert!(chrono::DateTime::parse_from_rfc3339(doc["exported_at"].as_str().unwrap()).is_ok(), "{doc}");

    let tasks = doc["tasks"].as_array().unwrap();
    let titles: HashMap<String, (&str, &str)> =
        tasks.iter().map(|t| (t["id"].as_str().unwrap().to_owned(), (t["title"].as_str().unwrap(), t["status"].as_str().unwrap()))).collect();
    assert_eq!(titles, HashMap::from([(open.to_string(), ("alice open", "open")), (completed.to_string(), ("alice done", "completed"))]));
    let done = tasks.iter().find(|t| t["id"] == completed.to_string()).unwrap();
    assert_eq!(
        keys(done),
        [
            "completed_at",
            "created_at",
            "description",
            "due_at",
            "id",
            "occurrence",
            "priority",
            "recurrence",
            "recurrence_parent_id",
            "remind_at",
            "remind_before",
            "status",
            "tags",
            "timezone",
            "title",
            "updated_at",
            "version"
        ]
    );
    assert_eq!((done["priority"].as_str(), &done["tags"]), (Some("medium"), &json!(["home"])));
    assert!(done["completed_at"].is_string());

    // Every event, the deleted task's too, by task and version.
    let history = doc["history"].as_array().unwrap();
    assert_eq!(history.len(), 5, "{doc}");
    assert_eq!(keys(&history[0]), ["correlation_id", "data", "event_id", "occurred_at", "task_id", "type", "version"]);
    let of_deleted: Vec<(i64, &str)> =
        history.iter().filter(|e| e["task_id"] == deleted.to_string()).map(|e| (e["version"].as_i64().unwrap(), e["type"].as_str().unwrap())).collect();
    assert_eq!(of_deleted, [(1, "task.created"), (2, "task.deleted")]);
    assert_eq!(history.iter().find(|e| e["task_id"] == deleted.to_string()).unwrap()["data"]["title"], format!("title of {deleted}"));
    let order: Vec<(String, i64)> = history.iter().map(|e| (e["task_id"].as_str().unwrap().to_owned(), e["version"].as_i64().unwrap())).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);

    let notifications = doc["notifications"].as_array().unwrap();
    let messages: Vec<(&str, bool)> = notifications.iter().map(|n| (n["message"].as_str().unwrap(), n["read_at"].is_string())).collect();
    assert_eq!(messages, [("alice reminder 1", true), ("alice reminder 2", false)]);
    assert_eq!(keys(&notifications[0]), ["created_at", "id", "kind", "message", "read_at", "task_id"]);

    assert_eq!(keys(&doc["webhook"]), ["updated_at", "url"]);
    assert_eq!(doc["webhook"]["url"], "https://hooks.example.com/alice");
    let text = doc.to_string();
    assert!(!text.contains("secret") && !text.contains("whsec_"), "the webhook secret never leaves: {text}");
    assert!(!text.contains("bob"), "nothing of bob's: {text}");

    // bob: his rows only; a removed webhook is none.
    let b = app.send(export_request(Some(&app.bearer("bob")))).await;
    assert_eq!(b.status, 200);
    assert_eq!((b.body["tasks"].as_array().unwrap().len(), b.body["history"].as_array().unwrap().len()), (1, 1));
    assert_eq!(b.body["notifications"].as_array().unwrap().len(), 1);
    assert!(b.body["webhook"].is_null());
    assert!(!b.body.to_string().contains("alice"), "{}", b.body);

    // Nobody's data: an empty document.
    let c = app.send(export_request(Some(&app.bearer("carol")))).await;
    assert_eq!(c.body, json!({"user_id": "carol", "exported_at": c.body["exported_at"], "tasks": [], "history": [], "notifications": [], "webhook": null}));
}

#[tokio::test]
async fn without_a_valid_token_or_with_a_bad_consistency_token_it_is_a_problem() {
    let app = spawn_app().await;
    for authorization in [None, Some("Bearer nope"), Some("Basic abc")] {
        let a = app.send(export_request(authorization)).await;
        assert_eq!(a.status, 401, "{authorization:?}: {}", a.body);
        assert_eq!(a.headers["content-type"], "application/problem+json");
        assert_eq!(a.headers["www-authenticate"], "Bearer");
        assert_eq!((a.body["type"].as_str(), a.body["status"].as_u64()), (Some("urn:taskstream:problem:unauthorized"), Some(401)), "{}", a.body);
        assert!(a.body["detail"].is_string());
    }
    let req = Request::get("/v1/me/export").header("authorization", app.bearer("alice")).header("x-consistency-token", "bogus").body(Body::empty()).unwrap();
    let a = app.send(req).await;
    assert_eq!((a.status, a.body["type"].as_str()), (400, Some("urn:taskstream:problem:bad-request")), "{}", a.body);
    assert_eq!(a.headers["content-type"], "application/problem+json");
}

/// Enough tasks of alice for an export of several chunks (each task is ~400 bytes of JSON).
async fn seed_many(app: &TestApp, n: i32) {
    sqlx::query(
        "INSERT INTO tasks (id, user_id, title, description, status, priority, timezone, tags, version, created_at, updated_at)
         SELECT gen_random_uuid(), 'alice', 'task number ' || i, repeat('d', 100), 'open', 1, 'UTC', ARRAY['a', 'b'], 1,
                $1 + i * interval '1 second', $1
         FROM generate_series(1, $2) i",
    )
    .bind(base())
    .bind(n)
    .execute(&app.pool)
    .await
    .expect("seed tasks");
}

#[tokio::test]
async fn a_large_export_is_streamed_in_chunks_and_exports_at_once_are_bounded() {
    let app = spawn_app_with(Limits::default(), FakeWatermarks(Some(HashMap::new()))).await;
    let n = 4_000;
    seed_many(&app, n).await;
    let res = app.router.clone().oneshot(export_request(Some(&app.bearer("alice")))).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let (mut frames, mut bytes) = (0, Vec::new());
    while let Some(frame) = body.frame().await {
        let data = frame.expect("no error mid-stream").into_data().expect("data frames only");
        assert!(data.len() < CHUNK_BYTES + 4096, "chunks stay small: {}", data.len());
        frames += 1;
        bytes.extend_from_slice(&data);
    }
    assert!(bytes.len() > 3 * CHUNK_BYTES, "{} bytes", bytes.len());
    assert!(frames > 3, "streamed, not built whole: {frames} chunks for {} bytes", bytes.len());
    let doc: Value = serde_json::from_slice(&bytes).expect("one JSON document");
    let tasks = doc["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), n as usize);
    assert_eq!((tasks[0]["title"].as_str(), tasks[n as usize - 1]["title"].as_str()), (Some("task number 1"), Some("task number 4000")), "oldest first");

    // Exports whose clients do not read hold their slots; one more is refused until one goes.
    let mut held = Vec::new();
    for _ in 0..EXPORTS_AT_ONCE {
        let res = app.router.clone().oneshot(export_request(Some(&app.bearer("alice")))).await.unwrap();
        assert_eq!(res.status(), 200);
        held.push(res);
    }
    let refused = app.send(export_request(Some(&app.bearer("alice")))).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.headers["content-type"], "application/problem+json");
    assert!(refused.headers.contains_key("retry-after"));
    drop(held);
    let again = test_support::eventually("a slot to be free once the clients went away", std::time::Duration::from_secs(10), || async {
        let a = app.send(export_request(Some(&app.bearer("bob")))).await;
        (a.status == 200).then_some(a)
    })
    .await
    .unwrap();
    assert_eq!(again.body["user_id"], "bob");
}
